"""Quality bars and the length-rule comparison of the results document, on hand-made LIFEBench summaries."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lenvm_rt.cli import main as run_cli
from lenvm_rt.eval.report import write_results
from lenvm_rt.eval.report_bars import bars_section, rules_section


def summary(ls: dict[str, float], nll: dict[str, float], rep: dict[str, float]) -> dict:
    return {"averages": {c: {"length_score": v, "deviation_pct": 10.0} for c, v in ls.items()},
            "quality": {c: {"nll": nll[c], "repetition_rate": rep[c]} for c in nll}}


UNGUIDED = summary({"equal": 30.0, "at_most": 60.0, "at_least": 70.0}, {"equal": 0.5, "at_most": 0.5, "at_least": 0.5},
                   {"equal": 0.30, "at_most": 0.30, "at_least": 0.30})


def verdicts(lines: list[str]) -> dict[str, str]:
    rows = [line.split(" | ") for line in lines[2:] if line]
    return {r[0].lstrip("| "): r[-1].rstrip(" |") for r in rows}


def test_bars_met_only_when_length_and_quality_both_hold():
    guided = summary({"equal": 72.0, "at_most": 96.0, "at_least": 99.0},
                     {"equal": 0.85, "at_most": 1.0, "at_least": 0.7},
                     {"equal": 0.34, "at_most": 0.2, "at_least": 0.40})
    v = verdicts(bars_section(UNGUIDED, guided))
    assert v["evaluation: Equal-To LS"] == "**met**"  # 72 >= 65 and 72 - 30 >= 25
    assert v["evaluation: At Most LS"] == v["evaluation: At Least LS"] == "**met**"
    assert v["quality: Equal To"] == "**met**"  # ΔNLL +0.35, Δrep4 +4 pp
    assert v["quality: At Most"] == "**missed**"  # ΔNLL +0.5 > 0.4
    assert v["quality: At Least"] == "**missed**"  # Δrep4 +10 pp > 5


def test_equal_bar_needs_the_gain_over_unguided_too():
    guided = summary({"equal": 66.0, "at_most": 90.0, "at_least": 95.0},
                     {"equal": 0.5, "at_most": 0.5, "at_least": 0.5},
                     {"equal": 0.3, "at_most": 0.3, "at_least": 0.3})
    high_baseline = summary({"equal": 50.0}, {"equal": 0.5}, {"equal": 0.3})
    v = verdicts(bars_section(high_baseline, guided))
    assert v["evaluation: Equal-To LS"] == "**missed**"  # 66 - 50 < 25
    assert v["evaluation: At Most LS"] == "**missed**" and v["evaluation: At Least LS"] == "**met**"
    assert v["quality: Equal To"] == "**missed**"  # LS 66 < 70
    assert v["quality: At Most"] == "not measured"  # no unguided quality for at_most


def test_missing_runs_are_not_measured_never_met():
    v = verdicts(bars_section(None, None))
    assert set(v.values()) == {"not measured"} and len(v) == 6


def record(guided: bool, res: dict, units: int = 6, sampling: dict | None = None) -> dict:
    return {"config": {"guided": guided, "units": units, "targets": [32, 64],
                       "sampling": sampling or {"temperature": 0.0, "top_k": None, "top_p": 1.0, "min_p": 0.2}},
            "results": res}


def test_rule_rows_carry_their_difference_to_the_unguided_baseline():
    soft = summary({"equal": 80.0}, {"equal": 0.9}, {"equal": 0.25})
    lines = rules_section({"soft": (Path("s.json"), record(True, soft), None)},
                          (Path("u.json"), record(False, UNGUIDED)))
    assert "| soft | Equal To | greedy, min-p 0.2 | 6 | 32, 64 | 80.0 | 30.0 | 10.0% | 0.900 | +0.400 | 25.0% | " \
           "-5.0 pp |" in lines
    no_base = rules_section({"soft": (Path("s.json"), record(True, soft), None)})
    assert "| soft | Equal To | greedy, min-p 0.2 | 6 | 32, 64 | 80.0 | — | 10.0% | 0.900 | — | 25.0% | — |" in no_base


def test_a_run_with_its_own_baseline_is_compared_with_it_per_constraint():
    sampled = {"temperature": 1.0, "top_k": 15, "top_p": 0.999, "min_p": 0.0}
    bound = summary({"at_most": 99.0, "at_least": 100.0}, {"at_most": 0.7, "at_least": 0.6},
                    {"at_most": 0.1, "at_least": 0.2})
    own = summary({"at_most": 50.0, "at_least": 60.0}, {"at_most": 0.65, "at_least": 0.9},
                  {"at_most": 0.1, "at_least": 0.4})
    lines = rules_section({"band": (Path("b.json"), record(True, bound, sampling=sampled),
                                    (Path("o.json"), record(False, own, sampling=sampled)))},
                          (Path("u.json"), record(False, UNGUIDED)))
    rows = [line for line in lines if line.startswith("| band")]
    assert rows == ["| band | At Most | T 1, top-k 15, top-p 0.999 | 6 | 32, 64 | 99.0 | 50.0 | 10.0% | 0.700 | +0.050 "
                    "| 10.0% | +0.0 pp |",
                    "| band | At Least | T 1, top-k 15, top-p 0.999 | 6 | 32, 64 | 100.0 | 60.0 | 10.0% | 0.600 | "
                    "-0.300 | 20.0% | -20.0 pp |"]


def test_rule_comparison_refuses_records_of_the_wrong_kind():
    with pytest.raises(ValueError, match="takes guided LIFEBench summaries"):
        rules_section({"strict": (Path("x.json"), record(False, UNGUIDED), None)})
    with pytest.raises(ValueError, match="baseline must be an unguided"):
        rules_section({}, (Path("g.json"), record(True, UNGUIDED)))
    with pytest.raises(ValueError, match="baseline must be an unguided"):
        rules_section({"band": (Path("b.json"), record(True, UNGUIDED), (Path("g.json"), record(True, UNGUIDED)))})
    with pytest.raises(ValueError, match="not a LIFEBench summary"):
        rules_section({"strict": (Path("y.json"), {"results": {}}, None)})


def test_report_renders_bars_and_rules_from_the_command_line(tmp_path):
    runs = {"main": tmp_path / "main", "band": tmp_path / "band"}
    for d in runs.values():
        d.mkdir()
    guided = summary({"equal": 75.0, "at_most": 97.0, "at_least": 98.0},
                     {"equal": 0.8, "at_most": 0.6, "at_least": 0.6},
                     {"equal": 0.3, "at_most": 0.3, "at_least": 0.3})
    banded = record(True, guided)
    banded["config"].update(equal_rule="band", at_most_rule="band")
    for d, name, rec in ((runs["main"], "lifebench_unguided.json", record(False, UNGUIDED)),
                         (runs["main"], "lifebench_guided.json", banded),
                         (runs["band"], "lifebench_guided.json", record(True, guided))):
        rec["results"].update(scores={c: {} for c in rec["results"]["averages"]}, counts={}, malformed_lines=[])
        (d / name).write_text(json.dumps({**rec, "machine": {}, "versions": {}}))
    out = tmp_path / "RESULTS.md"
    assert run_cli(["eval", "report", "--out", str(out), "--lifebench", str(runs["main"]),
                    "--rule", f"band={runs['band']}", "--rule-baseline", str(runs["main"])]) == 0
    md = out.read_text()
    assert "### Quality bars" in md and "| quality: Equal To |" in md and "**met**" in md
    assert "### Length rules compared" in md and "rules: Equal To band, At Most band, At Least strict, sampling" in md
    assert "rules: Equal To strict" not in md  # the unguided line names no rule
    assert "| band | Equal To | greedy, min-p 0.2 | 6 | 32, 64 | 75.0 | 30.0 |" in md
    assert "--rule band=" in md  # the command line that wrote the document
    assert run_cli(["eval", "report", "--out", str(out), "--rule", "=x"]) == 2
    with pytest.raises(ValueError, match="unknown report source"):
        write_results({"rules:x": runs["band"]}, out)
