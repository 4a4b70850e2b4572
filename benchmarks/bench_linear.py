"""Benchmark: torch F.linear vs lenvm_rt's two CPU kernels on the SmolLM2-135M weight matrices (fp32, CPU).

Peers: `torch` (F.linear), `rows` (cpu_ops.linear over the plain [N, K] layout) and `panels`
(cpu_ops.panel_linear over copies packed in panels of 8 rows, the layout a CPU fp32 model holds).
One "pass" runs all 121 matrices of a decode step once (30 layers x qkv [960, 576], o [576, 576],
gate_up [3072, 576], down [576, 1536], then lm_head [49152, 576]) at M rows of x. For each M the
implementations alternate pass by pass (their order rotates too) after warm-up passes. The weights (538 MB)
are far larger than the caches, so a pass streams them from memory: GB/s is weight bytes per pass / median
pass time.

Prints a table and writes a JSON record (lenvm_rt.bench.report: machine, versions, timestamp, config;
default benchmarks/results/bench_linear.json): per M and implementation the median / p90 / min ms per
pass and GB/s, each median over the panels median, and each kernel's max abs difference from torch.

    python benchmarks/bench_linear.py --threads 2 --repeats 20 --rows 1 15 64
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lenvm_rt import _native, cpu_ops
from lenvm_rt.bench.report import stats_ms, write_record

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 576, 1536, 49152, 30
LAYER_SHAPES = [(960, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_linear.json"

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_weights(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = LAYER_SHAPES * LAYERS + [(VOCAB, HIDDEN)]
    return [torch.randn(shape, generator=generator) * 0.05 for shape in shapes]


def run_pass(fn: Linear, xs: list[torch.Tensor], weights: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for x, w in zip(xs, weights):
        fn(x, w)
    return time.perf_counter() - start


def summarise(seconds: list[float], weight_bytes: int) -> dict[str, float]:
    stats = stats_ms(seconds)
    return {"median_ms": stats["median"], "p90_ms": stats["p90"], "min_ms": stats["min"],
            "gb_per_s": weight_bytes / stats["median"] / 1e6}


def bench_rows(rows: int, weights: list[torch.Tensor], packed: list[cpu_ops.PanelWeight], repeats: int,
               warmup: int) -> dict[str, object]:
    generator = torch.Generator().manual_seed(rows)
    xs = [torch.randn(rows, w.shape[1], generator=generator) for w in weights]
    impls: dict[str, tuple[Linear, list]] = {"torch": (F.linear, weights), "rows": (cpu_ops.linear, weights),
                                              "panels": (cpu_ops.panel_linear, packed)}
    max_diff = {name: max((F.linear(x, w) - fn(x, m)).abs().max().item() for x, w, m in zip(xs, weights, mats))
                for name, (fn, mats) in impls.items() if name != "torch"}
    for _ in range(warmup):
        for fn, mats in impls.values():
            run_pass(fn, xs, mats)
    times: dict[str, list[float]] = {name: [] for name in impls}
    names = list(impls)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            fn, mats = impls[name]
            times[name].append(run_pass(fn, xs, mats))
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    result: dict[str, object] = {name: summarise(t, weight_bytes) for name, t in times.items()}
    result["median_over_panels"] = {name: result[name]["median_ms"] / result["panels"]["median_ms"] for name in impls}
    result["max_abs_diff_from_torch"] = max_diff
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and for lenvm_rt")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes per implementation and M")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes per implementation and M")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 15, 64], help="values of M (rows of x)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cpu_ops.set_num_threads(args.threads)
    weights = make_weights(seed=0)
    packed = [cpu_ops.pack_panels(w) for w in weights]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    config = {"threads": args.threads, "kernel": _native.linear_kernel(), "matrices_per_pass": len(weights),
              "weight_bytes_per_pass": weight_bytes, "repeats": args.repeats, "warmup": args.warmup}
    results: dict[str, object] = {}
    print(f"torch {torch.__version__} | threads {args.threads} | kernel {config['kernel']} | "
          f"{len(weights)} matrices, {weight_bytes / 1e6:.0f} MB per pass")
    print(f"{'M':>3} {'impl':>6} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'GB/s':>6} {'/ panels':>8}")
    with torch.inference_mode():
        for rows in args.rows:
            result = bench_rows(rows, weights, packed, args.repeats, args.warmup)
            results[f"M={rows}"] = result
            for name in ("torch", "rows", "panels"):
                s = result[name]
                print(f"{rows:>3} {name:>6} {s['median_ms']:10.2f} {s['p90_ms']:8.2f} {s['min_ms']:8.2f} "
                      f"{s['gb_per_s']:6.1f} {result['median_over_panels'][name]:8.2f}")
    write_record(args.out, "linear", config, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
