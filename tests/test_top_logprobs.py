"""Top alternatives: each step's N most probable tokens under the policy (Generation.top_logprobs, StreamEvent,
`generate --json --top-logprobs`), checked against transformers' own forward, for plain, sampled and guided rows,
the same whatever the batch; equal logits at the edge taken by lower id; a token's own bytes; bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
from checkpoints import make_checkpoint, make_tokenizer
from server_helpers import tiny_runtime

import lenvm_rt
from lenvm_rt import LengthTarget, Sampling
from lenvm_rt.cli import main
from lenvm_rt.decode import _top_ids, _top_ids_torch, top_alternatives
from lenvm_rt.tokenizer import Tokenizer

SHARPEN = 6.0
PROMPTS = [[5, 17, 40, 99, 3, 250], [7, 8, 9]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    directory = make_checkpoint(tmp_path_factory.mktemp("top") / "llama", "llama")
    hf = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # sharper distributions than the random init's near-uniform ones
        hf.lm_head.weight.mul_(SHARPEN)
    hf.save_pretrained(directory)
    return lenvm_rt.load(directory, device="cpu"), hf, directory


def hf_log_probs(hf, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log softmax of transformers' logits before each response token [len(response), V] (float64)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + response])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]


def assert_alternatives(top: list[tuple[int, float]], logp: torch.Tensor, n: int) -> None:
    """top is logp's n most probable tokens: its log p are the n largest, each its token's own (1e-4: fp32 model)."""
    assert len(top) == n and len({i for i, _ in top}) == n
    values = [lp for _, lp in top]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(torch.topk(logp, n).values.tolist(), abs=1e-4)
    assert values == pytest.approx([float(logp[i]) for i, _ in top], abs=1e-4)


def assert_same(got: list[list[tuple[int, float]]], want: list[list[tuple[int, float]]]) -> None:
    """The same tokens at every step, log p to 1e-6 (a padded batch prefill rounds a prompt's last bits apart)."""
    assert [[i for i, _ in step] for step in got] == [[i for i, _ in step] for step in want]
    assert [lp for step in got for _, lp in step] == pytest.approx([lp for step in want for _, lp in step],
                                                                    rel=1e-6, abs=1e-6)


def test_alternatives_are_the_policys_most_probable_tokens(tiny):
    rt, hf, _ = tiny
    gens = rt.generate_batch(PROMPTS, max_new_tokens=10, sampling=[Sampling(temperature=1.3, seed=4),
                                                                   Sampling(temperature=0, seed=1)],
                             top_logprobs=[5, 20])
    for prompt, gen, n in zip(PROMPTS, gens, (5, 20)):
        assert len(gen.top_logprobs) == gen.num_tokens
        reference = hf_log_probs(hf, prompt, gen.token_ids)
        for step, (top, token, logprob, rank) in enumerate(zip(gen.top_logprobs, gen.token_ids, gen.token_logprobs,
                                                               gen.token_ranks)):
            assert_alternatives(top, reference[step], n)
            mine = dict(top)
            assert (token in mine) == (rank <= n)  # the chosen token is listed exactly when its rank allows
            if token in mine:
                assert mine[token] == logprob  # the same native pass gives both
    assert gens[1].top_logprobs[0][0][0] == gens[1].token_ids[0]  # greedy: the chosen token is the first
    assert any(r > 5 for r in gens[0].token_ranks)  # sampled at 1.3: some chosen tokens are not listed
    alone = rt.generate(PROMPTS[0], max_new_tokens=10, sampling=Sampling(temperature=1.3, seed=4), top_logprobs=5)
    assert alone.token_ids == gens[0].token_ids
    assert_same(alone.top_logprobs, gens[0].top_logprobs)
    plain = rt.generate(PROMPTS[0], max_new_tokens=10, sampling=Sampling(temperature=1.3, seed=4))
    assert plain.top_logprobs == [] and plain.token_ids == gens[0].token_ids


def test_stream_carries_the_same_alternatives(tiny):
    rt, _, _ = tiny
    sampling = Sampling(temperature=0.8, seed=2)
    gen = rt.generate(PROMPTS[1], max_new_tokens=8, sampling=sampling, top_logprobs=3)
    events = list(rt.stream(PROMPTS[1], max_new_tokens=8, sampling=sampling, top_logprobs=3))
    assert [e.top_logprobs for e in events] == gen.top_logprobs
    assert all(e.top_logprobs is None for e in rt.stream(PROMPTS[1], max_new_tokens=3, sampling=sampling))


def test_guided_rows_report_the_policys_alternatives_whatever_the_batch(tmp_path):
    rt = tiny_runtime(tmp_path)
    sampling = Sampling(temperature=1.0, top_k=15, seed=5)
    kwargs = dict(max_new_tokens=12, sampling=sampling)
    guided = rt.generate(PROMPTS[0], length=LengthTarget.equal(6), top_logprobs=4, **kwargs)
    tilted = rt.generate(PROMPTS[1], tilt=-3.0, top_logprobs=2, **kwargs)
    unguided = rt.generate(PROMPTS[1], **kwargs)
    batch = rt.generate_batch([PROMPTS[0], PROMPTS[1], PROMPTS[1]], length=[LengthTarget.equal(6), None, None],
                              tilt=[None, -3.0, None], top_logprobs=[4, 2, 0], **kwargs)
    assert [g.token_ids for g in batch] == [guided.token_ids, tilted.token_ids, unguided.token_ids]
    assert_same(batch[0].top_logprobs, guided.top_logprobs)
    assert_same(batch[1].top_logprobs, tilted.top_logprobs)
    assert batch[2].top_logprobs == []
    prompt_ids = PROMPTS[0]
    with torch.inference_mode():  # the policy's own distribution at each step: a forward over prompt + tokens
        rt.model.allocate(batch=1, capacity=64)
        ids = prompt_ids + guided.token_ids
        x = rt.model.prefill(torch.tensor([ids]), [len(ids)], all_positions=True)
        logp = torch.log_softmax(rt.model.logits(x[0]).double(), dim=-1)[len(prompt_ids) - 1:-1]
    for step, top in enumerate(guided.top_logprobs):
        assert_alternatives(top, logp[step], 4)


def test_equal_logits_at_the_edge_go_to_lower_ids_whatever_the_batch():
    V = 12
    logits = torch.full((3, V), -5.0)
    logits[0, [9, 2, 7, 4]] = torch.tensor([3.0, 1.0, 1.0, 1.0])  # three equal after the best
    logits[1, 6] = 2.0
    logits[2] = torch.linspace(0, 1, V)
    both = top_alternatives(logits, [3, 0, 5])
    assert [i for i, _ in both[0]] == [9, 2, 4] and both[1] is None
    assert [i for i, _ in both[2]] == [11, 10, 9, 8, 7]
    alone = top_alternatives(logits[:1].clone(), [3])
    assert alone[0] == both[0]
    lse = float(torch.logsumexp(logits[0].double(), dim=0))
    assert [lp for _, lp in both[0]] == pytest.approx([3.0 - lse, 1.0 - lse, 1.0 - lse], abs=1e-6)
    for row, n in ((0, 3), (0, 1), (1, 4), (2, 5), (2, V)):  # the torch selection (GPU rows) agrees with numpy's
        assert _top_ids_torch(logits[row], n).tolist() == _top_ids(logits[row].numpy(), n).tolist()
    everything = top_alternatives(logits, [0, 0, V + 5])[2]  # more than the vocabulary: all of it
    assert [i for i, _ in everything] == list(range(V - 1, -1, -1))
    assert math.fsum(math.exp(lp) for _, lp in everything) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("bad", [-1, 21, 2.5, True, "3", [1, 2]])
def test_bad_top_logprobs_are_refused_and_nothing_changes(tiny, bad):
    rt, _, _ = tiny
    before = rt.generate(PROMPTS[1], max_new_tokens=4, sampling=Sampling(temperature=0), top_logprobs=2)
    with pytest.raises(ValueError, match="top_logprobs"):
        rt.generate(PROMPTS[1], max_new_tokens=4, top_logprobs=bad)
    with pytest.raises(ValueError, match="top_logprobs"):
        rt.generate_batch(PROMPTS, max_new_tokens=4, top_logprobs=[2, 2, 2] if isinstance(bad, list) else bad)
    with pytest.raises(ValueError, match="top_logprobs"):
        rt.stream(PROMPTS[1], max_new_tokens=4, top_logprobs=bad)
    after = rt.generate(PROMPTS[1], max_new_tokens=4, sampling=Sampling(temperature=0), top_logprobs=2)
    assert after.token_ids == before.token_ids and after.top_logprobs == before.top_logprobs


def test_cli_json_top_logprobs(tiny, capsys):
    rt, _, directory = tiny
    args = ["generate", "--model", str(directory), "--prompt", "hello fox", "--max-new-tokens", "5",
            "--temperature", "0.9", "--seed", "3", "--threads", "1"]
    assert main([*args, "--json", "--top-logprobs", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    gen = rt.generate([{"role": "user", "content": "hello fox"}], max_new_tokens=5,
                      sampling=Sampling(temperature=0.9, seed=3), top_logprobs=3)
    assert out["token_ids"] == gen.token_ids
    assert [[(e["id"], e["logprob"]) for e in step] for step in out["top_logprobs"]] == \
        [[(i, pytest.approx(lp, rel=1e-9)) for i, lp in step] for step in gen.top_logprobs]
    assert all(e["token"] == rt.tokenizer.token_bytes(e["id"]).decode("utf-8", errors="replace")
               for step in out["top_logprobs"] for e in step)
    assert main([*args, "--json"]) == 0
    assert "top_logprobs" not in json.loads(capsys.readouterr().out)
    assert main([*args, "--top-logprobs", "3"]) == 2
    assert "--top-logprobs needs --json" in capsys.readouterr().err


def test_token_bytes_byte_level(tmp_path):
    from tokenizers import pre_tokenizers

    from lenvm_rt.tokenizer import _BYTE_OF_SYMBOL

    assert set(_BYTE_OF_SYMBOL) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(_BYTE_OF_SYMBOL.values()) == list(range(256))
    make_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    text = "the fox \u20ac caf\u00e9 \U0001f600\n\tend"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    assert any(len(p) and not _utf8(p) for p in pieces)  # a piece of a multi-byte character stays that piece
    assert tok.token_bytes(tok.eos_token_id) == tok.eos_token.encode("utf-8")
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="token id"):
            tok.token_bytes(bad)
    assert tok.token_bytes(tok.vocab_size + 3) == b"" == tok.decode([tok.vocab_size + 3]).encode()  # padded vocab
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")  # still usable


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_token_bytes_byte_fallback_and_plain_pieces(tmp_path):
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models

    fast = Fast(models.WordLevel({"<0xE2>": 0, "\u2581hi": 1, "[UNK]": 2, "<0xZZ>": 3}, unk_token="[UNK]"))
    fast.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    fast.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    assert tok.token_bytes(0) == b"\xe2"
    assert tok.token_bytes(1) == tok.decode([1], skip_special_tokens=False).encode("utf-8") == b"hi"
    assert tok.token_bytes(3) == tok.decode([3], skip_special_tokens=False).encode("utf-8")  # not a byte token
