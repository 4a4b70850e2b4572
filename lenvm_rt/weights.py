"""Checkpoint resolution and weight loading for Llama, Qwen2 and Qwen3 families.

resolve_checkpoint(name)   local directory, or a hub id fetched through huggingface_hub when online
read_config(dir)           ModelConfig from config.json, EOS ids merged from generation_config.json
load_weights(dir, cfg)     ModelWeights: tensors by explicit name map, shape-checked, on the target
                           device/dtype. q/k/v and gate/up are fused into one matrix each so a decode
                           step issues one GEMV per projection group; pack= turns each matrix into the
                           model's own form as soon as it is read (a CPU fp32 model's panels).

Only `.safetensors` is read (single file or sharded with `model.safetensors.index.json`), memory
mapped; pickled `.bin` checkpoints are refused because unpickling can run arbitrary code.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .safetensors_io import SafetensorsFile

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_checkpoint(name: str | os.PathLike[str]) -> Path:
    """Return a local checkpoint directory for a path or a Hugging Face hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; pass the checkpoint directory that holds config.json")
        return path
    text = str(name)
    if not text or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ValueError(f"checkpoint directory {text!r} does not exist")
    return _download_from_hub(text)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:
        raise ValueError(
            f"{repo_id!r} is not a local directory; to fetch it from the Hugging Face Hub install "
            "the hub extra (pip install 'lenvm_rt[hub]')"
        ) from exc
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise ValueError(
            f"{repo_id!r} is not a local directory and the Hugging Face Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE is set) and it is not in the local hub cache; download the "
            "checkpoint on a machine with network access and pass its directory"
        ) from exc
    except Exception as exc:  # network and repository errors come in many types
        raise ValueError(f"could not fetch {repo_id!r} from the Hugging Face Hub: {exc}") from exc


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_config(directory: Path) -> ModelConfig:
    """ModelConfig of a checkpoint directory; EOS ids are the union of config and generation config."""
    if not any(directory.iterdir()):
        raise ValueError(f"{directory} is empty; expected a Hugging Face checkpoint directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory} has no config.json; expected a Hugging Face checkpoint directory")
    raw = read_json(config_path)
    generation = directory / "generation_config.json"
    if generation.is_file():
        gen = read_json(generation)
        eos = gen.get("eos_token_id")
        merged = [raw.get("eos_token_id"), eos]
        ids: list[int] = []
        for item in merged:
            for v in item if isinstance(item, list) else [item]:
                if isinstance(v, int) and v not in ids:
                    ids.append(v)
        raw = {**raw, "eos_token_id": ids}
    return ModelConfig.from_hf(raw)


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files; refuses pickled checkpoints with a clear message."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: missing or empty weight_map")
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{directory}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(p for p in directory.glob("*.safetensors") if p.name != "value_head.safetensors")
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ValueError(
            f"{directory} holds only pickled weights ({', '.join(pickled)}); lenvm_rt loads .safetensors "
            "only, since unpickling can run arbitrary code. Convert it once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
        )
    raise ValueError(f"{directory} has no *.safetensors weight files")


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [D]
    qkv: torch.Tensor  # [(H + 2*Hkv) * Dh, D]
    qkv_bias: torch.Tensor | None  # [(H + 2*Hkv) * Dh]
    q_norm: torch.Tensor | None  # [Dh] (Qwen3)
    k_norm: torch.Tensor | None  # [Dh] (Qwen3)
    o: torch.Tensor  # [D, H * Dh]
    o_bias: torch.Tensor | None  # [D]
    post_norm: torch.Tensor  # [D]
    gate_up: torch.Tensor  # [2 * I, D]
    gate_up_bias: torch.Tensor | None  # [2 * I]
    down: torch.Tensor  # [D, I]
    down_bias: torch.Tensor | None  # [D]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, D] (a CPU fp32 CausalLM holds its layers' matrices and LM head as cpu_ops.PanelWeight)
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]; the same tensor as embed when tied

    def matrices(self) -> list[torch.Tensor]:
        """Every weight matrix a decode step reads (the embedding row gather excluded)."""
        out = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return out + ([self.lm_head] if self.lm_head.numel() else [])


