"""LenVM checkpoints: the value head file, γ, and the two configurations (LENVM.md §2, §4.7).

A value model is given as one of
  * a directory with a Hugging Face backbone (config.json, *.safetensors, tokenizer) plus
    `value_head.safetensors`: a separate LenVM beside the policy (configuration a, the paper's);
  * a `value_head.safetensors` file, or a directory holding only it (and optionally
    `lenvm_config.json`): a head on the policy's own trunk (configuration b, shared trunk).

`value_head.safetensors` holds exactly v_head.fc.weight [H, H], v_head.fc.bias [H],
v_head.summary.weight [1, H], v_head.summary.bias [1]; anything else is refused, as are NaN or inf
weights. γ is checkpoint metadata: the safetensors `__metadata__["gamma"]`, or `gamma` in
`lenvm_config.json`; a checkpoint without it must be given γ explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .safetensors_io import SafetensorsFile
from .tokenizer import Tokenizer
from .value_math import check_gamma
from .weights import read_json

VALUE_HEAD_FILE = "value_head.safetensors"
LENVM_CONFIG_FILE = "lenvm_config.json"


@dataclass
class ValueHeadWeights:
    """z = w2 · SiLU(w1 @ hn + b1) + b2 on the final-normed hidden state hn."""

    w1: torch.Tensor  # [H, H]
    b1: torch.Tensor  # [H]
    w2: torch.Tensor  # [1, H]
    b2: torch.Tensor  # [1]


@dataclass(frozen=True)
class ValueModelSource:
    head_file: Path
    backbone: Path | None  # None: shared trunk (the head runs on the policy's hidden states)


def locate(path: str | Path) -> ValueModelSource:
    """Decide the configuration from what the path holds."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"{p}: a value head must be a .safetensors file ({VALUE_HEAD_FILE})")
        return ValueModelSource(head_file=p, backbone=None)
    if not p.is_dir():
        raise ValueError(f"value model {str(path)!r} does not exist")
    head = p / VALUE_HEAD_FILE
    if not head.is_file():
        raise ValueError(f"{p} has no {VALUE_HEAD_FILE}; a LenVM checkpoint is a backbone directory plus "
                         f"{VALUE_HEAD_FILE}, or the head file alone for the policy's own trunk")
    return ValueModelSource(head_file=head, backbone=p if (p / "config.json").is_file() else None)


def read_gamma(source: ValueModelSource, explicit: float | None) -> float:
    """γ from the explicit argument, else the checkpoint's metadata; ValueError when neither has it."""
    if explicit is not None:
        return check_gamma(explicit)
    stored = SafetensorsFile(source.head_file).metadata.get("gamma")
    config = source.head_file.parent / LENVM_CONFIG_FILE
    if stored is None and config.is_file():
        stored = read_json(config).get("gamma")
    if stored is None:
        raise ValueError(
            f"{source.head_file} does not record its discount γ; pass it explicitly, e.g. "
            "load(policy, value_model=..., gamma=0.997) (γ is a property of how the head was trained)"
        )
    try:
        return check_gamma(float(stored))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source.head_file}: stored gamma {stored!r} is not a number in (0, 1)") from exc


def load_value_head(path: Path, hidden_size: int, *, device: torch.device, dtype: torch.dtype) -> ValueHeadWeights:
    """Strictly read a value head: exactly the four published keys, right shapes, finite values."""
    f = SafetensorsFile(path)
    expected = {
        "v_head.fc.weight": (hidden_size, hidden_size),
        "v_head.fc.bias": (hidden_size,),
        "v_head.summary.weight": (1, hidden_size),
        "v_head.summary.bias": (1,),
    }
    names = set(f.names())
    missing, extra = sorted(expected.keys() - names), sorted(names - expected.keys())
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else [])
        raise ValueError(f"{path}: value head keys do not match the LenVM format: {'; '.join(parts)}")
    tensors = {}
    for name, shape in expected.items():
        got = f.shape(name)
        if got != shape:
            raise ValueError(f"{path}: {name} has shape {list(got)}, expected {list(shape)} "
                             f"(hidden size {hidden_size})")
        t = f.get(name)
        bad = int((~torch.isfinite(t.float())).sum())
        if bad:
            raise ValueError(f"{path}: {name} holds {bad} NaN/inf values")
        tensors[name] = t.to(device=device, dtype=dtype)
    return ValueHeadWeights(w1=tensors["v_head.fc.weight"], b1=tensors["v_head.fc.bias"],
                            w2=tensors["v_head.summary.weight"], b2=tensors["v_head.summary.bias"])


def check_same_vocabulary(policy: Tokenizer, value: Tokenizer, policy_cfg: ModelConfig, value_cfg: ModelConfig) -> None:
    """The LenVM reads the policy's token ids, so both must share one vocabulary (LENVM.md §2)."""
    problems = []
    pv, vv = policy.vocab, value.vocab
    if pv != vv:
        only_p = sorted(set(pv) - set(vv))[:3]
        only_v = sorted(set(vv) - set(pv))[:3]
        moved = sorted(t for t in set(pv) & set(vv) if pv[t] != vv[t])[:3]
        detail = [f"{len(pv)} vs {len(vv)} tokens"]
        if only_p:
            detail.append(f"only in the policy: {only_p}")
        if only_v:
            detail.append(f"only in the value model: {only_v}")
        if moved:
            detail.append(f"different ids for {moved}")
        problems.append("vocabularies differ (" + "; ".join(detail) + ")")
    if policy_cfg.vocab_size != value_cfg.vocab_size:
        problems.append(f"embedding sizes differ ({policy_cfg.vocab_size} vs {value_cfg.vocab_size})")
    if policy.eos_token_id != value.eos_token_id or policy.bos_token != value.bos_token:
        problems.append(f"special tokens differ (eos {policy.eos_token_id} vs {value.eos_token_id}, "
                        f"bos {policy.bos_token!r} vs {value.bos_token!r})")
    if problems:
        raise ValueError("the value model does not share the policy's tokenizer: " + "; ".join(problems))

