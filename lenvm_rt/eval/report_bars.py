"""Quality bars and the Equal-To rule comparison of the results document (lenvm_rt.eval.report).

    lines = bars_section(unguided_results, guided_results)       # LIFEBench summary "results" dicts (or None)
    lines = rules_section({"strict": (path, record), ...}, baseline=(path, record) | None)

Bars (each checked on the recorded averages, never typed in):
  evaluation   Equal-To LS >= 65 and >= unguided + 25; At-Most LS >= 95; At-Least LS >= 95
  quality      per constraint, the policy's NLL at most +0.4 nats/token and the 4-gram repetition at most +5
               points above the unguided run of the same constraint, with LS >= 70 (Equal To) or >= 95
A bar whose inputs are missing reads "not measured", never "met".
Rule comparison: one row per guided LIFEBench run (label = the Equal-To rule it used), Equal-To cells only: LS,
mean |LD|, NLL, rep4 and, against `baseline` (an unguided run of the same units and targets), ΔNLL / Δrep4.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .markdown import NA, delta, num, pct, table

EQUAL_BAR, EQUAL_GAIN, BOUND_BAR = 65.0, 25.0, 95.0
QUALITY_EQUAL_BAR, NLL_SLACK, REP_SLACK = 70.0, 0.4, 0.05
CONSTRAINTS = (("equal", "Equal To"), ("at_most", "At Most"), ("at_least", "At Least"))


def _avg(res: Mapping[str, Any] | None, constraint: str, key: str = "length_score") -> float | None:
    v = (res or {}).get("averages", {}).get(constraint, {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def _quality(res: Mapping[str, Any] | None, constraint: str, key: str) -> float | None:
    v = (res or {}).get("quality", {}).get(constraint, {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**missed**")


def _quality_bar(unguided: Mapping[str, Any] | None, guided: Mapping[str, Any] | None, constraint: str,
                 name: str) -> list[str]:
    bar = QUALITY_EQUAL_BAR if constraint == "equal" else BOUND_BAR
    ls = _avg(guided, constraint)
    nll = [_quality(unguided, constraint, "nll"), _quality(guided, constraint, "nll")]
    rep = [_quality(unguided, constraint, "repetition_rate"), _quality(guided, constraint, "repetition_rate")]
    known = None not in (ls, *nll, *rep)
    ok = known and ls >= bar and nll[1] - nll[0] <= NLL_SLACK and rep[1] - rep[0] <= REP_SLACK  # type: ignore[operator]
    measured = (f"LS {num(ls)}, ΔNLL {delta(nll, '+.3f')}, "
                f"Δrep4 {delta([None if v is None else 100 * v for v in rep], '+.1f', ' pp')}")
    return [f"quality: {name}", f"LS ≥ {bar:g}, ΔNLL ≤ +{NLL_SLACK:g}, Δrep4 ≤ +{100 * REP_SLACK:g} pp", measured,
            _verdict(ok if known else None)]


def bars_section(unguided: Mapping[str, Any] | None, guided: Mapping[str, Any] | None) -> list[str]:
    """The bars table from the unguided and guided LIFEBench summaries (either may be None)."""
    eq_u, eq_g = _avg(unguided, "equal"), _avg(guided, "equal")
    eq_ok = None if None in (eq_u, eq_g) else eq_g >= EQUAL_BAR and eq_g - eq_u >= EQUAL_GAIN  # type: ignore[operator]
    rows = [["evaluation: Equal-To LS", f"≥ {EQUAL_BAR:g} and ≥ unguided + {EQUAL_GAIN:g}",
             f"{num(eq_g)} (unguided {num(eq_u)})", _verdict(eq_ok)]]
    for c, name in CONSTRAINTS[1:]:
        g = _avg(guided, c)
        ok = None if g is None else g >= BOUND_BAR
        rows.append([f"evaluation: {name} LS", f"≥ {BOUND_BAR:g}", num(g), _verdict(ok)])
    rows += [_quality_bar(unguided, guided, c, name) for c, name in CONSTRAINTS]
    return table(["bar", "needs", "measured (averages over targets)", "verdict"], rows)


def _rule_row(label: str, rec: Mapping[str, Any], base: Mapping[str, Any] | None) -> list[str]:
    cfg, res = rec["config"], rec["results"]
    nll = [_quality(base, "equal", "nll"), _quality(res, "equal", "nll")]
    rep = [_quality(base, "equal", "repetition_rate"), _quality(res, "equal", "repetition_rate")]
    return [label, str(cfg.get("units", NA)), ", ".join(map(str, cfg.get("targets", []))), num(_avg(res, "equal")),
            num(_avg(res, "equal", "deviation_pct"), suffix="%"), num(nll[1], ".3f"), delta(nll, "+.3f"),
            pct(rep[1]), delta([None if v is None else 100 * v for v in rep], "+.1f", " pp")]


def rules_section(runs: Mapping[str, tuple[Path, Mapping[str, Any]]],
                  baseline: tuple[Path, Mapping[str, Any]] | None = None) -> list[str]:
    """Equal-To cells of several guided runs, one row per rule label; ValueError on a record of the wrong kind."""
    base = baseline[1]["results"] if baseline else None
    for path, rec in [*runs.values(), *([baseline] if baseline else [])]:
        if not isinstance(rec.get("config"), dict) or not isinstance(rec.get("results"), dict):
            raise ValueError(f"{path}: not a LIFEBench summary record")
    if baseline and baseline[1]["config"].get("guided") is not False:
        raise ValueError(f"{baseline[0]}: the rule comparison's baseline must be an unguided LIFEBench summary")
    for path, rec in runs.values():
        if rec["config"].get("guided") is not True:
            raise ValueError(f"{path}: the rule comparison takes guided LIFEBench summaries")
    rows = [_rule_row(label, rec, base) for label, (_, rec) in runs.items()]
    if baseline:
        rows.append(_rule_row("unguided", baseline[1], base))
    return table(["Equal-To rule", "units", "targets", "LS", "mean |LD|", "NLL", "ΔNLL", "rep4", "Δrep4"], rows)
