"""Prompt-boundary MRE: the transformed-space ground truth, the metric, position errors, the CLI end to end."""
from __future__ import annotations

import argparse
import json
import math
import sys

import pytest
import torch
from checkpoints import make_checkpoint, make_value_head

import lenvm_rt
from lenvm_rt.cli_eval import add_eval_commands
from lenvm_rt.eval.data import math_prompt, prompt_of, read_records
from lenvm_rt.eval.mre import (
    MRESettings,
    ground_truth_length,
    mean_relative_error,
    position_errors,
    relative_error,
    run_mre,
)

GAMMA = 0.99


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


def test_ground_truth_of_equal_lengths_is_that_length():
    assert ground_truth_length([37, 37, 37], GAMMA) == pytest.approx(37.0, rel=1e-12)


def test_ground_truth_is_the_transformed_space_mean():
    # γ = 0.5, L = 1 and 3: mean γ^L = (0.5 + 0.125)/2 = 0.3125, so L_GT = log2(1/0.3125) = 1.678...
    assert ground_truth_length([1, 3], 0.5) == pytest.approx(math.log(0.3125) / math.log(0.5), rel=1e-12)
    lengths, g = [5, 40, 200, 17], 0.997
    u = sum(1 - g**n for n in lengths) / len(lengths)  # the paper's Eqs. 13-14 literally
    assert ground_truth_length(lengths, g) == pytest.approx(math.log(1 - u) / math.log(g), rel=1e-9)
    assert ground_truth_length(lengths, g) < sum(lengths) / len(lengths)  # Jensen: at most the mean


def test_ground_truth_survives_lengths_where_one_minus_gamma_power_rounds_to_one():
    assert ground_truth_length([5000, 6000], GAMMA) == pytest.approx(5000 + math.log(2) / -math.log(GAMMA), rel=1e-3)


@pytest.mark.parametrize("lengths, gamma, message", [
    ([], GAMMA, "at least one"),
    ([0, 3], GAMMA, ">= 1"),
    ([3], 1.0, "gamma must be"),
])
def test_ground_truth_rejects_bad_input(lengths, gamma, message):
    with pytest.raises(ValueError, match=message):
        ground_truth_length(lengths, gamma)


def test_mre_is_the_mean_relative_error_over_prompts():
    assert mean_relative_error([110.0, 45.0, 30.0], [100.0, 50.0, 30.0]) == pytest.approx((0.1 + 0.1 + 0.0) / 3)
    assert relative_error(50.0, 100.0) == 0.5
    with pytest.raises(ValueError, match="positive"):
        relative_error(1.0, 0.0)
    with pytest.raises(ValueError, match="same count"):
        mean_relative_error([1.0], [1.0, 2.0])


def test_position_errors_at_relative_positions():
    # L = 4: states s_0..s_4; i = floor(q L) = 0, 1, 2, 3 with 4, 3, 2, 1 tokens left
    along = [([5.0, 3.0, 2.0, 1.5, 0.0], 4)]
    errors = position_errors(along)
    assert errors == pytest.approx({"0%": 0.25, "25%": 0.0, "50%": 0.0, "75%": 0.5})
    oracle = [([float(8 - i) for i in range(9)], 8)]
    assert all(v == 0.0 for v in position_errors(oracle).values())
    assert all(v is None for v in position_errors([]).values())


def test_prompt_forms_messages_prompt_and_question():
    chat = [{"role": "user", "content": "hi"}]
    assert prompt_of({"messages": chat}) == chat
    assert prompt_of({"prompt": "hi"}) == chat and prompt_of({"prompt": "hi"}, raw=True) == "hi"
    assert prompt_of({"question": "2+2?"}) == math_prompt("2+2?")
    assert "\\boxed{}" in math_prompt("2+2?")[0]["content"]
    for bad in ({"messages": []}, {"prompt": ""}, {"text": "x"}, {"messages": [{"role": "user"}]}):
        with pytest.raises(ValueError):
            prompt_of(bad)


def test_read_records_reports_line_numbers_and_keeps_the_rest(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{oops\n\n{"id": "x", "question": "b"}\n{"id": "x", "prompt": "c"}\n'
                    '{"messages": "nope"}\n')
    rows = read_records(path)
    assert [r.id for r in rows.items] == ["1", "x"] and [r.line for r in rows.items] == [1, 4]
    assert [e.split(":")[1] for e in rows.errors] == ["2", "5", "6"]
    assert "duplicate id 'x'" in rows.errors[1]
    assert [r.id for r in read_records(path, limit=1).items] == ["1"] and read_records(path, limit=1).errors == []
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match="no usable records"):
        read_records(tmp_path / "e.jsonl")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mre")
    policy = make_checkpoint(root / "policy", "llama", seed=1)
    head = make_value_head(root / "head" / "value_head.safetensors", 64, gamma=GAMMA)
    return policy, head


