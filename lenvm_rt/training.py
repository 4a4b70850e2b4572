"""What both training modes share: examples with dense targets, the schedule, validation metrics, saving.

    split = load_split(rollouts_dir, runtime, gamma, censoring)   # Split: examples + censoring counts
    lr_at(step, total, warmup, peak)                              # linear warm-up, then cosine to 0
    metrics = validation_metrics(split, z_per_example, gamma)     # loss, prompt-boundary MRE, position errors
    save_head(head_tensors, out_dir, gamma, manifest)             # LenVM head format + lenvm_config + manifest

Validation (LENVM.md §5): `loss` is the token-mean ½·MSE of −σ(z) against the targets (fp64);
`mre` is the prompt-boundary error |l̂ − L_GT| / L_GT per prompt, L_GT = ln(1 − mean_i(1 − γ^{L_i}))/ln γ over
the prompt's completions (a cut completion counts with its cap, a lower bound; the share is reported);
`position_rel_error` is |l̂_i − (L − i)| / (L − i) at i = ⌊q·L⌋ for q in 0, .25, .5, .75 over completions that ended.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .rollouts import Rollout, read_rollouts
from .targets import dense_targets
from .value_math import check_gamma
from .value_model import LENVM_CONFIG_FILE, VALUE_HEAD_FILE

POSITIONS = (0.0, 0.25, 0.5, 0.75)
MANIFEST_FILE = "manifest.json"


@dataclass
class Example:
    rollout: Rollout
    targets: np.ndarray  # float64 [length + 1]
    mask: np.ndarray  # bool [length + 1]


@dataclass
class Split:
    directory: Path
    manifest: dict[str, Any]
    examples: list[Example]
    censored: int = 0
    dropped: int = 0  # completions with no trainable state (cut before the censoring horizon)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return int(sum(e.mask.sum() for e in self.examples))


def read_split(directory: str | os.PathLike[str], fingerprint: str) -> tuple[dict[str, Any], list[Rollout]]:
    """Rollouts checked against the policy's tokenizer; ValueError when they cannot be trained on."""
    manifest, rollouts = read_rollouts(directory)
    if manifest.get("tokenizer") != fingerprint:
        raise ValueError(f"{directory}: these rollouts were made with a different tokenizer than the policy's; "
                         "a LenVM must share its policy's vocabulary (LENVM.md §2)")
    if not rollouts:
        raise ValueError(f"{directory} holds no completions")
    for r in rollouts:
        if not r.completion_ids or r.finish_reason not in ("stop", "length"):
            raise ValueError(f"{directory}: prompt {r.id!r} sample {r.sample} has no finished completion")
    return manifest, rollouts


def load_split(directory: str | os.PathLike[str], fingerprint: str, gamma: float, censoring: str) -> Split:
    manifest, rollouts = read_split(directory, fingerprint)
    split = Split(Path(directory), manifest, [])
    for r in rollouts:
        targets, mask = dense_targets(r.length, r.finish_reason or "", gamma, censoring=censoring)
        split.censored += r.finish_reason == "length"
        if not mask.any():
            split.dropped += 1
            continue
        split.examples.append(Example(r, targets, mask))
    if not split.examples:
        raise ValueError(f"{directory}: no completion has a trainable state (all were cut before the censoring "
                         "horizon; raise --max-tokens of the rollouts or lower γ)")
    split.stats = {"completions": len(rollouts), "prompts": len({r.id for r in rollouts}),
                   "censored": split.censored, "dropped": split.dropped, "positions": split.positions}
    return split


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Learning rate at update `step` (0-based): linear warm-up over `warmup` updates, then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def half_mse(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed ½·(−σ(z) − G)² in fp64 (callers divide by the batch's token count)."""
    return 0.5 * (-torch.sigmoid(z.double()) - targets.double()).square().sum()


def predicted_remaining(z: np.ndarray, gamma: float) -> np.ndarray:
    """l̂ = softplus(z)/(−ln γ), in float64."""
    z = np.asarray(z, dtype=np.float64)
    return np.logaddexp(0.0, z) / -math.log(gamma)


def validation_metrics(split: Split, z: Sequence[np.ndarray], gamma: float) -> dict[str, Any]:
    """Metrics of per-example logits z[e] (float [length + 1]) against the split's targets."""
    check_gamma(gamma)
    loss_sum, count = 0.0, 0
    for e, ze in zip(split.examples, z):
        v = -1.0 / (1.0 + np.exp(-np.asarray(ze, dtype=np.float64)))
        loss_sum += float(0.5 * np.square(v - e.targets)[e.mask].sum())
        count += int(e.mask.sum())
    by_prompt: dict[str, list[tuple[Example, float]]] = {}
    for e, ze in zip(split.examples, z):
        by_prompt.setdefault(e.rollout.id, []).append((e, float(ze[0])))
    errors, domains = [], {}
    for rows in by_prompt.values():
        u = np.mean([1.0 - gamma ** r[0].rollout.length for r in rows])
        truth = math.log(1.0 - u) / math.log(gamma)
        err = abs(float(predicted_remaining(np.array([rows[0][1]]), gamma)[0]) - truth) / truth
        errors.append(err)
        domains.setdefault(rows[0][0].rollout.domain, []).append(err)
    position: dict[str, float] = {}
    for q in POSITIONS:
        rel = []
        for e, ze in zip(split.examples, z):
            if e.rollout.finish_reason != "stop":
                continue
            i = int(q * e.rollout.length)
            left = e.rollout.length - i
            if left > 0:
                rel.append(abs(float(predicted_remaining(np.array([ze[i]]), gamma)[0]) - left) / left)
        position[f"{int(q * 100)}%"] = float(np.mean(rel)) if rel else float("nan")
    return {
        "loss": loss_sum / max(count, 1),
        "mre": float(np.mean(errors)),
        "mre_median": float(np.median(errors)),
        "mre_by_domain": {d: float(np.mean(v)) for d, v in sorted(domains.items())},
        "prompts": len(errors),
        "position_rel_error": position,
    }


def save_head(head: dict[str, torch.Tensor], out_dir: str | os.PathLike[str], gamma: float,
              manifest: dict[str, Any]) -> Path:
    """Write value_head.safetensors (LENVM.md §2 keys, γ in its metadata), lenvm_config.json, manifest.json."""
    from safetensors.torch import save_file

    keys = {"v_head.fc.weight", "v_head.fc.bias", "v_head.summary.weight", "v_head.summary.bias"}
    if set(head) != keys:
        raise ValueError(f"a value head has exactly {sorted(keys)}; got {sorted(head)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in head.items()}
    save_file(tensors, str(out / VALUE_HEAD_FILE), metadata={"gamma": repr(float(gamma))})
    (out / LENVM_CONFIG_FILE).write_text(json.dumps({"gamma": float(gamma)}, indent=2) + "\n", encoding="utf-8")
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out