class _TensorSource:
    """Looks tensors up across shards, checks shapes and tracks which names were used."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, SafetensorsFile] = {}
        for path in files:
            shard = SafetensorsFile(path)
            for name in shard.names():
                self._where[name] = shard
        self.used: set[str] = set()
        self.files = files

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        shard = self._where.get(name)
        if shard is None:
            where = self.files[0].parent
            raise ValueError(f"{where}: missing tensor {name!r} (expected shape {list(shape)})")
        got = shard.shape(name)
        if got != shape:
            raise ValueError(f"{shard.path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
        self.used.add(name)
        return shard.get(name)

    def unexpected(self) -> list[str]:
        return sorted(n for n in self._where if n not in self.used and not n.endswith(_IGNORED_SUFFIXES))


def load_weights(directory: Path, cfg: ModelConfig, *, device: torch.device, dtype: torch.dtype,
                 with_lm_head: bool = True, pack: Callable[[torch.Tensor], Any] | None = None) -> ModelWeights:
    """Read, check and place every tensor; ValueError names a missing, misshapen or unexpected tensor.

    with_lm_head=False skips an untied LM head (a separate LenVM backbone never runs it, LENVM.md §2);
    `ModelWeights.lm_head` is then an empty tensor. `pack` (model.panel_packer) turns each layer matrix and
    the LM head into the form the model keeps as soon as it is read, so that the whole model never exists in
    `dtype` at once (a bfloat16 checkpoint loaded for a CPU fp32 model peaks at its packed size, not twice it);
    with it an untied bfloat16 / float16 embedding stays in its stored dtype (the model widens the rows it
    gathers).
    """
    src = _TensorSource(safetensors_files(directory))
    D, dh, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * dh, cfg.num_kv_heads * dh

    def put(t: torch.Tensor) -> torch.Tensor:
        # A CPU tensor already in the target dtype stays a zero-copy view of the mapped file.
        return t.to(device=device, dtype=dtype)

    def fused(*parts: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.to(dtype=dtype) for p in parts]).to(device)

    def kept(matrix: torch.Tensor) -> Any:
        return matrix if pack is None else pack(matrix)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        qkv_names = [(a + "q_proj", q_out), (a + "k_proj", kv_out), (a + "v_proj", kv_out)]
        qkv = kept(fused(*(src.get(n + ".weight", (rows, D)) for n, rows in qkv_names)))
        qkv_bias = fused(*(src.get(n + ".bias", (rows,)) for n, rows in qkv_names)) if cfg.qkv_bias else None
        gate_up = kept(fused(src.get(m + "gate_proj.weight", (inter, D)), src.get(m + "up_proj.weight", (inter, D))))
        gate_up_bias = None
        down_bias = None
        if cfg.mlp_bias:
            gate_up_bias = fused(src.get(m + "gate_proj.bias", (inter,)), src.get(m + "up_proj.bias", (inter,)))
            down_bias = put(src.get(m + "down_proj.bias", (D,)))
        layers.append(LayerWeights(
            input_norm=put(src.get(p + "input_layernorm.weight", (D,))),
            qkv=qkv,
            qkv_bias=qkv_bias,
            q_norm=put(src.get(a + "q_norm.weight", (dh,))) if cfg.qk_norm else None,
            k_norm=put(src.get(a + "k_norm.weight", (dh,))) if cfg.qk_norm else None,
            o=kept(put(src.get(a + "o_proj.weight", (D, q_out)))),
            o_bias=put(src.get(a + "o_proj.bias", (D,))) if cfg.o_bias else None,
            post_norm=put(src.get(p + "post_attention_layernorm.weight", (D,))),
            gate_up=gate_up,
            gate_up_bias=gate_up_bias,
            down=kept(put(src.get(m + "down_proj.weight", (D, inter)))),
            down_bias=down_bias,
        ))
    vocab = (cfg.vocab_size, D)
    embed_name, head_name = "model.embed_tokens.weight", "lm_head.weight"
    if cfg.tie_word_embeddings:
        # Some tied checkpoints store only lm_head.weight (or both); either serves as the embedding.
        name = embed_name if src.has(embed_name) or not src.has(head_name) else head_name
        embed = kept(put(src.get(name, vocab)))  # the packed head serves as the embedding too
        if src.has(head_name):
            src.get(head_name, vocab)
        lm_head = embed
    else:
        embed = src.get(embed_name, vocab)
        if pack is None or embed.dtype not in (torch.bfloat16, torch.float16):
            embed = put(embed)  # else a packing model reads a few rows per step: they stay as stored (16 bits)
        lm_head = (kept(put(src.get(head_name, vocab))) if with_lm_head
                   else torch.empty(0, device=device, dtype=dtype))
        src.used.add(head_name)
    final_norm = put(src.get("model.norm.weight", (D,)))
    extra = src.unexpected()
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ValueError(f"{directory}: unexpected tensors for model_type {cfg.model_type!r}: {shown}")
    return ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)