def _base(models, data, out) -> list[str]:
    policy, head = models
    return ["eval", "mre", "--model", str(policy), "--value-model", str(head), "--device", "cpu",
            "--data", str(data), "--out", str(out), "--no-progress"]


def test_mre_end_to_end_writes_json_and_scatter_plot(models, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": "chat", "messages": [{"role": "user", "content": "Say hi."}]}\n'
                    '{"id": "text", "prompt": "Name a colour."}\n'
                    '{"broken": \n'
                    '{"id": "math", "question": "What is 2+3?", "answer": "#### 5"}\n')
    out = tmp_path / "run"
    assert run_cli(_base(models, data, out) + ["--samples", "3", "--max-tokens", "48"]) == 0
    captured = capsys.readouterr()
    assert "p.jsonl:3:" in captured.err and "MRE" in captured.out
    record = json.loads((out / "mre.json").read_text())
    res = record["results"]
    assert record["config"]["gamma"] == GAMMA and record["machine"] and record["versions"]
    assert res["prompts"] == 3 and res["completions"] == 9 and len(res["skipped_lines"]) == 1
    rt = lenvm_rt.load(models[0], value_model=models[1], device="cpu")
    prompts = {"chat": [{"role": "user", "content": "Say hi."}], "math": math_prompt("What is 2+3?"),
               "text": [{"role": "user", "content": "Name a colour."}]}
    for p in res["per_prompt"]:
        assert p["predicted"] == pytest.approx(rt.predict_length(prompts[p["id"]])[0], rel=1e-5)
        assert p["ground_truth"] == pytest.approx(ground_truth_length(p["lengths"], GAMMA))
        assert p["cut"] == sum(n == 48 for n in p["lengths"])  # with a random model, an EOS at 48 is unlikely
    assert res["cut_completions"] == sum(p["cut"] for p in res["per_prompt"])
    assert res["mre"] == pytest.approx(sum(p["rel_error"] for p in res["per_prompt"]) / 3)
    assert set(res["position_rel_error"]) == {"0%", "25%", "50%", "75%"}
    assert (out / "mre.png").stat().st_size > 0
    rollouts = (out / "rollouts" / "rollouts.jsonl").read_text()
    assert run_cli(_base(models, data, out) + ["--samples", "3", "--max-tokens", "48", "--json"]) == 0
    assert (out / "rollouts" / "rollouts.jsonl").read_text() == rollouts  # resumed: nothing sampled again
    assert json.loads(capsys.readouterr().out)["mre"] == pytest.approx(res["mre"])


def test_position_errors_come_from_the_completions_that_ended(models, tmp_path):
    rt = lenvm_rt.load(models[0], value_model=models[1], device="cpu")
    lm_logits = rt.model.lm_logits

    def eos_likely(normed: torch.Tensor) -> torch.Tensor:
        boosted = lm_logits(normed).clone()
        boosted[:, 2] += 4.0  # EOS: completions end after a few tokens, some reach the cap
        return boosted

    rt.model.lm_logits = eos_likely
    records = read_records(_write(tmp_path / "p.jsonl", ['{"prompt": "Say hi."}', '{"prompt": "Count."}'])).items
    res = run_mre(rt, records, tmp_path / "run", MRESettings(samples=6, max_tokens=6), progress=False)["results"]
    ended = [(p, n) for p in res["per_prompt"] for n in p["lengths"] if n < 6]
    assert res["position_completions"] == len(ended) > 0 and 0 < res["cut_completions"] < 12
    at_start = sum(abs(p["predicted"] - n) / n for p, n in ended) / len(ended)  # s_0 is the prompt boundary
    assert res["position_rel_error"]["0%"] == pytest.approx(at_start, rel=1e-4)
    assert all(v is not None and v >= 0 for v in res["position_rel_error"].values())


def _write(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("extra, message", [
    (["--samples", "0"], "samples must be a positive int"),
    (["--max-tokens", "0"], "max_tokens must be a positive int"),
    (["--limit", "0"], "limit must be a positive int"),
])
def test_bad_arguments_exit_2(models, tmp_path, capsys, extra, message):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    assert run_cli(_base(models, data, tmp_path / "run") + extra) == 2
    assert message in capsys.readouterr().err


def test_missing_empty_and_all_malformed_files_exit_2(models, tmp_path, capsys):
    assert run_cli(_base(models, tmp_path / "nope.jsonl", tmp_path / "run")) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{\"text\": 1}\n")
    assert run_cli(_base(models, bad, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "no usable records" in err and "bad.jsonl:1:" in err and "bad.jsonl:2:" in err
