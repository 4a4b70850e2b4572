"""LIFEBench length scoring on the fractional deviation (LENVM.md §7.1, paper Eqs. 17–18).

    length_deviation(L, N) = (L − N) / N                      L, N in response tokens (EOS not counted)
    length_score(LD, "equal")    = 100·e^{k1·LD} if LD < 0,  100·e^{−k2·LD} if LD > 0,  100 at 0
    length_score(LD, "at_most")  = 100 if LD ≤ 0,  100·e^{−k2·LD} if LD > 0
    length_score(LD, "at_least") = 100·e^{k1·LD} if LD < 0,  100 if LD ≥ 0
    k1 = 5, k2 = 2.

LD enters the exponential as a fraction: the upstream scorer passes LD·100, which scores a 10 %
overshoot 100·e^{−20} ≈ 0 instead of 81.9. Outputs of length ≤ 1 are dropped before scoring, as
LIFEBench's illegal-output filter does.

summarize(records, constraints, targets) aggregates per-unit records as the benchmark does: the
mean length score per (constraint, target), rounded to 0.1, then the mean over the targets that
have scored outputs; deviation is the mean |LD|·100 % per target, averaged the same way. Each cell
also holds the means of the quality fields (nll, mean_rank, mean_prob, repetition_rate: lenvm_rt/quality.py)
over its outputs that ran, filtered ones included, with quality_n counting the outputs that carry them;
results["quality"] holds summarize_quality per constraint and over "all" outputs.
format_summary(record) renders a summary record as a table; plot_scores(out_dir) draws the score per
target of every lifebench_{guided,unguided}.json summary in out_dir (score_series) into lifebench_scores.png.
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..bench.report import format_table
from ..quality import FIELDS as QUALITY_FIELDS
from ..quality import summarize_quality

CONSTRAINTS = ("equal", "at_most", "at_least")
K1 = 5.0
K2 = 2.0
MIN_SCORED_LENGTH = 2  # LIFEBench drops outputs of length <= 1
MODES = ("guided", "unguided")
PLOT_FILE = "lifebench_scores.png"


def normalize_constraint(name: str) -> str:
    """'equal' | 'at-most' | 'at_most' | 'at-least' | 'at_least' -> the LengthTarget spelling."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in CONSTRAINTS:
        raise ValueError(f"unknown length constraint {name!r}; expected one of equal, at-most, at-least")
    return key


def length_deviation(length: int, target: int) -> float:
    """LD = (L − N)/N as a fraction (not a percentage)."""
    if isinstance(target, bool) or not isinstance(target, int) or target <= 0:
        raise ValueError(f"target must be a positive int number of tokens; got {target!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0; got {length!r}")
    return (length - target) / target


def length_score(deviation: float, constraint: str = "equal", *, k1: float = K1, k2: float = K2) -> float:
    """Length score in [0, 100] of a fractional deviation under `constraint`."""
    kind = normalize_constraint(constraint)
    if not math.isfinite(deviation) or deviation < -1.0:
        raise ValueError(f"deviation must be a finite fraction >= -1; got {deviation!r}")
    if deviation < 0:
        return 100.0 if kind == "at_most" else 100.0 * math.exp(k1 * deviation)
    if deviation > 0:
        return 100.0 if kind == "at_least" else 100.0 * math.exp(-k2 * deviation)
    return 100.0


