"""The transformers adapter drives a real transformers model and agrees with Runtime.generate."""
from __future__ import annotations

import pytest
import torch
from checkpoints import make_checkpoint, make_value_head

import lenvm_rt
from lenvm_rt import LengthTarget, Sampling
from lenvm_rt.hf import LengthGuidanceLogitsProcessor


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    policy = make_checkpoint(root / "policy", "llama", seed=1)
    value = make_checkpoint(root / "lenvm", "llama", seed=2)
    make_value_head(value / "value_head.safetensors", 64, gamma=0.97, seed=3)
    return policy, value


@pytest.mark.parametrize(("length", "tilt"), [(LengthTarget.equal(7), None), (LengthTarget.at_least(5, "strict"), None),
                                              (LengthTarget.at_most(9, "band"), None),
                                              (LengthTarget.at_least(4, "band"), None), (None, -3.0)])
def test_transformers_generate_with_the_processor_matches_the_runtime(dirs, length, tilt):
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    policy, value = dirs
    hf = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    proc = LengthGuidanceLogitsProcessor(value, length=length, tilt=tilt, top_k=6, seed=4, policy_tokenizer=policy)
    prompt = [5, 17, 42, 99, 3]
    rt = lenvm_rt.load(policy, value_model=value, device="cpu")
    want = rt.generate(prompt, max_new_tokens=16, sampling=Sampling(temperature=1.0, top_k=6, seed=4),
                       length=length, tilt=tilt).token_ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), logits_processor=LogitsProcessorList([proc]), do_sample=False,
                          max_new_tokens=16, eos_token_id=sorted(rt.eos_token_ids), pad_token_id=0)
    assert out[0, len(prompt):].tolist()[: len(want)] == want
    # a second generate call starts over: the processor rebuilds its cache
    with torch.no_grad():
        again = hf.generate(torch.tensor([prompt]), logits_processor=LogitsProcessorList([proc]),
                            do_sample=False, max_new_tokens=16, eos_token_id=sorted(rt.eos_token_ids), pad_token_id=0)
    assert torch.equal(out, again)


def test_processor_refuses_a_head_only_file_and_no_guidance(dirs, tmp_path):
    head = make_value_head(tmp_path / "value_head.safetensors", 64, gamma=0.9)
    with pytest.raises(ValueError, match="needs a separate LenVM"):
        LengthGuidanceLogitsProcessor(head, length=LengthTarget.equal(3))
    with pytest.raises(ValueError, match="pass length="):
        LengthGuidanceLogitsProcessor(dirs[1])
