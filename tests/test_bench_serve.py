"""`lenvm-rt bench serve` runs end to end on a tiny checkpoint with a random head and writes a complete record."""
from __future__ import annotations

import json

from checkpoints import make_checkpoint, make_value_head

from lenvm_rt.cli import main


def test_bench_serve(tmp_path):
    ckpt = make_checkpoint(tmp_path / "policy", "llama")
    head = make_value_head(tmp_path / "head" / "value_head.safetensors", 64, gamma=0.97)
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--model", str(ckpt), "--value-model", str(head), "--device", "cpu",
                 "--streams", "1,2", "--requests", "2", "--tokens", "4", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"benchmark", "timestamp", "machine", "versions", "config", "results"} <= set(record)
    for mode in ("unguided", "guided"):
        r = record["results"][mode]
        assert r["tokens_match"] is True
        assert set(r["server"]) == {"1", "2"} and r["one_at_a_time_in_process"]["tokens_per_s"] > 0
        assert all(level["ttft_ms"]["median"] > 0 for level in r["server"].values())
