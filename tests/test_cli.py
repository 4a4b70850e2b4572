"""The `lenvm-rt` command line on a tiny checkpoint, and import hygiene of the package."""
from __future__ import annotations

import json
import os
import re

import pytest
from checkpoints import make_checkpoint
from subproc import run_python

import lenvm_rt
from lenvm_rt import LengthTarget, Sampling
from lenvm_rt.cli import main
from lenvm_rt.quality import quality_of_steps


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli"), "llama")


def test_generate_json_prints_one_object(ckpt, capsys):
    assert main(["generate", "--model", str(ckpt), "--prompt", "hello fox", "--max-new-tokens", "6",
                 "--json", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"token_ids", "text", "num_tokens", "finish_reason", "ms_per_token"}
    assert out["num_tokens"] == len(out["token_ids"]) and 1 <= out["num_tokens"] <= 6
    assert out["finish_reason"] in ("stop", "length")
    assert out["response_tokens"] == out["num_tokens"] - (out["finish_reason"] == "stop")
    rt = lenvm_rt.load(ckpt)
    gen = rt.generate([{"role": "user", "content": "hello fox"}], max_new_tokens=6, sampling=Sampling(temperature=0))
    assert out["token_ids"] == gen.token_ids and out["token_ranks"] == gen.token_ranks
    assert out["token_logprobs"] == pytest.approx(gen.token_logprobs, rel=1e-6, abs=1e-6)
    q = quality_of_steps(gen.token_ids, gen.token_logprobs, gen.token_ranks, rt.eos_token_ids)
    assert out["quality"] == pytest.approx({**q.fields(), "tokens": q.tokens}, rel=1e-6, abs=1e-7)


def test_generate_streams_text_then_length_and_quality(ckpt, capsys):
    args = ["generate", "--model", str(ckpt), "--prompt", "hello", "--raw", "--max-new-tokens", "4",
            "--temperature", "0.7", "--seed", "3"]
    assert main(args) == 0
    streamed = capsys.readouterr()
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert streamed.out == out["text"]
    summary = re.search(r"\[(\d+) tokens, policy NLL (-?[\d.]+), [\d.]+ tok/s\]", streamed.err)
    assert summary, streamed.err
    assert int(summary[1]) == out["response_tokens"] and summary[2] == f"{out['quality']['nll']:.2f}"


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive int"),
    (["--top-p", "0"], "top_p must lie in"),
    (["--temperature", "-1"], "temperature must be"),
])
def test_bad_arguments_exit_2_with_one_error_line(ckpt, capsys, args, message):
    assert main(["generate", "--model", str(ckpt), "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_missing_model_exits_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_import_needs_neither_triton_nor_a_gpu():
    code = ("import sys, lenvm_rt; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'; "
            "import torch; assert not torch.cuda.is_initialized(); print('ok')")
    out = run_python(code, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_sets_a_sleeping_openmp_wait_policy_before_torch_loads_unless_one_is_set():
    # the OpenMP runtime reads the policy when torch loads it: record the variable at torch's first import
    code = ("import os, sys\n"
            "seen = []\n"
            "class Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' and not seen: seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
            "sys.meta_path.insert(0, Spy())\n"
            "import lenvm_rt\n"
            "print(seen[0])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert run_python(code, env=env, timeout=120).stdout.strip() == "PASSIVE"
    assert run_python(code, env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, timeout=120).stdout.strip() == "ACTIVE"


@pytest.fixture(scope="module")
def value_head(ckpt, tmp_path_factory):
    from checkpoints import make_value_head

    return make_value_head(tmp_path_factory.mktemp("head") / "value_head.safetensors", 64, gamma=0.99)


def test_values_prints_json_and_writes_a_plot(ckpt, value_head, tmp_path, capsys):
    plot = tmp_path / "values.png"
    assert main(["values", "--model", str(ckpt), "--value-model", str(value_head), "--prompt", "hi fox",
                 "--response", "the quick brown fox", "--ended", "--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["value"]) == len(out["token_ids"]) == len(out["td"]) and out["true_remaining"][-1] == 0
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_values_table_marks_td_tokens(ckpt, value_head, capsys):
    assert main(["values", "--model", str(ckpt), "--value-model", str(value_head), "--prompt", "hi",
                 "--response", "the quick brown fox jumps"]) == 0
    out = capsys.readouterr().out
    assert "predicted length at the prompt boundary" in out and "remaining" in out


def test_predict_batch_json(ckpt, value_head, capsys):
    assert main(["predict", "--model", str(ckpt), "--value-model", str(value_head), "--prompt", "a",
                 "--prompt", "a much longer prompt about foxes", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["prompt"] for o in out] == ["a", "a much longer prompt about foxes"]
    assert all(o["predicted_tokens"] > 0 for o in out)


def test_values_without_gamma_is_a_clear_error(ckpt, tmp_path, capsys):
    from checkpoints import make_value_head

    head = make_value_head(tmp_path / "value_head.safetensors", 64, gamma=None)
    assert main(["values", "--model", str(ckpt), "--value-model", str(head), "--prompt", "a",
                 "--response", "b"]) == 2
    assert "does not record its discount" in capsys.readouterr().err


def test_generate_with_a_length_target(ckpt, value_head, capsys):
    assert main(["generate", "--model", str(ckpt), "--value-model", str(value_head), "--prompt", "hi",
                 "--length", "5", "--constraint", "at-most", "--top-k", "8", "--seed", "1",
                 "--max-new-tokens", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_tokens"] <= 6 and len(out["values"]) == out["num_tokens"] and out["gamma"] == 0.99


def test_a_length_target_takes_the_quality_guard_unless_min_p_is_given(ckpt, value_head, capsys):
    from lenvm_rt.cli import GUARD_MIN_P, _sampling, build_parser

    base = ["generate", "--model", str(ckpt), "--value-model", str(value_head), "--prompt", "hi", "--json",
            "--length", "6", "--temperature", "1", "--top-k", "15", "--seed", "4", "--max-new-tokens", "14"]
    parse = build_parser().parse_args
    assert _sampling(parse(base)).min_p == GUARD_MIN_P == 0.7
    assert _sampling(parse([*base, "--min-p", "0"])).min_p == 0.0
    assert _sampling(parse(base[:8])).min_p == 0.0  # no --length: no guard
    rt = lenvm_rt.load(ckpt, value_model=value_head)
    for extra, min_p in (([], GUARD_MIN_P), (["--min-p", "0.1"], 0.1)):
        assert main([*base, *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        want = rt.generate([{"role": "user", "content": "hi"}], max_new_tokens=14, length=LengthTarget.equal(6),
                           sampling=Sampling(temperature=1, top_k=15, seed=4, min_p=min_p))
        assert out["token_ids"] == want.token_ids


def test_generate_streams_with_the_live_prediction_bar(ckpt, value_head, capsys):
    assert main(["generate", "--model", str(ckpt), "--value-model", str(value_head), "--prompt", "hi",
                 "--tilt", "-2", "--max-new-tokens", "6", "--temperature", "1", "--seed", "2"]) == 0
    assert "tokens" in capsys.readouterr().err


def test_length_flag_without_value_model_is_a_clear_error(ckpt, capsys):
    assert main(["generate", "--model", str(ckpt), "--prompt", "hi", "--length", "5"]) == 2
    assert "needs a value model" in capsys.readouterr().err
