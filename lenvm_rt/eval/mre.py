"""Prompt-boundary length prediction error (LENVM.md §5, paper Eqs. 13–15, Table 3).

    rows = read_records("heldout.jsonl", limit=50)               # "messages" | "prompt" | "question" rows
    record = run_mre(runtime, rows.items, "eval/mre", MRESettings(samples=8, max_tokens=512))

Per prompt: N completions sampled from the policy's own distribution (temperature 1, top-p 1, no top-k;
seeded per prompt and sample; `lenvm_rt.rollouts`, so an interrupted run resumes), lengths L_i with EOS
counted. Ground truth in the transformed space: L_GT = ln(1 − mean_i(1 − γ^{L_i}))/ln γ (≤ mean L_i,
Jensen). A completion cut at the cap counts with its cap (a lower bound); the cut share is reported.
Prediction l̂ = Runtime.predict_length(prompt). MRE = mean over prompts of |l̂ − L_GT|/L_GT.
Position errors: for completions that ended, |l̂_i − (L − i)|/(L − i) at state i = ⌊q·L⌋, q ∈ 0/25/50/75%
(state 0 ends at the last prompt token), from Runtime.token_values; the same rule as training validation.
Outputs in out_dir: mre.json (record with machine/versions), mre.png (predicted vs ground truth), rollouts/.
"""
from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..rollouts import PromptRecord, Rollout, RolloutSettings, read_rollouts, sample_rollouts
from ..runtime import Runtime
from ..training import POSITIONS
from ..value_math import check_gamma
from .data import Record, pyplot, save_figure


@dataclass(frozen=True)
class MRESettings:
    samples: int = 8
    max_tokens: int = 512
    batch: int = 16
    seed: int = 0
    positions: bool = True  # also measure errors along each completion (one forward per completion)

    def check(self) -> None:
        RolloutSettings(samples=self.samples, max_tokens=self.max_tokens, batch=self.batch, seed=self.seed).check()


def ground_truth_length(lengths: Sequence[int], gamma: float) -> float:
    """L_GT = ln(1 − mean(1 − γ^L))/ln γ over completion lengths (EOS counted), paper Eqs. 13–14.

    Evaluated as ln(mean γ^L)/ln γ with a log-sum-exp (the same number), so that 1 − γ^L rounding to 1
    for long completions cannot break it.
    """
    log_g = math.log(check_gamma(gamma))
    if not lengths:
        raise ValueError("ground_truth_length needs at least one completion length")
    if any(isinstance(n, bool) or not n >= 1 for n in lengths):
        raise ValueError(f"completion lengths must be >= 1 (EOS counted); got {list(lengths)}")
    logs = [n * log_g for n in lengths]  # ln γ^L_i
    top = max(logs)
    log_mean = top + math.log(sum(math.exp(x - top) for x in logs) / len(logs))
    return log_mean / log_g


def relative_error(predicted: float, truth: float) -> float:
    """|predicted − truth| / truth, for a positive truth."""
    if not truth > 0:
        raise ValueError(f"ground truth must be positive; got {truth!r}")
    return abs(predicted - truth) / truth


def mean_relative_error(predicted: Sequence[float], truths: Sequence[float]) -> float:
    """MRE = mean over prompts of |l̂ − L_GT| / L_GT (paper Eq. 15)."""
    if len(predicted) != len(truths) or not truths:
        raise ValueError("predicted and ground-truth lengths must be non-empty and of the same count")
    return statistics.fmean(relative_error(p, t) for p, t in zip(predicted, truths))


def position_errors(completions: Sequence[tuple[Sequence[float], int]]) -> dict[str, float | None]:
    """Mean |l̂_i − (L − i)|/(L − i) at i = ⌊q·L⌋ per q in POSITIONS (None where no completion counts).

    Each completion is (predicted remaining at states s_0 … s_L, L), for completions that ended with EOS.
    """
    out: dict[str, float | None] = {}
    for q in POSITIONS:
        rel = []
        for remaining, length in completions:
            i = int(q * length)
            if length - i > 0:
                rel.append(relative_error(remaining[i], length - i))
        out[f"{int(q * 100)}%"] = statistics.fmean(rel) if rel else None
    return out


def _complete_groups(rollouts: Sequence[Rollout], ids: set[str], samples: int) -> dict[str, list[Rollout]]:
    groups: dict[str, list[Rollout]] = {}
    for r in rollouts:
        if r.id in ids and r.sample < samples:
            groups.setdefault(r.id, []).append(r)
    return {k: sorted(v, key=lambda r: r.sample) for k, v in groups.items() if len(v) == samples}


