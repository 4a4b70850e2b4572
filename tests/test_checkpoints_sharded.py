"""Sharded safetensors checkpoints load like single-file ones."""
from __future__ import annotations

import torch
from checkpoints import make_checkpoint

import lenvm_rt
from lenvm_rt import Sampling


def test_sharded_checkpoint_equals_single_file(tmp_path):
    from transformers import AutoModelForCausalLM

    single = make_checkpoint(tmp_path / "single", "llama")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (sharded / name).write_bytes((single / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = lenvm_rt.load(single, device="cpu").generate([4, 5, 6], max_new_tokens=12, sampling=Sampling(temperature=0))
    b = lenvm_rt.load(sharded, device="cpu").generate([4, 5, 6], max_new_tokens=12, sampling=Sampling(temperature=0))
    assert a.token_ids == b.token_ids
