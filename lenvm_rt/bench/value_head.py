"""`lenvm-rt bench value-head`: what reading the value costs on top of a plain decode step.

Shared-trunk configuration: the value head runs on the same last hidden state as the LM head, so a
step with values is decode_step + LM head + value head, against decode_step + LM head. Both are
timed in one run, interleaved step by step on the same cache, batch 1, with a random head of the
model's hidden size (speed does not depend on its values).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..runtime import load
from .guided import _write_head
from .report import format_table, stats_ms, write_record


def run(model: str = "default", *, steps: int = 64, repeats: int = 3, device: str | None = None,
        out: str | None = "benchmarks/results/bench_value_head.json") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lenvm_bench_") as tmp:
        probe = load(model, device=device)
        head = _write_head(Path(tmp) / "value_head.safetensors", probe.config.hidden_size, 0.997)
        del probe
        rt = load(model, value_model=head, device=device)
    m, vm = rt.model, rt.value
    m.allocate(batch=1, capacity=steps + 16)
    plain, valued, head_only = [], [], []
    with torch.inference_mode():
        x = m.prefill(torch.tensor([[1, 2, 3, 4]]), [4])
        token = torch.tensor([5])
        for _ in range(repeats):
            for step in range(steps):
                pos = [4 + step]
                t0 = time.perf_counter()
                x = m.decode_step(token, pos)
                m.logits(x).argmax(dim=-1)
                t1 = time.perf_counter()
                x = m.decode_step(token, pos)  # the same step again, now with the value read as well
                m.logits(x).argmax(dim=-1)
                t2 = time.perf_counter()
                vm.values(x)
                t3 = time.perf_counter()
                plain.append(t1 - t0)
                valued.append(t3 - t1)
                head_only.append(t3 - t2)
    stats = {"plain_step": stats_ms(plain), "step_with_value": stats_ms(valued), "value_head": stats_ms(head_only)}
    ratio = stats["step_with_value"]["median"] / stats["plain_step"]["median"]
    results = {"ms": stats, "ratio_with_value_vs_plain": ratio,
               "value_head_share": stats["value_head"]["median"] / stats["plain_step"]["median"]}
    print(format_table(["", "median ms", "p90"], [[k, v["median"], v["p90"]] for k, v in stats.items()]))
    print(f"step with value / plain step = {ratio:.4f}  (value head alone: "
          f"{100 * results['value_head_share']:.2f}% of a plain step)")
    if out:
        write_record(out, "value_head", {"model": model, "steps": steps, "repeats": repeats, "batch": 1,
                                         "device": str(rt.device)}, results)
        print(f"wrote {out}")
    return results
