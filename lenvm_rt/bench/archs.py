"""Real architectures' shapes for benchmarks with random weights (the public config.json of each model).

    ARCHS[name] -> config.json fields; write_random_checkpoint(directory, config, dtype, seed) -> a safetensors
    checkpoint of such a config with random weights (no tokenizer: for load_weights / CausalLM, not load()).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ARCHS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5},
    "qwen2.5-0.5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    "qwen2.5-1.5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                     "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
}


def write_random_checkpoint(directory: Path, cfg: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> Path:
    """config.json and model.safetensors (Hugging Face tensor names) of a Llama or Qwen2 config such as an ARCHS
    entry (untied LM heads are not written): random N(0, 0.02) weights and unit norms stored in `dtype`."""
    from safetensors.torch import save_file

    if cfg["model_type"] not in ("llama", "qwen2") or not cfg["tie_word_embeddings"]:
        raise ValueError("write_random_checkpoint writes tied Llama or Qwen2 checkpoints")
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    D, inner, heads, kv = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                           cfg["num_key_value_heads"])
    dh = D // heads

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(cfg["vocab_size"], D), "model.norm.weight": torch.ones(D, dtype=dtype)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(D, dtype=dtype)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(D, dtype=dtype)
        for proj, rows in (("q", heads * dh), ("k", kv * dh), ("v", kv * dh)):
            tensors[p + f"self_attn.{proj}_proj.weight"] = rand(rows, D)
            if cfg["model_type"] == "qwen2":
                tensors[p + f"self_attn.{proj}_proj.bias"] = rand(rows)
        tensors[p + "self_attn.o_proj.weight"] = rand(D, heads * dh)
        tensors[p + "mlp.gate_proj.weight"] = rand(inner, D)
        tensors[p + "mlp.up_proj.weight"] = rand(inner, D)
        tensors[p + "mlp.down_proj.weight"] = rand(D, inner)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {**cfg, "torch_dtype": str(dtype).removeprefix("torch."), "max_position_embeddings": 4096}
    (directory / "config.json").write_text(json.dumps(config))
    return directory
