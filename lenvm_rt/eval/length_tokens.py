"""Length tokens (LENVM.md §6, paper §4.6 and Fig. 4): which tokens make the predicted remainder grow or shrink.

    rows = load_completions("completions.jsonl")     # rows with "response" are scored as given, others sampled
    record = run_length_tokens(runtime, rows.items, "eval/length-tokens", LengthTokenSettings(samples=2))

Per response token t, δ_t = γ·u_t − u_{t−1} + (1 − γ) (TokenValues.td; the first previous value is the last
prompt token's): δ_t > threshold counts as positive (the token made the predicted remainder longer),
δ_t < −threshold as negative (shorter). Counts and the mean δ are aggregated per token string: the decoded
token with surrounding whitespace stripped and case folded (" But" and "but" are one entry); a token that is
only whitespace keeps its text ("\\n\\n"). A final EOS is not counted: its value is 0 by definition (the
terminal state), so its δ describes the stop, not the token. Ranking: by the count of positive (negative)
occurrences, then by the mean δ. The analysis is descriptive, not causal.
Sampled completions come from the policy's own distribution (temperature 1, top-p 1; `lenvm_rt.rollouts`,
seeded and resumable under out_dir/rollouts). Outputs: length_tokens.json and length_tokens.png.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..rollouts import PromptRecord, RolloutSettings, read_rollouts, sample_rollouts
from ..runtime import Runtime
from ..values import TokenValues
from .data import Record, Rows, pyplot, read_records, save_figure


@dataclass(frozen=True)
class LengthTokenSettings:
    samples: int = 1  # completions sampled per prompt without a "response"
    max_tokens: int = 512
    threshold: float = 0.01
    top: int = 20
    batch: int = 16
    seed: int = 0

    def check(self) -> None:
        RolloutSettings(samples=self.samples, max_tokens=self.max_tokens, batch=self.batch, seed=self.seed).check()
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"threshold must be a finite number >= 0; got {t!r}")
        if not isinstance(self.top, int) or isinstance(self.top, bool) or self.top < 1:
            raise ValueError(f"top must be a positive int; got {self.top!r}")


@dataclass
class TokenStat:
    count: int = 0
    positive: int = 0
    negative: int = 0
    td_sum: float = 0.0

    @property
    def mean_td(self) -> float:
        return self.td_sum / self.count if self.count else float("nan")


def load_completions(path: str | os.PathLike[str], *, limit: int | None = None, raw: bool = False) -> Rows:
    """Prompt rows, each with an optional "response" (text); malformed lines are reported and skipped."""
    def check(row: dict[str, Any]) -> None:
        if "response" in row and (not isinstance(row["response"], str) or not row["response"]):
            raise ValueError("'response' must be non-empty text")

    return read_records(path, raw=raw, check=check, limit=limit)


def token_key(text: str) -> str:
    """The entry a token string is counted under: stripped and case folded, unless it is only whitespace."""
    stripped = text.strip()
    return stripped.casefold() if stripped else text


def aggregate(values: Iterable[TokenValues], threshold: float, eos_ids: Iterable[int] = ()) -> dict[str, TokenStat]:
    """Per token string: occurrences, δ > threshold, δ < −threshold and the δ sum (a final EOS is skipped)."""
    eos = set(eos_ids)
    stats: dict[str, TokenStat] = {}
    for tv in values:
        n = len(tv.token_ids)
        for i, (tid, text, td) in enumerate(zip(tv.token_ids, tv.tokens, tv.td)):
            if i == n - 1 and tid in eos:
                continue
            s = stats.setdefault(token_key(text), TokenStat())
            s.count += 1
            s.positive += td > threshold
            s.negative += td < -threshold
            s.td_sum += td
    return stats


def top_tokens(stats: dict[str, TokenStat], top: int, sign: int) -> list[dict[str, Any]]:
    """The `top` tokens by count of positive (sign=+1) or negative (sign=−1) residuals, then by mean δ."""
    field = "positive" if sign > 0 else "negative"
    ranked = sorted(((k, s) for k, s in stats.items() if getattr(s, field) > 0),
                    key=lambda kv: (-getattr(kv[1], field), -sign * kv[1].mean_td, kv[0]))
    return [{"token": k, field: getattr(s, field), "count": s.count, "share": getattr(s, field) / s.count,
             "mean_td": s.mean_td} for k, s in ranked[:top]]


def run_length_tokens(runtime: Runtime, records: Sequence[Record], out_dir: str | os.PathLike[str],
                      settings: LengthTokenSettings, *, progress: bool = True,
                      skipped: Sequence[str] = ()) -> dict[str, Any]:
    """Score given responses, sample the rest (resumable), aggregate; writes JSON + PNG, returns the record."""
    from ..bench.report import write_record

    settings.check()
    if not records:
        raise ValueError("no prompts or completions to analyse")
    if runtime.value is None:
        raise ValueError("TD residuals need a value model; pass --value-model")
    out = Path(out_dir)
    skipped = list(skipped)
    values: list[TokenValues] = []
    given = [r for r in records if "response" in r.row]
    for r in given:
        try:
            values.append(runtime.token_values(r.prompt, r.row["response"]))
        except ValueError as exc:
            skipped.append(f"{r.id}: {exc}")
    scored_given = len(values)
    to_sample = [r for r in records if "response" not in r.row]
    if to_sample:
        rs = RolloutSettings(samples=settings.samples, max_tokens=settings.max_tokens, batch=settings.batch,
                             seed=settings.seed, capture_hidden=False)
        prompts = [PromptRecord(r.id, r.prompt, str(r.row.get("domain", "unknown")), "eval") for r in to_sample]
        sample_rollouts(runtime, prompts, out / "rollouts", rs, progress=progress)
        ids = {r.id for r in to_sample}
        for ro in read_rollouts(out / "rollouts")[1]:
            if ro.id in ids and ro.sample < settings.samples:
                values.append(runtime.token_values(ro.prompt_ids, ro.completion_ids))
    if not values:
        raise ValueError("no completion could be scored: " + "; ".join(skipped[:3]))
    stats = aggregate(values, settings.threshold, runtime.eos_token_ids)
    per_token = sorted(({"token": k, **asdict(s), "mean_td": s.mean_td} for k, s in stats.items()),
                       key=lambda d: (-d["count"], d["token"]))
    results = {
        "threshold": settings.threshold,
        "completions": len(values),
        "given_responses": scored_given,
        "sampled_completions": len(values) - scored_given,
        "tokens": sum(s.count for s in stats.values()),
        "positive_tokens": sum(s.positive for s in stats.values()),
        "negative_tokens": sum(s.negative for s in stats.values()),
        "positive": top_tokens(stats, settings.top, +1),
        "negative": top_tokens(stats, settings.top, -1),
        "per_token": per_token,
        "skipped_lines": skipped,
    }
    config = {**asdict(settings), "policy": str(runtime.directory), "gamma": runtime.gamma,
              "value_model": str(runtime.value.source.head_file),
              "td": "delta_t = gamma*u_t - u_(t-1) + (1 - gamma); > 0: the token made the prediction longer",
              "token_key": "decoded token, whitespace stripped, case folded; final EOS not counted"}
    record = write_record(out / "length_tokens.json", "eval-length-tokens", config, results)
    plot_length_tokens(results, out / "length_tokens.png")
    return record


def _label(token: str) -> str:
    return repr(token)[1:-1] if token.strip() else repr(token)


def table(results: dict[str, Any]) -> str:
    """The printed summary: the top lengthening and shortening tokens with their counts."""
    from ..bench.report import format_table

    lines = [f"{results['completions']} completions, {results['tokens']} tokens; |δ| > {results['threshold']}: "
             f"{results['positive_tokens']} longer, {results['negative_tokens']} shorter"]
    for name, field in (("longer (δ > +threshold)", "positive"), ("shorter (δ < -threshold)", "negative")):
        rows = [[_label(t["token"])[:24], t[field], t["count"], t["share"], f"{t['mean_td']:+.4f}"]
                for t in results[field]]
        lines += ["", name, format_table(["token", field, "count", "share", "mean δ"], rows) if rows else "(none)"]
    return "\n".join(lines)


def plot_length_tokens(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Horizontal bars: per token, how often it lengthened (left) and shortened (right) the prediction."""
    plt = pyplot()
    n = max(len(results["positive"]), len(results["negative"]), 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, max(2.5, 0.28 * n + 1.2)))
    for ax, field, color, title in ((axes[0], "positive", "tab:red", f"δ > +{results['threshold']} (longer)"),
                                    (axes[1], "negative", "tab:blue", f"δ < −{results['threshold']} (shorter)")):
        items = list(reversed(results[field]))
        ax.barh(range(len(items)), [t[field] for t in items], color=color)
        ax.set_yticks(range(len(items)), [_label(t["token"])[:20] for t in items], fontsize=8)
        ax.set_xlabel("occurrences")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Length tokens: TD residual over {results['completions']} completions", fontsize=11)
    return save_figure(fig, path)
