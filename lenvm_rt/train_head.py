"""Head-only value pretraining on the frozen policy trunk (configuration b, LENVM.md §3, §4.7).

    result = train_head(runtime, "runs/train", "runs/heldout", "heads/h1", TrainSettings(epochs=8))
    # -> heads/h1/value_head.safetensors (+ lenvm_config.json, manifest.json); load it with
    #    load(policy, value_model="heads/h1")

The trunk is frozen, so each state's final-normed hidden state is computed once: the rollouts'
captured hidden.f16 when they have it, otherwise one prefill per completion into
<out>/features-<train|val>.f16. Epochs then only run the head z = W2·SiLU(W1·h + b1) + b2.
Updates take `batch` completions, shuffled per epoch, with the token-mean ½·MSE of −σ(z) against the
dense targets in fp64, AdamW, gradient clipping, and a linear warm-up into a cosine schedule. After
every epoch the validation metrics are computed and a checkpoint is written; resume=True continues
from it.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .rollouts import HIDDEN_FILE
from .runtime import Runtime
from .targets import CENSORING_MODES, GAMMA_RULE, choose_gamma
from .tokenizer import tokenizer_fingerprint
from .training import Split, half_mse, load_split, lr_at, read_split, save_head, validation_metrics
from .value_math import check_gamma

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "lenvm_rt.value_head/1"


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 16
    batch: int = 32  # completions per update
    lr: float = 2e-3
    warmup: float = 0.05  # share of the updates
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gamma: float | None = None  # None: targets.choose_gamma on the training completions
    censoring: str = "censor"
    seed: int = 0

    def check(self) -> None:
        for name in ("epochs", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                    and value > 0):
                raise ValueError(f"{name} must be a positive number; got {value!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"weight_decay must be a number >= 0; got {self.weight_decay!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a share of the updates in [0, 1); got {self.warmup!r}")
        if self.gamma is not None:
            check_gamma(self.gamma)
        if self.censoring not in CENSORING_MODES:
            raise ValueError(f"censoring must be one of {CENSORING_MODES}; got {self.censoring!r}")


class ValueHead(nn.Module):
    """z = summary(SiLU(fc(h))) on final-normed hidden states h[..., H] -> z[...]."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)
        self.summary = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.summary(torch.nn.functional.silu(self.fc(h))).squeeze(-1)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {f"v_head.{name}": t for name, t in self.state_dict().items()}


def split_features(runtime: Runtime, split: Split, cache: Path, *, progress: bool) -> list[np.ndarray]:
    """Final-normed hidden states float16 [length + 1, D] of every example of the split."""
    D = runtime.config.hidden_size
    captured = split.directory / HIDDEN_FILE
    if split.manifest.get("settings", {}).get("capture_hidden") and captured.is_file():
        rows = np.memmap(captured, dtype=np.float16, mode="r").reshape(-1, D)
        need = max(e.rollout.hidden + e.rollout.length + 1 for e in split.examples if e.rollout.hidden is not None)
        if all(e.rollout.hidden is not None for e in split.examples) and rows.shape[0] >= need:
            return [rows[e.rollout.hidden:e.rollout.hidden + e.rollout.length + 1] for e in split.examples]
    return _computed_features(runtime, split, cache, progress=progress)


def _computed_features(runtime: Runtime, split: Split, cache: Path, *, progress: bool) -> list[np.ndarray]:
    """Prefill features, cached in `cache` beside a key of the rollouts and the policy that made them."""
    from tqdm.auto import tqdm

    D, model = runtime.config.hidden_size, runtime.model
    sizes = [e.rollout.length + 1 for e in split.examples]
    total = sum(sizes)
    key_file = cache.with_suffix(".json")
    key = {"rollouts": split.manifest.get("resume_key"), "policy": str(Path(runtime.directory).resolve()),
           "tokenizer": tokenizer_fingerprint(runtime.tokenizer), "rows": total, "dtype": str(runtime.dtype)}
    fresh = cache.is_file() and key_file.is_file() and json.loads(key_file.read_text(encoding="utf-8")) == key
    if not fresh:
        key_file.unlink(missing_ok=True)
        out = np.memmap(cache.with_suffix(".partial"), dtype=np.float16, mode="w+", shape=(total, D))
        offset = 0
        with torch.inference_mode():
            for e in tqdm(split.examples, desc=f"hidden states ({cache.stem})", disable=not progress):
                ids = e.rollout.prompt_ids + e.rollout.completion_ids
                model.allocate(batch=1, capacity=len(ids))
                x = model.prefill(torch.tensor([ids], device=model.device), [len(ids)], all_positions=True)[0]
                hn = model.normed(x[len(e.rollout.prompt_ids) - 1:])
                out[offset:offset + hn.shape[0]] = hn.to(torch.float16).cpu().numpy()
                offset += hn.shape[0]
        out.flush()
        del out
        cache.with_suffix(".partial").replace(cache)
        key_file.write_text(json.dumps(key), encoding="utf-8")
    rows = np.memmap(cache, dtype=np.float16, mode="r").reshape(total, D)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [rows[starts[i]:starts[i + 1]] for i in range(len(sizes))]


