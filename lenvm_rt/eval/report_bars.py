"""Quality bars and the length-rule comparison of the results document (lenvm_rt.eval.report).

    lines = bars_section(unguided_results, guided_results)       # LIFEBench summary "results" dicts (or None)
    lines = rules_section({"strict": (path, record, own_baseline | None), ...}, baseline=(path, record) | None)

Bars (each checked on the recorded averages, never typed in):
  evaluation   Equal-To LS >= 65 and >= unguided + 25; At-Most LS >= 95; At-Least LS >= 95
  quality      per constraint, the policy's NLL at most +0.4 nats/token and the 4-gram repetition at most +5
               points above the unguided run of the same constraint, with LS >= 70 (Equal To) or >= 95
A bar whose inputs are missing reads "not measured", never "met".
Rule comparison: one row per guided LIFEBench run (label = its rule or settings) and constraint it ran: its sampling,
LS, mean |LD|, NLL, rep4 and, against its own unguided run (the same folder) or else `baseline` (an unguided run of
the same units and targets), the unguided LS, ΔNLL and Δrep4.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import GREEDY_BELOW
from .markdown import NA, delta, num, pct, table

RuleRun = tuple[Path, Mapping[str, Any], "tuple[Path, Mapping[str, Any]] | None"]

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


def _sampling(cfg: Mapping[str, Any]) -> str:
    """A short label of a run's sampling settings: "greedy, min-p 0.2" or "T 1, top-k 15, top-p 0.999"."""
    sp = cfg.get("sampling")
    if not isinstance(sp, Mapping):
        return NA
    t = sp.get("temperature")
    parts = ["greedy" if isinstance(t, (int, float)) and t < GREEDY_BELOW else f"T {t:g}" if t is not None else NA]
    for key, name, off in (("top_k", "top-k", None), ("top_p", "top-p", 1.0), ("min_p", "min-p", 0.0)):
        v = sp.get(key)
        if v not in (None, off, 0):
            parts.append(f"{name} {v:g}")
    return ", ".join(parts)


def _rule_rows(label: str, rec: Mapping[str, Any], base: Mapping[str, Any] | None) -> list[list[str]]:
    cfg, res = rec["config"], rec["results"]
    rows = []
    for c, name in CONSTRAINTS:
        if _avg(res, c) is None:
            continue
        nll = [_quality(base, c, "nll"), _quality(res, c, "nll")]
        rep = [_quality(base, c, "repetition_rate"), _quality(res, c, "repetition_rate")]
        targets = ", ".join(map(str, cfg.get("targets", [])))
        rows.append([label, name, _sampling(cfg), str(cfg.get("units", NA)), targets, num(_avg(res, c)),
                     num(_avg(base, c)), num(_avg(res, c, "deviation_pct"), suffix="%"), num(nll[1], ".3f"),
                     delta(nll, "+.3f"), pct(rep[1]),
                     delta([None if v is None else 100 * v for v in rep], "+.1f", " pp")])
    return rows


def _check_kind(path: Path, rec: Mapping[str, Any], guided: bool) -> None:
    if not isinstance(rec.get("config"), dict) or not isinstance(rec.get("results"), dict):
        raise ValueError(f"{path}: not a LIFEBench summary record")
    if rec["config"].get("guided") is not guided:
        raise ValueError(f"{path}: the rule comparison takes guided LIFEBench summaries" if guided else
                         f"{path}: the rule comparison's baseline must be an unguided LIFEBench summary")


def rules_section(runs: Mapping[str, RuleRun], baseline: tuple[Path, Mapping[str, Any]] | None = None) -> list[str]:
    """One row per guided run and constraint it ran; ValueError on a record of the wrong kind.

    runs: label -> (path, guided record, own unguided (path, record) or None); a run without its own baseline is
    compared with `baseline`.
    """
    if baseline:
        _check_kind(*baseline, guided=False)
    rows = []
    for label, (path, rec, own) in runs.items():
        _check_kind(path, rec, guided=True)
        if own:
            _check_kind(*own, guided=False)
        base = (own or baseline or (None, None))[1]
        rows += _rule_rows(label, rec, base["results"] if base else None)
    return table(["run", "constraint", "sampling", "units", "targets", "LS", "unguided LS", "mean |LD|", "NLL",
                  "ΔNLL", "rep4", "Δrep4"], rows)
