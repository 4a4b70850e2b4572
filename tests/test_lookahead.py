"""The tree-masked lookahead: sibling candidates never see each other, and the chosen one's KV is kept."""
from __future__ import annotations

import pytest
import torch
from checkpoints import make_checkpoint

import lenvm_rt

PREFIXES = [[5, 17, 42, 99, 3], [9, 8], [100, 101, 102, 103, 104, 105, 106, 107], [11, 12, 13, 14, 15]]
CANDIDATES = [[7, 8, 9, 10], [20, 21, 22, 23], [30, 31, 32, 33], [40, 7, 41, 42]]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def setup(request, tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return lenvm_rt.load(directory, device="cpu").model, hf


def _prefill(model, prefixes):
    lengths = [len(p) for p in prefixes]
    ids = torch.zeros(len(prefixes), max(lengths), dtype=torch.long)
    for b, p in enumerate(prefixes):
        ids[b, : len(p)] = torch.tensor(p)
    model.allocate(batch=len(prefixes), capacity=32)
    model.prefill(ids, lengths)
    return lengths


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [0], [2, 3]])
def test_batched_candidates_equal_each_prefix_plus_candidate_alone(setup, rows):
    model, hf = setup
    prefixes, cands = [PREFIXES[r] for r in rows], [CANDIDATES[r] for r in rows]
    with torch.inference_mode():
        lengths = _prefill(model, prefixes)
        logits = model.logits(model.lookahead(torch.tensor(cands), lengths))  # [B, K, V]
        worst = 0.0
        for b, (prefix, row) in enumerate(zip(prefixes, cands)):
            for j, cand in enumerate(row):
                ref = hf(torch.tensor([prefix + [cand]])).logits[0, -1]
                worst = max(worst, (logits[b, j] - ref).abs().max().item())
    assert worst <= 1e-4, f"max |logit diff| {worst:.3g}"


def test_candidate_order_does_not_matter(setup):
    model, _ = setup
    with torch.inference_mode():
        lengths = _prefill(model, PREFIXES)
        a = model.logits(model.lookahead(torch.tensor(CANDIDATES), lengths))
        b = model.logits(model.lookahead(torch.tensor([row[::-1] for row in CANDIDATES]), lengths))
    assert (a - b.flip(1)).abs().max().item() <= 1e-5


def test_commit_keeps_the_chosen_candidate_kv(setup):
    model, _ = setup
    chosen = [2, 0, 3, 1]
    with torch.inference_mode():
        lengths = _prefill(model, PREFIXES)
        model.lookahead(torch.tensor(CANDIDATES), lengths)
        model.commit(torch.tensor(chosen), lengths)
        kept = [(k.clone(), v.clone()) for k, v in zip(model.k_cache, model.v_cache)]
        extended = [p + [c[j]] for p, c, j in zip(PREFIXES, CANDIDATES, chosen)]
        _prefill(model, extended)
        worst = 0.0
        for (k, v), k_ref, v_ref in zip(kept, model.k_cache, model.v_cache):
            for b, seq in enumerate(extended):
                n = len(seq)
                worst = max(worst, (k[b, :, :n] - k_ref[b, :, :n]).abs().max().item(),
                            (v[b, :, :n] - v_ref[b, :, :n]).abs().max().item())
    assert worst <= 1e-5, f"max |kv diff| {worst:.3g}"


def test_decoding_after_commit_matches_transformers(setup):
    model, hf = setup
    chosen = [1, 3, 0, 2]
    with torch.inference_mode():
        lengths = _prefill(model, PREFIXES)
        model.lookahead(torch.tensor(CANDIDATES), lengths)
        model.commit(torch.tensor(chosen), lengths)
        nxt = torch.tensor([50, 51, 52, 53])
        logits = model.logits(model.decode_step(nxt, [n + 1 for n in lengths]))
        for b, (p, c, j) in enumerate(zip(PREFIXES, CANDIDATES, chosen)):
            ref = hf(torch.tensor([p + [c[j], int(nxt[b])]])).logits[0, -1]
            assert (logits[b] - ref).abs().max().item() <= 1e-4


def test_commit_without_lookahead_is_an_error(setup):
    model, _ = setup
    with pytest.raises(RuntimeError, match="without a preceding lookahead"):
        model.commit(torch.tensor([0]), [3])
