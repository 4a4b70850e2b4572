"""Benchmark: torch F.linear vs lenvm_rt.cpu_ops.linear on the SmolLM2-135M weight matrices (fp32, CPU).

One "pass" runs all 121 matrices of a decode step once (30 layers x qkv [960, 576], o [576, 576],
gate_up [3072, 576], down [576, 1536], then lm_head [49152, 576]) at M rows of x. For each M the two
implementations alternate pass by pass (which one goes first alternates too) after warm-up passes. The
weights (538 MB) are far larger than the caches, so a pass streams them from memory: GB/s is weight bytes
per pass / median pass time.

Prints a table and writes a JSON record (lenvm_rt.bench.report: machine, versions, timestamp, config;
default benchmarks/results/bench_linear.json): per M and implementation the median / p90 / min ms per
pass and GB/s, the torch/ours median ratio and the max abs difference of the two outputs.

    python benchmarks/bench_linear.py --threads 2 --repeats 30 --rows 1 16
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


def bench_rows(rows: int, weights: list[torch.Tensor], repeats: int, warmup: int) -> dict[str, object]:
    generator = torch.Generator().manual_seed(rows)
    xs = [torch.randn(rows, w.shape[1], generator=generator) for w in weights]
    impls: dict[str, Linear] = {"torch": F.linear, "ours": cpu_ops.linear}
    max_diff = max((F.linear(x, w) - cpu_ops.linear(x, w)).abs().max().item() for x, w in zip(xs, weights))
    for _ in range(warmup):
        for fn in impls.values():
            run_pass(fn, xs, weights)
    times: dict[str, list[float]] = {name: [] for name in impls}
    for repeat in range(repeats):
        order = list(impls) if repeat % 2 == 0 else list(reversed(impls))
        for name in order:
            times[name].append(run_pass(impls[name], xs, weights))
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    result: dict[str, object] = {name: summarise(t, weight_bytes) for name, t in times.items()}
    result["speedup_torch_over_ours"] = result["torch"]["median_ms"] / result["ours"]["median_ms"]
    result["max_abs_diff"] = max_diff
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and for lenvm_rt")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes per implementation and M")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes per implementation and M")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="values of M (rows of x)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cpu_ops.set_num_threads(args.threads)
    weights = make_weights(seed=0)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    config = {"threads": args.threads, "kernel": _native.linear_kernel(), "matrices_per_pass": len(weights),
              "weight_bytes_per_pass": weight_bytes, "repeats": args.repeats, "warmup": args.warmup}
    results: dict[str, object] = {}
    print(f"torch {torch.__version__} | threads {args.threads} | kernel {config['kernel']} | "
          f"{len(weights)} matrices, {weight_bytes / 1e6:.0f} MB per pass")
    print(f"{'M':>3} {'impl':>6} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'GB/s':>6} {'torch/ours':>10}")
    with torch.inference_mode():
        for rows in args.rows:
            result = bench_rows(rows, weights, args.repeats, args.warmup)
            results[f"M={rows}"] = result
            for name in ("torch", "ours"):
                s = result[name]
                ratio = f"{result['speedup_torch_over_ours']:10.2f}" if name == "ours" else ""
                print(
                    f"{rows:>3} {name:>6} {s['median_ms']:10.2f} {s['p90_ms']:8.2f} {s['min_ms']:8.2f} "
                    f"{s['gb_per_s']:6.1f} {ratio}"
                )
    write_record(args.out, "linear", config, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