def is_filtered(length: int) -> bool:
    """True for outputs the benchmark drops before scoring (length <= 1)."""
    return length < MIN_SCORED_LENGTH


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def summarize_cell(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts and mean scores of the records of one (constraint, target) cell."""
    skipped = [r for r in records if r.get("skipped")]
    ran = [r for r in records if not r.get("skipped")]
    scored = [r for r in ran if not r["filtered"]]
    return {
        "units": len(records),
        "scored": len(scored),
        "filtered": len(ran) - len(scored),
        "skipped": len(skipped),
        "truncated": sum(r["finish_reason"] == "length" for r in ran),
        "context_capped": sum(bool(r.get("context_capped")) for r in ran),
        "length_score": _round(_mean([r["score"] for r in scored])),
        "deviation_pct": _round(_mean([abs(r["deviation"]) * 100.0 for r in scored])),
        "signed_deviation_pct": _round(_mean([r["deviation"] * 100.0 for r in scored])),
        "mean_length": _round(_mean([float(r["length"]) for r in scored])),
        **_quality(ran),
    }


def _quality(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Means of the quality fields over the records that hold them; quality_n counts those records."""
    q = summarize_quality(records)
    return {**{k: q[k] for k in QUALITY_FIELDS}, "quality_n": q["n"]}


def summarize(records: Iterable[Mapping[str, Any]], constraints: Sequence[str], targets: Sequence[int]
              ) -> dict[str, Any]:
    """Per (constraint, target) cells, per-constraint averages over targets, and totals."""
    cells: dict[tuple[str, int], list[Mapping[str, Any]]] = {(c, t): [] for c in constraints for t in targets}
    for r in records:
        key = (r["constraint"], r["target"])
        if key in cells:
            cells[key].append(r)
    scores: dict[str, dict[str, Any]] = {}
    averages: dict[str, dict[str, Any]] = {}
    for c in constraints:
        per_target = {str(t): summarize_cell(cells[(c, t)]) for t in targets}
        scores[c] = per_target
        ls = [cell["length_score"] for cell in per_target.values() if cell["length_score"] is not None]
        dev = [cell["deviation_pct"] for cell in per_target.values() if cell["deviation_pct"] is not None]
        averages[c] = {"length_score": _round(_mean(ls)), "deviation_pct": _round(_mean(dev)),
                       "targets_scored": len(ls)}
    totals = {key: sum(cell[key] for per_target in scores.values() for cell in per_target.values())
              for key in ("units", "scored", "filtered", "skipped", "truncated", "context_capped")}
    totals["cells"] = totals.pop("units")
    ran = [r for c in constraints for t in targets for r in cells[(c, t)] if not r.get("skipped")]
    quality = {"all": summarize_quality(ran)}
    quality.update({c: summarize_quality(r for t in targets for r in cells[(c, t)] if not r.get("skipped"))
                    for c in constraints})
    return {"scores": scores, "averages": averages, "counts": totals, "quality": quality}


def _num(value: Any, fmt: str = ".1f", scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{format(value * scale, fmt)}{suffix}"


def _other_mode(config: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """(mode, results) of the other mode's summary beside this run's results file, when there is one."""
    other = MODES[1] if config.get("guided") else MODES[0]
    try:
        path = Path(config["results_file"]).parent / f"lifebench_{other}.json"
        return other, json.loads(path.read_text(encoding="utf-8"))["results"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def format_summary(record: Mapping[str, Any]) -> str:
    """A printable table: length score per target, averages, NLL and 4-gram repetition, one row per constraint;
    then the same constraints beside the other mode's summary when out_dir holds one."""
    config, results = record["config"], record["results"]
    targets = config["targets"]
    quality = results.get("quality", {})
    rows = []
    for c, per_target in results["scores"].items():
        avg, q = results["averages"][c], quality.get(c, {})
        cells = [per_target[str(t)]["length_score"] for t in targets]
        rows.append([c, *[_num(v) for v in cells], _num(avg["length_score"]), _num(avg["deviation_pct"], ".0f",
                     suffix="%"), _num(q.get("nll"), ".3f"), _num(q.get("repetition_rate"), ".1f", 100, "%"),
                     sum(cell["scored"] for cell in per_target.values()),
                     sum(cell["skipped"] for cell in per_target.values())])
    mode = "guided" if config["guided"] else "unguided"
    headers = ["constraint", *[str(t) for t in targets], "avg LS", "avg |LD|", "NLL", "rep4", "scored", "skipped"]
    counts = results["counts"]
    text = (f"LIFEBench (tokens), {mode}, {config['units']} units: length score per target; NLL = the policy's own "
            f"mean NLL per token, rep4 = repeated 4-grams\n{format_table(headers, rows)}\n"
            f"filtered {counts['filtered']}, truncated {counts['truncated']}, skipped {counts['skipped']}, "
            f"malformed data lines {len(results['malformed_lines'])}")
    found = _other_mode(config)
    if found is None:
        return text
    other, theirs = found
    pairs = [(mode, results), (other, theirs)]
    side = []
    for c in results["scores"]:
        nll = [r.get("quality", {}).get(c, {}).get("nll") for _, r in pairs]
        rep = [r.get("quality", {}).get(c, {}).get("repetition_rate") for _, r in pairs]
        side.append([c, *[_num(r["averages"].get(c, {}).get("length_score")) for _, r in pairs],
                     *[_num(v, ".3f") for v in nll], _num(None if None in nll else nll[0] - nll[1], "+.3f"),
                     *[_num(v, ".1f", 100, "%") for v in rep]])
    headers = ["constraint", *[f"LS {m}" for m, _ in pairs], *[f"NLL {m}" for m, _ in pairs], f"ΔNLL ({mode})",
               *[f"rep4 {m}" for m, _ in pairs]]
    return f"{text}\n\n{mode} beside the {other} run in the same folder (averages over targets):\n" + format_table(
        headers, side)


def score_series(out_dir: str | Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(mode, constraint) -> [(target, length score)] from the summaries of both modes found in out_dir."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for mode in MODES:
        path = Path(out_dir) / f"lifebench_{mode}.json"
        try:
            scores = json.loads(path.read_text())["results"]["scores"]
            for c, per_target in scores.items():
                points = sorted((int(t), float(cell["length_score"])) for t, cell in per_target.items()
                                if cell.get("length_score") is not None)
                if points:
                    series[(mode, c)] = points
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return series


def plot_scores(out_dir: str | Path) -> Path | None:
    """PNG of length score per target, one line per constraint and mode whose summary is in out_dir."""
    series = score_series(out_dir)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"equal": "tab:blue", "at_most": "tab:orange", "at_least": "tab:green"}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (mode, c), points in series.items():
        ax.plot([t for t, _ in points], [s for _, s in points], color=colors.get(c, "black"),
                ls="-" if mode == "guided" else "--", marker="o" if mode == "guided" else "x",
                label=f"{c.replace('_', ' ')}, {mode}")
    ticks = sorted({t for points in series.values() for t, _ in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_ylim(-3, 105)
    ax.set_xlabel("target length N (tokens)")
    ax.set_ylabel("length score")
    ax.set_title("LIFEBench (token level): length score per target")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / PLOT_FILE
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
