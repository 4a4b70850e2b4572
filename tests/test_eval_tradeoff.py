"""The trade-off evaluation: answer extraction, gold parsing, hard-budget accounting, the CLI end to end."""
from __future__ import annotations

import argparse
import json
import math
import re
import sys

import pytest
from checkpoints import make_checkpoint, make_value_head

from lenvm_rt.cli_eval import add_eval_commands
from lenvm_rt.eval.answers import answers_match, extract_answer, gold_answer
from lenvm_rt.eval.arithmetic import make_problems, write_problems
from lenvm_rt.eval.data import Record, append_jsonl, read_records, read_samples
from lenvm_rt.eval.tradeoff import (
    TradeoffSettings,
    _digest,
    _key,
    budget_point,
    curve_point,
    parse_betas,
    parse_budgets,
    score,
    summarize,
    table,
)
from lenvm_rt.quality import FIELDS as QUALITY_FIELDS


def run_cli(argv: list[str]) -> int:
    """The `eval` group as cli.py wires it, with cli.main's error handling."""
    parser = argparse.ArgumentParser(prog="lenvm-rt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_commands(sub.add_parser("eval").add_subparsers(dest="eval", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


@pytest.mark.parametrize("text, expected", [
    ("So the total is \\boxed{42}.", "42"),
    ("First 3 + 4 = 7, \\boxed{7} then \\boxed{1,234}", "1,234"),
    ("\\boxed{\\frac{1}{2}} and 9", "\\frac{1}{2}"),
    ("nested \\boxed{x^{2}} here", "x^{2}"),
    ("Add 12 and 30 to get 42. Done.", "42"),
    ("He pays $1,250 in total", "1250"),
    ("The change is -5 dollars", "-5"),
    ("Each costs 2.75 dollars", "2.75"),
    ("a cut response \\boxed{12", "12"),
    ("no answer here at all", None),
])
def test_extract_answer_takes_the_last_boxed_else_the_last_number(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("predicted, gold, same", [
    ("1,234", "1234", True),
    ("18.0", "18", True),
    ("$12", "12", True),
    ("\\$12.50", "12.5", True),
    ("-3", "-3", True),
    ("-3", "3", False),
    ("0.5", "1/2", True),
    ("18 \\text{ dollars}", "18", True),
    ("17", "18", False),
    (None, "18", False),
])
def test_answers_match_numerically(predicted, gold, same):
    assert answers_match(predicted, gold) is same


def test_gold_answer_is_the_number_after_the_hashes_without_commas():
    assert gold_answer("She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072") == "1072"
    assert gold_answer("so the loss is\n#### -5") == "-5"
    assert gold_answer("#### 3.5") == "3.5"
    assert gold_answer(72) == "72"
    assert gold_answer("18") == "18"
    with pytest.raises(ValueError, match="####"):
        gold_answer("the answer is clearly large")
    with pytest.raises(ValueError, match="nothing after"):
        gold_answer("steps\n#### ")


def test_a_cut_response_is_wrong_even_with_the_right_answer():
    assert score("\\boxed{7}", "stop", "7") == ("7", True)
    assert score("\\boxed{7}", "length", "7") == ("7", False)
    assert score("I think 8", "stop", "7") == ("8", False)


def test_hard_budget_counts_longer_responses_as_wrong_and_as_the_budget():
    rows = [("q1", True, 50), ("q1", True, 150), ("q2", False, 80), ("q2", True, 300)]
    point = budget_point(rows, 100)
    assert point["budget"] == 100 and point["count"] == 4 and point["over_budget"] == 2
    assert point["accuracy"] == pytest.approx((0.5 + 0.0) / 2)
    assert point["mean_tokens"] == pytest.approx(((50 + 100) / 2 + (80 + 100) / 2) / 2)
    wide = budget_point(rows, 300)  # nothing over budget: the unguided point itself
    assert wide["over_budget"] == 0 and wide["accuracy"] == pytest.approx(curve_point(rows)["accuracy"])
    assert wide["accuracy"] == pytest.approx((1.0 + 0.5) / 2)


def test_pass_at_one_averages_each_question_first():
    rows = [("a", True, 10), ("b", False, 20), ("b", False, 40), ("b", True, 60)]
    point = curve_point(rows)
    assert point["accuracy"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert point["mean_tokens"] == pytest.approx((10 + 40) / 2)
    assert point["questions"] == 2


def test_summarize_scores_both_curves_from_the_sample_log():
    settings = TradeoffSettings(betas=(0.0, -100.0), budgets=(5, 20), samples=2, max_new_tokens=32)
    q = Record("q1", 1, [{"role": "user", "content": "What is 3+4?"}], {"question": "What is 3+4?",
                                                                        "answer": "#### 7"})
    texts = {("tilt", 0.0): [("so \\boxed{7}", "stop", 10), ("\\boxed{8}", "stop", 12)],
             ("tilt", -100.0): [("7", "stop", 4), ("7", "length", 32)],
             ("unguided", None): [("3+4 = 7", "stop", 9), ("it is \\boxed{7}", "stop", 30)]}
    done = {_key(m, b, q.id, _digest(q), j): {"text": t, "finish_reason": f, "num_tokens": n}
            for (m, b), rows in texts.items() for j, (t, f, n) in enumerate(rows)}
    res = summarize(done, [q], settings)
    by_beta = {p["beta"]: p for p in res["tilt"]}
    assert by_beta[0.0]["accuracy"] == 0.5 and by_beta[0.0]["mean_tokens"] == 11
    assert by_beta[-100.0]["accuracy"] == 0.5 and by_beta[-100.0]["cut"] == 1
    assert res["unguided"]["accuracy"] == 1.0
    budgets = {p["budget"]: p for p in res["hard_budget"]}
    assert budgets[5]["accuracy"] == 0.0 and budgets[5]["mean_tokens"] == 5
    assert budgets[20]["accuracy"] == 0.5 and budgets[20]["mean_tokens"] == (9 + 20) / 2
    assert len(res["samples"]) == 6 and all(s["gold"] == "7" for s in res["samples"])
    # these rows predate the quality fields: kept, and left out of the quality means
    assert all(s["nll"] is None for s in res["samples"]) and res["unguided"]["quality_n"] == 0
    assert res["unguided"]["nll"] is None and "NLL" in table(res)


def test_quality_means_per_beta_and_budget_rows_use_the_unguided_responses():
    settings = TradeoffSettings(betas=(0.0,), budgets=(5,), samples=2, max_new_tokens=32)
    q = Record("q1", 1, "What is 3+4?", {"question": "What is 3+4?", "answer": "#### 7"})
    quality = {("tilt", 0.0): [(2.0, 0.0), (4.0, 0.5)], ("unguided", None): [(1.0, 0.1), None]}  # None: an old row
    done = {}
    for (m, b), rows in quality.items():
        for j, qual in enumerate(rows):
            fields = {} if qual is None else {"nll": qual[0], "mean_rank": 2.0 + j, "mean_prob": 0.5,
                                              "repetition_rate": qual[1]}
            done[_key(m, b, q.id, _digest(q), j)] = {"text": "\\boxed{7}", "finish_reason": "stop", "num_tokens": 9,
                                                      **fields}
    res = summarize(done, [q], settings)
    tilt = res["tilt"][0]
    assert (tilt["nll"], tilt["repetition_rate"], tilt["mean_rank"], tilt["quality_n"]) == (3.0, 0.25, 2.5, 2)
    assert (res["unguided"]["nll"], res["unguided"]["quality_n"]) == (1.0, 1)
    assert res["hard_budget"][0]["nll"] == 1.0 and res["hard_budget"][0]["repetition_rate"] == 0.1
    printed = table(res)
    assert "3.000" in printed and "25.0%" in printed and "rep4" in printed


def test_at_most_rows_stand_beside_the_unguided_run_truncated_at_the_same_length():
    settings = TradeoffSettings(betas=(0.0,), budgets=(8,), at_most=(4,), samples=2, max_new_tokens=32)
    q = Record("q1", 1, "What is 3+4?", {"question": "What is 3+4?", "answer": "#### 7"})
    texts = {("tilt", 0.0): [("\\boxed{7}", "stop", 9)] * 2,
             ("at_most", 4): [("7", "stop", 3), ("\\boxed{8}", "stop", 5)],
             ("unguided", None): [("so 7", "stop", 5), ("it is \\boxed{7}", "stop", 6)]}
    done = {_key(m, b, q.id, _digest(q), j): {"text": t, "finish_reason": f, "num_tokens": n}
            for (m, b), rows in texts.items() for j, (t, f, n) in enumerate(rows)}
    point = summarize(done, [q], settings)["at_most"][0]
    assert point["target"] == 4 and point["accuracy"] == 0.5 and point["mean_tokens"] == 4
    assert point["over_target"] == 0  # N = 4 response tokens + EOS = 5 generated tokens at most
    truncated = point["truncated"]  # unguided responses of more than N + 1 = 5 tokens are cut: wrong
    assert truncated["budget"] == 5 and truncated["accuracy"] == 0.5 and truncated["mean_tokens"] == 5
    assert "N=4" in table(summarize(done, [q], settings))


@pytest.mark.parametrize("change, message", [
    ({"at_most": (0,)}, "at-most target must be an int"),
    ({"at_most": (32,), "budgets": (8,), "max_new_tokens": 32}, "at-most target must be an int"),
    ({"betas": ()}, "betas must not be empty"),
    ({"budgets": ()}, "budgets must not be empty"),
    ({"samples": 0}, "samples must be a positive int"),
    ({"betas": (5.0,)}, "β must be a finite number <= 0"),
    ({"budgets": (1000,)}, "budget must be an int in"),
    ({"min_p": 2.0}, "min_p"),
    ({"at_most_rule": "soft"}, "at_most_rule must be 'strict' or 'band'"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        TradeoffSettings(**change).check()


def test_empty_beta_and_budget_lists_are_refused():
    assert parse_betas("0, -20,-1000") == [0.0, -20.0, -1000.0]
    assert parse_budgets("64,128") == [64, 128]
    for parse, text in ((parse_betas, ""), (parse_betas, " , "), (parse_budgets, ""), (parse_budgets, "1.5")):
        with pytest.raises(ValueError):
            parse(text)
    with pytest.raises(ValueError, match="--at-most must be integers"):
        parse_budgets("8,x", "--at-most")


def test_arithmetic_problems_are_reproducible_and_solvable(tmp_path):
    problems = make_problems(40, seed=3)
    assert problems == make_problems(40, seed=3) and problems != make_problems(40, seed=4)
    for p in problems:
        gold = gold_answer(p["answer"])
        last_step = p["answer"].split("\n")[-2]
        assert int(gold) >= 0 and last_step.split(">>")[1].split(" ")[0] == gold
        for expr, value in re.findall(r"<<([0-9+\-*/]+)=(\d+)>>", p["answer"]):
            assert eval(expr) == int(value)  # the calculator annotations are right
    path = write_problems(problems, tmp_path / "a.jsonl")
    assert len(read_records(path).items) == 40
    with pytest.raises(ValueError, match="positive int"):
        make_problems(0)
    easy = make_problems(30, seed=3, max_operand=3, two_step_share=0.0)
    assert all(int(gold_answer(p["answer"])) <= 9 for p in easy)  # at most 3 + 3, 6 - 2, 3 * 3 or 9 / 3
    with pytest.raises(ValueError, match="max_operand"):
        make_problems(5, max_operand=1)


def test_sample_log_drops_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    append_jsonl(log, [{"a": 1}, {"a": 2}])
    with open(log, "a", encoding="utf-8") as fh:
        fh.write('{"a": 3, "te')  # an interrupted write
    assert read_samples(log) == [{"a": 1}, {"a": 2}]
    assert log.read_text().endswith("}\n")  # truncated: the next append starts on a fresh line
    log.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="log.jsonl:2"):
        read_samples(log)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tradeoff")
    policy = make_checkpoint(root / "policy", "llama", seed=1)
    head = make_value_head(root / "head" / "value_head.safetensors", 64, gamma=0.99)
    return policy, head


def _base(models, data, out) -> list[str]:
    policy, head = models
    return ["eval", "tradeoff", "--model", str(policy), "--value-model", str(head), "--device", "cpu",
            "--data", str(data), "--out", str(out), "--no-progress", "--max-new-tokens", "4", "--budgets", "2,4"]


def test_tradeoff_end_to_end_writes_json_png_and_resumes(models, tmp_path, capsys):
    data = tmp_path / "arith.jsonl"
    assert run_cli(["eval", "make-arithmetic", "--out", str(data), "--n", "3", "--seed", "0"]) == 0
    with open(data, "a", encoding="utf-8") as fh:  # line 4 malformed, line 5 lacks a gold answer
        fh.write('{"question": "broken"\n{"question": "What is 2+2?", "answer": "no final line"}\n')
    out = tmp_path / "run"
    argv = _base(models, data, out) + ["--betas=0,-1000", "--samples", "2", "--limit", "2"]
    assert run_cli(argv) == 0
    captured = capsys.readouterr()
    assert "pass@1" in captured.out and "B=2" in captured.out and "β=-1000" in captured.out
    record = json.loads((out / "tradeoff.json").read_text())
    res = record["results"]
    assert record["machine"] and record["versions"] and record["config"]["samples"] == 2
    assert [p["beta"] for p in res["tilt"]] == [0.0, -1000.0] and [p["budget"] for p in res["hard_budget"]] == [2, 4]
    assert all(p["count"] == 4 for p in res["tilt"]) and res["unguided"]["count"] == 4
    assert all(p["mean_tokens"] <= 4 for p in res["tilt"] + res["hard_budget"])
    assert (out / "tradeoff.png").stat().st_size > 0
    assert "NLL" in captured.out and "rep4" in captured.out
    for s in res["samples"]:
        assert all(math.isfinite(s[k]) for k in QUALITY_FIELDS), s
        assert s["nll"] > 0 and 1 <= s["mean_rank"] <= 384 and 0 < s["mean_prob"] < 1
    for p in res["tilt"] + [res["unguided"]] + res["hard_budget"]:
        assert p["quality_n"] == 4 and all(math.isfinite(p[k]) for k in QUALITY_FIELDS)
    unguided = [s for s in res["samples"] if s["method"] == "unguided"]
    assert res["unguided"]["nll"] == pytest.approx(sum(s["nll"] for s in unguided) / 4)
    assert all(p["nll"] == res["unguided"]["nll"] for p in res["hard_budget"])
    log = out / "tradeoff_samples.jsonl"
    assert all(math.isfinite(r["nll"]) for r in read_samples(log))
    assert len(log.read_text().splitlines()) == 12  # 2 questions x 2 samples x (2 β + unguided)
    assert run_cli(argv[:-3] + ["3"] + argv[-2:]) == 0  # one more sample each: only 6 new rows
    assert len(log.read_text().splitlines()) == 18
    assert json.loads((out / "tradeoff.json").read_text())["results"]["unguided"]["count"] == 6
    other = [a if a != "4" else "3" for a in argv] + ["--budgets", "2"]  # another cap: samples are not comparable
    assert run_cli(other) == 2 and "use a new --out" in capsys.readouterr().err


def test_at_most_rows_end_to_end_never_exceed_their_target(models, tmp_path, capsys):
    data = tmp_path / "arith.jsonl"
    assert run_cli(["eval", "make-arithmetic", "--out", str(data), "--n", "2", "--seed", "1"]) == 0
    out = tmp_path / "run"
    assert run_cli(_base(models, data, out) + ["--betas", "0", "--samples", "2", "--at-most", "1,2"]) == 0
    assert "at most" in capsys.readouterr().out
    res = json.loads((out / "tradeoff.json").read_text())["results"]
    assert [p["target"] for p in res["at_most"]] == [1, 2]
    for p in res["at_most"]:
        lengths = [s["num_tokens"] for s in res["samples"] if s["method"] == "at_most" and s["target"] == p["target"]]
        assert len(lengths) == p["count"] == 4 and max(lengths) <= p["target"] + 1  # N tokens, then EOS
        assert p["over_target"] == 0 and p["truncated"]["budget"] == p["target"] + 1
    band = tmp_path / "band"
    assert run_cli(_base(models, data, band) + ["--betas", "0", "--samples", "2", "--at-most", "2",
                                                "--at-most-rule", "band"]) == 0
    record = json.loads((band / "tradeoff.json").read_text())
    assert record["config"]["at_most_rule"] == "band"
    lengths = [s["num_tokens"] for s in record["results"]["samples"] if s["method"] == "at_most"]
    assert len(lengths) == 4 and max(lengths) <= 3


def test_malformed_lines_are_reported_with_their_line_numbers_and_skipped(models, tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "What is 2+3?", "answer": "#### 5"}\nnot json\n[1, 2]\n'
                    '{"question": "What is 1+1?"}\n{"question": "What is 4+4?", "answer": "#### 8"}\n')
    out = tmp_path / "run"
    argv = _base(models, data, out) + ["--betas", "0", "--samples", "1", "--json"]
    assert run_cli(argv) == 0
    captured = capsys.readouterr()
    for line in (2, 3, 4):
        assert f"q.jsonl:{line}:" in captured.err
    summary = json.loads(captured.out)
    assert summary["unguided"]["questions"] == 2 and len(summary["skipped_lines"]) == 3


@pytest.mark.parametrize("extra, message", [
    (["--betas", ""], "--betas must list at least one"),
    (["--budgets", ""], "--budgets must list at least one"),
    (["--samples", "0"], "samples must be a positive int"),
    (["--samples", "-2"], "samples must be a positive int"),
    (["--budgets", "8"], "budget must be an int in"),
    (["--at-most", "4"], "at-most target must be an int"),
    (["--at-most", "two"], "--at-most must be integers"),
])
def test_bad_arguments_exit_2_with_an_error_line(models, tmp_path, capsys, extra, message):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "What is 2+3?", "answer": "#### 5"}\n')
    assert run_cli(_base(models, data, tmp_path / "run") + extra) == 2
    assert message in capsys.readouterr().err


def test_missing_and_empty_data_files_exit_2(models, tmp_path, capsys):
    assert run_cli(_base(models, tmp_path / "nope.jsonl", tmp_path / "run")) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert run_cli(_base(models, empty, tmp_path / "run")) == 2
    assert "holds no usable records" in capsys.readouterr().err
