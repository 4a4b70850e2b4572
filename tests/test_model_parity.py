"""The compact decoder against transformers on tiny random Llama, Qwen2 and Qwen3 checkpoints."""
from __future__ import annotations

import pytest
import torch
from checkpoints import make_checkpoint

import lenvm_rt
from lenvm_rt import Sampling

FAMILIES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in FAMILIES])
def checkpoint(request, tmp_path_factory):
    family, tied = request.param
    return make_checkpoint(tmp_path_factory.mktemp(family), family, tied=tied)


def _hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_logits_match_transformers_over_prefill_and_16_decode_steps(checkpoint):
    rt = lenvm_rt.load(checkpoint, device="cpu")
    hf = _hf_model(checkpoint)
    prompt = [5, 17, 42, 99, 3, 250, 7]
    steps = 16
    torch.manual_seed(0)
    forced = torch.randint(3, 300, (steps,)).tolist()  # decode arbitrary tokens, not just argmax
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + forced])).logits[0]  # [S, V]
    model = rt.model
    model.allocate(batch=1, capacity=64)
    worst = 0.0
    with torch.inference_mode():
        h = model.prefill(torch.tensor([prompt]), [len(prompt)])
        worst = max(worst, (model.logits(h)[0] - ref[len(prompt) - 1]).abs().max().item())
        for i, token in enumerate(forced):
            h = model.decode_step(torch.tensor([token]), [len(prompt) + i])
            worst = max(worst, (model.logits(h)[0] - ref[len(prompt) + i]).abs().max().item())
    assert worst <= 1e-4, f"max |logit diff| {worst:.3g}"


def test_greedy_matches_transformers_generate_for_32_tokens(checkpoint):
    rt = lenvm_rt.load(checkpoint, device="cpu")
    hf = _hf_model(checkpoint)
    prompt = [5, 17, 42, 99, 3]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ours = rt.generate(prompt, max_new_tokens=32, sampling=Sampling(temperature=0))
    # transformers was told to ignore EOS; compare up to our first stop
    assert ours.token_ids == ref[: ours.num_tokens]
    assert ours.num_tokens == 32 or ours.finish_reason == "stop"


def test_prefill_of_all_positions_matches_transformers(checkpoint):
    rt = lenvm_rt.load(checkpoint, device="cpu")
    hf = _hf_model(checkpoint)
    ids = torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]])
    with torch.no_grad():
        ref = hf(ids).logits[0]
    rt.model.allocate(batch=1, capacity=32)
    with torch.inference_mode():
        ours = rt.model.logits(rt.model.prefill(ids, [ids.shape[1]], all_positions=True))[0]
    assert (ours - ref).abs().max().item() <= 1e-4
