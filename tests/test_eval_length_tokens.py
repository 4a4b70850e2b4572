"""Length tokens: TD-residual counts per token string, ranking, the CLI end to end and its bad input."""
from __future__ import annotations

import argparse
import json
import sys

import pytest
from checkpoints import make_checkpoint, make_value_head

import lenvm_rt
from lenvm_rt.cli_eval import add_eval_commands
from lenvm_rt.eval.length_tokens import aggregate, load_completions, token_key, top_tokens
from lenvm_rt.rollouts import read_rollouts
from lenvm_rt.values import TokenValues

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


def _tv(tokens: list[str], td: list[float], ids: list[int]) -> TokenValues:
    n = len(tokens)
    return TokenValues(token_ids=ids, tokens=tokens, logits=[0.0] * n, value=[0.5] * n, remaining=[1.0] * n, td=td,
                       true_remaining=None, prompt_value=0.5, prompt_remaining=1.0, gamma=GAMMA)


def test_token_key_folds_case_and_space_but_keeps_whitespace_tokens():
    assert token_key(" But") == "but" and token_key("Therefore") == "therefore"
    assert token_key("\n\n") == "\n\n" and token_key(" ") == " "


def test_aggregate_counts_each_direction_past_the_threshold_and_skips_the_final_eos():
    a = _tv(["Wait", " but", "\n\n", " wait", "<|im_end|>"], [0.05, 0.02, -0.03, 0.005, -0.5], [10, 11, 12, 13, 2])
    b = _tv([" Wait", " so", "<|im_end|>"], [-0.02, 0.0, 0.3], [14, 15, 16])  # 16 is no EOS: counted
    stats = aggregate([a, b], 0.01, eos_ids=[2])
    assert set(stats) == {"wait", "but", "\n\n", "so", "<|im_end|>"}
    w = stats["wait"]
    assert (w.count, w.positive, w.negative) == (3, 1, 1) and w.mean_td == pytest.approx((0.05 + 0.005 - 0.02) / 3)
    assert (stats["\n\n"].negative, stats["but"].positive, stats["so"].positive + stats["so"].negative) == (1, 1, 0)
    assert stats["<|im_end|>"].count == 1 and stats["<|im_end|>"].positive == 1
    assert sum(s.count for s in stats.values()) == 7


def test_top_tokens_rank_by_count_then_by_mean_residual():
    a = _tv(["x", "y", "y", "z", "z", "q"], [0.2, 0.05, 0.05, 0.02, 0.03, -0.5], [1, 2, 2, 3, 3, 4])
    stats = aggregate([a], 0.01)
    longer = top_tokens(stats, 2, +1)
    assert [t["token"] for t in longer] == ["y", "z"]  # both twice; y's mean δ is larger
    assert longer[0] == {"token": "y", "positive": 2, "count": 2, "share": 1.0, "mean_td": pytest.approx(0.05)}
    assert [t["token"] for t in top_tokens(stats, 5, -1)] == ["q"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("length_tokens")
    policy = make_checkpoint(root / "policy", "llama", seed=1)
    head = make_value_head(root / "head" / "value_head.safetensors", 64, gamma=GAMMA)
    return policy, head


def _base(models, data, out) -> list[str]:
    policy, head = models
    return ["eval", "length-tokens", "--model", str(policy), "--value-model", str(head), "--device", "cpu",
            "--data", str(data), "--out", str(out), "--no-progress"]


RESPONSES = ["The quick brown fox jumps. But wait, the dog is lazy.", "Answer: 42."]


def test_length_tokens_end_to_end_on_given_and_sampled_completions(models, tmp_path, capsys):
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join([
        json.dumps({"prompt": "Tell me about foxes.", "response": RESPONSES[0]}),
        "{not json",
        json.dumps({"prompt": "What is 12 plus 30?", "response": RESPONSES[1]}),
        json.dumps({"prompt": "empty", "response": ""}),
        json.dumps({"messages": [{"role": "user", "content": "Say hi."}]}),
    ]) + "\n")
    out = tmp_path / "run"
    argv = _base(models, data, out) + ["--samples", "2", "--max-tokens", "12", "--top", "5", "--threshold", "0.01"]
    assert run_cli(argv) == 0
    captured = capsys.readouterr()
    assert "c.jsonl:2:" in captured.err and "c.jsonl:4:" in captured.err and "longer" in captured.out
    record = json.loads((out / "length_tokens.json").read_text())
    res = record["results"]
    assert record["config"]["threshold"] == 0.01 and record["machine"] and record["versions"]
    assert res["given_responses"] == 2 and res["sampled_completions"] == 2 and res["completions"] == 4
    assert len(res["positive"]) <= 5 and len(res["negative"]) <= 5
    assert res["positive_tokens"] == sum(t["positive"] for t in res["per_token"])
    assert res["tokens"] == sum(t["count"] for t in res["per_token"])
    rt = lenvm_rt.load(models[0], value_model=models[1], device="cpu")
    given = [rt.token_values([{"role": "user", "content": p}], r)
             for p, r in zip(["Tell me about foxes.", "What is 12 plus 30?"], RESPONSES)]
    sampled = [rt.token_values(r.prompt_ids, r.completion_ids) for r in read_rollouts(out / "rollouts")[1]]
    expected = aggregate(given + sampled, 0.01, rt.eos_token_ids)
    by_token = {t["token"]: t for t in res["per_token"]}
    assert set(by_token) == set(expected)
    for key, stat in expected.items():
        assert (by_token[key]["count"], by_token[key]["positive"], by_token[key]["negative"]) == (
            stat.count, stat.positive, stat.negative)
    assert (out / "length_tokens.png").stat().st_size > 0
    assert run_cli(argv + ["--json"]) == 0  # resumed: the sampled completions are reused
    assert json.loads(capsys.readouterr().out)["tokens"] == res["tokens"]


def test_load_completions_rejects_a_non_text_response_by_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "a", "response": 5}\n{"prompt": "b", "response": "ok"}\n')
    rows = load_completions(path)
    assert [r.line for r in rows.items] == [2] and rows.errors[0].endswith(":1: 'response' must be non-empty text")


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "-0.1"], "threshold must be a finite number >= 0"),
    (["--top", "0"], "top must be a positive int"),
    (["--samples", "0"], "samples must be a positive int"),
])
def test_bad_arguments_exit_2(models, tmp_path, capsys, extra, message):
    data = tmp_path / "c.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello"}\n')
    assert run_cli(_base(models, data, tmp_path / "run") + extra) == 2
    assert message in capsys.readouterr().err


def test_missing_and_empty_files_exit_2(models, tmp_path, capsys):
    assert run_cli(_base(models, tmp_path / "nope.jsonl", tmp_path / "run")) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert run_cli(_base(models, empty, tmp_path / "run")) == 2
    assert "no usable records" in capsys.readouterr().err