def _flatten(split: Split, feats: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Masked rows of every example: features [N, D] fp16, targets [N] fp64, example start offsets."""
    xs = [f[e.mask] for e, f in zip(split.examples, feats)]
    ts = [e.targets[e.mask] for e in split.examples]
    starts = np.concatenate([[0], np.cumsum([len(t) for t in ts])])
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ts)), starts


def predict_logits(head: ValueHead, feats: list[np.ndarray], chunk: int = 8192) -> list[np.ndarray]:
    """Head logits z for every row of every example (float64 arrays)."""
    sizes = [f.shape[0] for f in feats]
    flat = torch.from_numpy(np.concatenate(feats))
    out = []
    with torch.no_grad():
        for i in range(0, flat.shape[0], chunk):
            out.append(head(flat[i:i + chunk].float()).double())
    z = torch.cat(out).numpy()
    return np.split(z, np.cumsum(sizes)[:-1])


def train_head(runtime: Runtime, train_dir: str | os.PathLike[str], val_dir: str | os.PathLike[str],
               out_dir: str | os.PathLike[str], settings: TrainSettings = TrainSettings(), *,
               resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, validate every epoch, save the head; returns the manifest."""
    from tqdm.auto import tqdm

    settings.check()
    fingerprint = tokenizer_fingerprint(runtime.tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gamma = settings.gamma
    if gamma is None:
        gamma = choose_gamma(read_split(train_dir, fingerprint)[1])
    train = load_split(train_dir, fingerprint, gamma, settings.censoring)
    val = load_split(val_dir, fingerprint, gamma, settings.censoring)
    checkpoint = out / CHECKPOINT_FILE
    run_key = {"settings": asdict(settings), "gamma": gamma, "train": train.manifest["resume_key"],
               "val": val.manifest["resume_key"], "policy": str(Path(runtime.directory).resolve())}
    state = None
    if resume and checkpoint.is_file():  # checked before any feature work, so a mismatch fails fast
        state = torch.load(checkpoint, weights_only=False)
        if state["run_key"] != run_key:
            raise ValueError(f"{checkpoint} belongs to another run (other data or settings); use a new --out")
    x_train, t_train, starts = _flatten(train, split_features(runtime, train, out / "features-train.f16",
                                                              progress=progress))
    val_feats = split_features(runtime, val, out / "features-val.f16", progress=progress)

    torch.manual_seed(settings.seed)
    head = ValueHead(runtime.config.hidden_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    per_epoch = math.ceil(len(train.examples) / settings.batch)
    total = per_epoch * settings.epochs
    warmup = max(1, int(settings.warmup * total))
    history: list[dict[str, Any]] = []
    first_epoch = 0
    if state is not None:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        history, first_epoch = state["history"], state["epoch"]
    rng = np.random.default_rng(settings.seed)
    for _ in range(first_epoch):
        rng.permutation(len(train.examples))  # the same shuffles as an uninterrupted run
    bar = tqdm(total=total, initial=first_epoch * per_epoch, desc="train head", unit="update", disable=not progress)
    for epoch in range(first_epoch, settings.epochs):
        order = rng.permutation(len(train.examples))
        train_loss, train_count = 0.0, 0
        for b in range(per_epoch):
            step = epoch * per_epoch + b
            chosen = order[b * settings.batch:(b + 1) * settings.batch]
            rows = torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in chosen]))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, settings.lr)
            loss_sum = half_mse(head(x_train[rows].float()), t_train[rows])
            loss = loss_sum / rows.numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), settings.grad_clip)
            optimizer.step()
            train_loss, train_count = train_loss + float(loss_sum.detach()), train_count + rows.numel()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
        metrics = validation_metrics(val, predict_logits(head, val_feats), gamma)
        history.append({"epoch": epoch + 1, "train_loss": train_loss / train_count, "val": metrics})
        if progress:
            bar.write(f"epoch {epoch + 1}: train loss {train_loss / train_count:.5f}  val loss {metrics['loss']:.5f}  "
                      f"MRE {metrics['mre']:.3f}  {json.dumps(metrics['mre_by_domain'])}", file=sys.stderr)
        torch.save({"run_key": run_key, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                    "history": history, "epoch": epoch + 1}, checkpoint)
    bar.close()
    manifest = {
        "format": FORMAT, "mode": "head", "policy": str(runtime.directory), "tokenizer": fingerprint,
        "gamma": gamma, "gamma_rule": "given" if settings.gamma is not None else GAMMA_RULE,
        "settings": asdict(settings),
        "data": {"train": {"rollouts": str(train.directory), **train.stats, **_rollout_settings(train)},
                 "val": {"rollouts": str(val.directory), **val.stats, **_rollout_settings(val)}},
        "history": history, "final": history[-1]["val"] if history else None,
    }
    save_head(head.checkpoint_tensors(), out, gamma, manifest)
    return manifest


def _rollout_settings(split: Split) -> dict[str, Any]:
    return {"rollout_settings": split.manifest.get("settings"), "resume_key": split.manifest.get("resume_key")}
