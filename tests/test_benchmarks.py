"""The benchmark commands run end to end on a tiny checkpoint and write complete JSON records."""
from __future__ import annotations

import json

import pytest
from checkpoints import make_checkpoint

from lenvm_rt.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bench"), "llama")


def _record(path):
    record = json.loads(path.read_text())
    assert {"benchmark", "timestamp", "machine", "versions", "config", "results"} <= set(record)
    assert record["machine"]["cores"] >= 1 and record["versions"]["torch"]
    return record["results"]


def test_bench_decode(ckpt, tmp_path):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--model", str(ckpt), "--tokens", "6", "--repeats", "1", "--out", str(out)]) == 0
    results = _record(out)
    assert results["greedy_tokens_match"] is True
    assert set(results["ms_per_token"]) == {"lenvm_rt", "transformers", "torch_floor"}
    assert results["ratio_vs_transformers"] > 0 and results["stream_floor_ms"] > 0


def test_bench_guided(ckpt, tmp_path):
    out = tmp_path / "guided.json"
    assert main(["bench", "guided", "--model", str(ckpt), "--tokens", "4", "--repeats", "1", "--out", str(out)]) == 0
    results = _record(out)
    assert {"plain", "shared_k15", "separate_k15", "reference_k15"} <= set(results["ms_per_token"])
    assert {"lookahead_forward", "value_head", "select"} <= set(results["breakdown_us_per_step"]["shared_k15"])


def test_bench_value_head(ckpt, tmp_path):
    out = tmp_path / "vh.json"
    assert main(["bench", "value-head", "--model", str(ckpt), "--steps", "4", "--repeats", "1", "--out",
                 str(out)]) == 0
    assert _record(out)["ratio_with_value_vs_plain"] > 0
