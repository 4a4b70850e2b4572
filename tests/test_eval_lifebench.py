"""Token-level LIFEBench: scorer formulas, prompts, and `eval lifebench` end to end on a tiny random model."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
from checkpoints import make_checkpoint, make_value_head

from lenvm_rt.cli_eval_lifebench import add_lifebench_command
from lenvm_rt.eval.lifebench import (
    Unit,
    build_prompt,
    every_kth_unit,
    length_deviation,
    length_score,
    max_new_tokens_for,
    parse_constraints,
    parse_targets,
    read_units,
)
from lenvm_rt.eval.lifebench_score import score_series, summarize
from lenvm_rt.quality import FIELDS as QUALITY_FIELDS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lifebench" / "data_lite.jsonl"
EN_TASK = ("[Instruction] Answer this question: \n What is a fox? \n\n"
           "[Requirement] Your answer must be {word_count_type} {word_count} words long.")
CN_TASK = "[指令]回答下面的问题：\n 如何搭配衣服 \n\n[要求]你的回答字数必须{word_count_type} {word_count}字。"


# ---- scorer -------------------------------------------------------------------------------------
def test_length_deviation_is_a_fraction():
    assert length_deviation(110, 100) == pytest.approx(0.1)
    assert length_deviation(50, 100) == pytest.approx(-0.5)
    assert length_deviation(32, 32) == 0.0
    with pytest.raises(ValueError, match="target must be a positive int"):
        length_deviation(3, 0)


@pytest.mark.parametrize("deviation, constraint, expected", [
    (0.0, "equal", 100.0),
    (0.1, "equal", 100 * math.exp(-0.2)),      # 81.87
    (-0.1, "equal", 100 * math.exp(-0.5)),     # 60.65: undershoot is punished harder (k1 = 5)
    (1.0, "equal", 100 * math.exp(-2.0)),      # 13.53
    (-0.5, "at_most", 100.0),
    (0.5, "at-most", 100 * math.exp(-1.0)),
    (-0.2, "at_least", 100 * math.exp(-1.0)),
    (3.0, "at-least", 100.0),
])
def test_length_score_hand_cases(deviation, constraint, expected):
    assert length_score(deviation, constraint) == pytest.approx(expected, rel=1e-12)


def test_fraction_form_differs_from_the_upstream_percentage_bug():
    assert round(length_score(length_deviation(110, 100), "equal"), 1) == 81.9  # pinned (LENVM.md §7.1)
    upstream = length_score(100 * length_deviation(110, 100), "equal")  # LD passed as a percentage
    assert upstream < 1e-6


def test_length_score_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown length constraint"):
        length_score(0.1, "around")
    with pytest.raises(ValueError, match="deviation"):
        length_score(float("nan"))


def _rec(c, t, length, finish="stop", skipped=None):
    if skipped:
        return {"constraint": c, "target": t, "skipped": skipped}
    d = (length - t) / t
    filtered = length <= 1
    return {"constraint": c, "target": t, "skipped": None, "length": length, "deviation": d, "filtered": filtered,
            "finish_reason": finish, "score": None if filtered else length_score(d, c)}


def test_summarize_averages_per_target_then_over_targets():
    records = [_rec("equal", 10, 10), _rec("equal", 10, 11), _rec("equal", 10, 1),  # 100, 81.87; one filtered
               _rec("equal", 20, 30, "length"), _rec("equal", 20, 0, skipped="context"),
               _rec("at_most", 10, 5)]
    out = summarize(records, ["equal", "at_most"], [10, 20])
    eq10, eq20 = out["scores"]["equal"]["10"], out["scores"]["equal"]["20"]
    assert eq10["length_score"] == 90.9 and eq10["filtered"] == 1 and eq10["scored"] == 2
    assert eq10["deviation_pct"] == 5.0
    assert eq20["length_score"] == round(100 * math.exp(-1.0), 1) and eq20["skipped"] == 1 and eq20["truncated"] == 1
    assert out["averages"]["equal"]["length_score"] == round((90.9 + 36.8) / 2, 1)
    assert out["averages"]["at_most"] == {"length_score": 100.0, "deviation_pct": 50.0, "targets_scored": 1}
    assert out["counts"]["cells"] == 6 and out["counts"]["skipped"] == 1


# ---- prompts and arguments ----------------------------------------------------------------------
def test_prompts_state_the_requirement_in_tokens():
    en = build_prompt(EN_TASK, "en", "at-most", 64)
    assert en.endswith("[Requirement] Your answer must be at most 64 tokens long.")
    assert build_prompt(EN_TASK, "en", "equal", 8).endswith("must be equal to 8 tokens long.")
    cn = build_prompt(CN_TASK, "cn", "at_least", 64)
    assert cn.endswith("[要求]你的回答token数必须至少有 64 个token。")
    assert "等于 128 个token" in build_prompt(CN_TASK, "cn", "equal", 128)
    assert "至多有" in build_prompt(CN_TASK, "cn", "at_most", 128)


@pytest.mark.skipif(not SHARED_DATA.is_file(), reason="shared LIFEBench data not present")
def test_every_shared_unit_gets_a_token_requirement():
    units, malformed = read_units(SHARED_DATA)
    assert len(units) == 60 and malformed == []
    assert {u.lang for u in units} == {"en", "cn"}
    for unit in units:
        text = build_prompt(unit.task, unit.lang, "equal", 256)
        assert "{word_count" not in text
        assert ("equal to 256 tokens" if unit.lang == "en" else "等于 256 个token") in text


def test_caps_and_argument_parsing():
    assert max_new_tokens_for("equal", 32) == 96 and max_new_tokens_for("at-most", 32) == 96
    assert max_new_tokens_for("at_least", 32) == 160
    assert parse_targets("64, 32,64") == [32, 64]
    assert parse_constraints("at-least,equal") == ["equal", "at_least"]
    for bad, message in (("", "target list is empty"), ("4,x", "positive ints"), ("0", "positive ints")):
        with pytest.raises(ValueError, match=message):
            parse_targets(bad)
    with pytest.raises(ValueError, match="unknown length constraint 'shorter'"):
        parse_constraints("equal,shorter")
    with pytest.raises(ValueError, match="max_new_tokens_factor"):
        max_new_tokens_for("equal", 4, 0.5)


# ---- end to end on a tiny model -----------------------------------------------------------------
def _write_data(path: Path) -> Path:
    rows = [
        json.dumps({"id": 1, "category": "qa", "type": "Knowledge", "lang": "en", "task": EN_TASK}),
        '{"id": 2, "lang": "en", "task": ',  # malformed: line 2
        json.dumps({"id": 3, "category": "qa", "type": "Lifestyle", "lang": "cn", "task": CN_TASK},
                   ensure_ascii=False),
        json.dumps({"id": 4, "lang": "en", "task": "[Instruction] Say hi.\n\n[Requirement] Be {word_count_type} "
                    "{word_count} words long."}),
        json.dumps({"id": 5, "lang": "en", "task": "[Instruction] " + "fox " * 600 + "\n\n[Requirement] Be "
                    "{word_count_type} {word_count} words long."}),  # does not fit the 512-token context
        json.dumps({"id": 6, "lang": "en", "task": EN_TASK}),
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifebench")
    policy = make_checkpoint(root / "policy", "llama")
    head = make_value_head(root / "value_head.safetensors", 64, gamma=0.99)
    return policy, head, _write_data(root / "data.jsonl"), root


@pytest.fixture
def torch_value_head(monkeypatch):
    """The value head's torch reference rather than the Triton interpreter on CPU: same values, much faster.

    The kernel module is imported first, so that it is built under the session's interpreter setting and
    stays usable for later tests; only the per-call dispatch sees TRITON_INTERPRET=0.
    """
    import lenvm_rt.kernels.value_head  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _cli(argv):
    parser = argparse.ArgumentParser(prog="lenvm-rt eval")
    add_lifebench_command(parser.add_subparsers())
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _run(policy, data, out, *extra):
    return _cli(["lifebench", "--model", str(policy), "--data", str(data), "--targets", "4,8", "--out", str(out),
                 "--threads", "1", "--no-progress", "--limit", "4", *extra])


def test_guided_and_unguided_runs_write_results_table_and_plot(setup, tmp_path, capsys, torch_value_head):
    policy, head, data, _ = setup
    out = tmp_path / "out"
    assert _run(policy, data, out, "--value-model", str(head)) == 0
    captured = capsys.readouterr()
    assert f"{data}:2:" in captured.err and "line skipped" in captured.err
    assert "LIFEBench (tokens), guided, 4 units" in captured.out
    assert "equal" in captured.out and "at_least" in captured.out and "avg LS" in captured.out
    assert "NLL" in captured.out and "rep4" in captured.out and "beside the" not in captured.out  # no unguided yet

    records = _lines(out / "lifebench_guided.jsonl")
    assert len(records) == 4 * 2 * 3
    assert {r["id"] for r in records} == {"1", "3", "4", "5"}
    skipped = [r for r in records if r["skipped"]]
    assert {r["id"] for r in skipped} == {"5"} and len(skipped) == 6 and "context" in skipped[0]["skipped"]
    for r in records:
        if r["skipped"]:
            continue
        assert r["guided"] is True and r["length"] == r["num_tokens"] - (r["finish_reason"] == "stop")
        assert r["deviation"] == pytest.approx((r["length"] - r["target"]) / r["target"])
        assert r["filtered"] == (r["length"] <= 1)
        assert r["filtered"] or r["score"] == pytest.approx(length_score(r["deviation"], r["constraint"]))
        assert r["max_new_tokens"] == max_new_tokens_for(r["constraint"], r["target"])
        assert isinstance(r["text"], str)
        assert all(math.isfinite(r[k]) for k in QUALITY_FIELDS), r  # the policy's judgement of every output
        assert r["nll"] > 0 and 1 <= r["mean_rank"] <= 384 and 0 < r["mean_prob"] < 1
        assert 0 <= r["repetition_rate"] < 1

    summary = json.loads((out / "lifebench_guided.json").read_text())
    assert summary["benchmark"] == "lifebench" and {"machine", "versions"} <= set(summary)
    assert summary["config"]["guided"] is True and summary["config"]["targets"] == [4, 8]
    assert summary["config"]["value_model"] == str(head.resolve())
    results = summary["results"]
    assert set(results["scores"]) == {"equal", "at_most", "at_least"} and set(results["scores"]["equal"]) == {"4", "8"}
    assert results["counts"]["skipped"] == 6 and len(results["skipped_units"]) == 6
    assert results["malformed_lines"][0]["line"] == 2
    assert (out / "lifebench_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ran = [r for r in records if not r["skipped"]]
    quality = results["quality"]
    assert quality["all"]["n"] == len(ran) == 18
    assert quality["all"]["nll"] == pytest.approx(sum(r["nll"] for r in ran) / len(ran))
    for c, per_target in results["scores"].items():
        assert quality[c]["n"] == 6
        for t, cell in per_target.items():
            mine = [r for r in ran if r["constraint"] == c and str(r["target"]) == t]
            assert cell["quality_n"] == len(mine) == 3
            for k in QUALITY_FIELDS:
                assert cell[k] == pytest.approx(sum(r[k] for r in mine) / 3)

    assert _run(policy, data, out, "--no-guidance") == 0
    unguided = _lines(out / "lifebench_unguided.jsonl")
    assert len(unguided) == 24 and not any(r["guided"] for r in unguided)
    assert json.loads((out / "lifebench_unguided.json").read_text())["config"]["value_model"] is None
    assert all(math.isfinite(r["nll"]) for r in unguided if not r["skipped"])
    printed = capsys.readouterr().out
    assert "unguided beside the guided run" in printed and "NLL guided" in printed and "ΔNLL (unguided)" in printed
    modes = {mode for mode, _ in score_series(out)}
    assert modes == {"guided", "unguided"}  # the plot draws both runs


def test_rerun_resumes_and_skips_done_cells(setup, tmp_path, capsys, torch_value_head):
    policy, _, data, _ = setup
    out = tmp_path / "out"
    assert _run(policy, data, out, "--no-guidance", "--constraints", "equal", "--limit", "2") == 0
    path = out / "lifebench_unguided.jsonl"
    first = _lines(path)
    assert len(first) == 4
    capsys.readouterr()
    assert _run(policy, data, out, "--no-guidance", "--constraints", "equal", "--limit", "2", "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["results"]["evaluated_now"] == 0 and _lines(path) == first
    assert record["results"]["quality"]["all"]["n"] == 4

    # records written before the quality fields existed are kept, and left out of the quality means
    first = [{k: v for k, v in r.items() if k not in QUALITY_FIELDS} for r in first]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in first), encoding="utf-8")
    with path.open("a", encoding="utf-8") as f:  # an interrupted write leaves a torn last line
        f.write('{"id": "9", "constr')
    assert _run(policy, data, out, "--no-guidance", "--constraints", "equal", "--limit", "3", "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["results"]["evaluated_now"] == 2 and record["results"]["ignored_result_lines"] == 1
    assert record["results"]["counts"]["cells"] == 6
    assert record["results"]["quality"]["all"]["n"] == 2 and math.isfinite(record["results"]["quality"]["all"]["nll"])
    kept = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in kept[:4]] == first and len(kept) == 7  # 4 + torn line + 2 new

    assert _run(policy, data, out, "--no-guidance", "--constraints", "equal", "--max-new-tokens-factor", "3") == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.jsonl"], "does not exist"),
    (["--constraints", "equal,around"], "unknown length constraint 'around'"),
    (["--targets", ""], "target list is empty"),
    (["--targets", "4,-8"], "positive ints"),
    ([], "needs --value-model"),
])
def test_bad_input_exits_2_with_one_error_line(setup, tmp_path, capsys, argv, message):
    policy, _, data, _ = setup
    base = ["lifebench", "--model", str(policy), "--data", str(data), "--out", str(tmp_path / "o")]
    extra = [] if argv == [] else ["--no-guidance"]
    assert _cli(base + extra + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_a_file_of_only_malformed_lines_is_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('not json\n{"id": 1, "lang": "fr", "task": "{word_count_type} {word_count}"}\n')
    with pytest.raises(ValueError, match="no valid LIFEBench units \\(2 malformed lines\\)"):
        read_units(bad)


def test_band_rule_runs_are_recorded_and_kept_apart(setup, tmp_path, torch_value_head):
    policy, head, data, _ = setup
    out = tmp_path / "out"
    assert _run(policy, data, out, "--value-model", str(head), "--constraints", "equal", "--length-rule", "band") == 0
    summary = json.loads((out / "lifebench_guided.json").read_text())
    assert summary["config"]["equal_rule"] == "band"
    # the same directory with the strict rule is another run: its cells are not reused
    assert _run(policy, data, out, "--value-model", str(head), "--constraints", "equal", "--length-rule",
                "strict") == 2
    assert _run(policy, data, out, "--value-model", str(head), "--constraints", "equal") == 0  # band: the default


def test_bound_band_runs_are_recorded_and_keep_their_bounds(setup, tmp_path, torch_value_head):
    policy, head, data, _ = setup
    out, strict = tmp_path / "out", tmp_path / "strict"
    # both bounds take the band rule by default
    assert _run(policy, data, out, "--value-model", str(head), "--constraints", "at-most,at-least") == 0
    config = json.loads((out / "lifebench_guided.json").read_text())["config"]
    assert config["at_most_rule"] == config["at_least_rule"] == "band"
    records = [json.loads(line) for line in (out / "lifebench_guided.jsonl").read_text().splitlines()]
    ran = [r for r in records if not r["skipped"]]
    assert ran and all(r["length"] <= r["target"] if r["constraint"] == "at_most" else
                       r["length"] >= r["target"] or r["finish_reason"] == "length" for r in ran)
    assert _run(policy, data, out, "--value-model", str(head), "--constraints", "at-most",
                "--at-least-rule", "strict") == 2  # another run
    assert _run(policy, data, strict, "--value-model", str(head), "--constraints", "at-most", "--targets", "4",
                "--at-most-rule", "strict", "--at-least-rule", "strict") == 0
    config = json.loads((strict / "lifebench_guided.json").read_text())["config"]
    assert "at_most_rule" not in config and "at_least_rule" not in config  # the paper's rules: not recorded


def test_unknown_equal_rule_is_refused(setup, tmp_path):
    import lenvm_rt
    from lenvm_rt.eval.lifebench import run_lifebench

    policy, _, data, _ = setup
    rt = lenvm_rt.load(str(policy))
    units = read_units(data)[0]
    with pytest.raises(ValueError, match="length rule"):
        run_lifebench(rt, units, "4", "equal", False, tmp_path / "out", rules={"equal": "fuzzy"}, progress=False)
    with pytest.raises(ValueError, match="'soft' applies to the equal constraint only"):
        run_lifebench(rt, units, "4", "at_most", False, tmp_path / "out", rules={"at_most": "soft"}, progress=False)
    with pytest.raises(ValueError, match="unknown constraint 'exact'"):
        run_lifebench(rt, units, "4", "at_most", False, tmp_path / "out", rules={"exact": "band"}, progress=False)


def test_every_kth_unit_is_a_stratified_subset_in_id_order():
    units = [Unit(str(i), lang, "t", category) for i, (category, lang) in
             enumerate([("qa", "en")] * 5 + [("qa", "cn")] * 2 + [("create", "en")] * 4, start=1)]
    units.reverse()  # file order must not matter
    picked = [u.id for u in every_kth_unit(units, 3)]
    assert picked == ["1", "4", "6", "8", "11"]  # qa/en 1..5 -> 1, 4; qa/cn 6, 7 -> 6; create/en 8..11 -> 8, 11
    assert every_kth_unit(units, 1) == units
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            every_kth_unit(units, bad)