def run_mre(runtime: Runtime, records: Sequence[Record], out_dir: str | os.PathLike[str], settings: MRESettings,
            *, progress: bool = True, skipped: Sequence[str] = ()) -> dict[str, Any]:
    """Sample (resumable), predict, score; writes mre.json and mre.png to out_dir and returns the record."""
    from ..bench.report import write_record

    settings.check()
    if not records:
        raise ValueError("no prompts to evaluate")
    if runtime.value is None:
        raise ValueError("length prediction needs a value model; pass --value-model")
    gamma = float(runtime.gamma)
    out = Path(out_dir)
    rollout_settings = RolloutSettings(samples=settings.samples, max_tokens=settings.max_tokens,
                                       batch=settings.batch, seed=settings.seed, capture_hidden=False)
    prompts = [PromptRecord(r.id, r.prompt, str(r.row.get("domain", "unknown")), "eval") for r in records]
    sample_rollouts(runtime, prompts, out / "rollouts", rollout_settings, progress=progress)
    groups = _complete_groups(read_rollouts(out / "rollouts")[1], {r.id for r in records}, settings.samples)
    kept = [r for r in records if r.id in groups]
    predicted: list[float] = []
    for start in range(0, len(kept), settings.batch):
        predicted += runtime.predict_length([r.prompt for r in kept[start:start + settings.batch]])
    per_prompt, along = [], []
    for rec, pred in zip(kept, predicted):
        rs = groups[rec.id]
        lengths = [r.length for r in rs]
        truth = ground_truth_length(lengths, gamma)
        per_prompt.append({"id": rec.id, "domain": rs[0].domain, "predicted": pred, "ground_truth": truth,
                           "rel_error": relative_error(pred, truth), "mean_length": statistics.fmean(lengths),
                           "lengths": lengths, "cut": sum(r.finish_reason == "length" for r in rs)})
        if settings.positions:
            for r in rs:
                if r.finish_reason == "stop":
                    tv = runtime.token_values(r.prompt_ids, r.completion_ids)
                    along.append(([tv.prompt_remaining] + tv.remaining, r.length))
    errors = [p["rel_error"] for p in per_prompt]
    domains: dict[str, list[float]] = {}
    for p in per_prompt:
        domains.setdefault(p["domain"], []).append(p["rel_error"])
    cut = sum(p["cut"] for p in per_prompt)
    completions = len(per_prompt) * settings.samples
    results = {
        "mre": mean_relative_error([p["predicted"] for p in per_prompt], [p["ground_truth"] for p in per_prompt]),
        "mre_median": statistics.median(errors),
        "mre_by_domain": {d: statistics.fmean(v) for d, v in sorted(domains.items())},
        "prompts": len(per_prompt),
        "completions": completions,
        "cut_completions": cut,
        "cut_share": cut / completions,
        "prompts_with_cut": sum(p["cut"] > 0 for p in per_prompt),
        "position_rel_error": position_errors(along) if settings.positions else {},
        "position_completions": len(along),
        "per_prompt": per_prompt,
        "skipped_lines": list(skipped),
    }
    config = {**asdict(settings), "policy": str(runtime.directory), "gamma": gamma,
              "value_model": str(runtime.value.source.head_file), "sampling": "temperature 1, top-p 1, no top-k",
              "length_counter": "completion tokens, EOS counted; a cut completion counts with its cap",
              "ground_truth": "ln(1 - mean(1 - gamma^L)) / ln gamma"}
    record = write_record(out / "mre.json", "eval-mre", config, results)
    plot_mre(results, out / "mre.png", gamma=gamma)
    return record


def table(results: dict[str, Any], *, rows: int = 20) -> str:
    """The printed summary: per-prompt predictions (first `rows`), then the aggregate errors."""
    from ..bench.report import format_table

    body = [[p["id"][:24], p["predicted"], p["ground_truth"], p["mean_length"], p["rel_error"], p["cut"]]
            for p in results["per_prompt"][:rows]]
    lines = [format_table(["id", "predicted", "L_GT", "mean L", "rel err", "cut"], body)]
    lines.append(f"MRE {100 * results['mre']:.1f}%  (median {100 * results['mre_median']:.1f}%) over "
                 f"{results['prompts']} prompts; cut completions {results['cut_completions']}/{results['completions']}")
    if results["position_rel_error"]:
        lines.append("relative error along the completion: " + "  ".join(
            f"{k}: {'n/a' if v is None else f'{100 * v:.1f}%'}" for k, v in results["position_rel_error"].items()))
    return "\n".join(lines)


def plot_mre(results: dict[str, Any], path: str | os.PathLike[str], *, gamma: float | None = None) -> Path:
    """Scatter of predicted against ground-truth length per prompt, with the y = x diagonal."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    truth = [p["ground_truth"] for p in results["per_prompt"]]
    pred = [p["predicted"] for p in results["per_prompt"]]
    cut = [p["cut"] > 0 for p in results["per_prompt"]]
    ax.scatter([t for t, c in zip(truth, cut) if not c], [p for p, c in zip(pred, cut) if not c], s=14,
               color="tab:blue", label="all completions ended")
    ax.scatter([t for t, c in zip(truth, cut) if c], [p for p, c in zip(pred, cut) if c], s=14, marker="x",
               color="tab:orange", label="some completions cut (L_GT a lower bound)")
    hi = max(truth + pred) * 1.05
    ax.plot([0, hi], [0, hi], color="gray", ls="--", lw=1)
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("ground truth L_GT (tokens, EOS counted)")
    ax.set_ylabel(r"predicted $\hat{l}$ at the prompt boundary")
    g = f", γ = {gamma}" if gamma is not None else ""
    ax.set_title(f"Length prediction: MRE {100 * results['mre']:.1f}% ({results['prompts']} prompts{g})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)
