"""Benchmark: the native forward that follows a decode step's host-side torch work, when that work runs as torch
parallel regions (2 torch threads) against the same ops on one torch thread (`torch_threads.one_torch_thread`, what
the sampler and the candidate builder do), on the default model, in two child processes: one that imports torch
before lenvm_rt with OMP_WAIT_POLICY unset (torch's OpenMP workers then spin after each parallel region), and one
with OMP_WAIT_POLICY=PASSIVE in effect (what `import lenvm_rt` before torch sets).

Each case times the forward right after its host work, the two ways alternating sample by sample (medians and p90
over `--repeats`):

    sampler      TokenChooser (temperature 1, top-k 15) on one row's logits, then a 1-row decode step
    candidates   the candidate set of an At Least step (EOS banned: a vocabulary-wide scaling), then the
                 15-candidate lookahead
    embedding    the 15 candidates' embedding rows from the packed LM head by torch advanced indexing (the way
                 before) or by numpy (`PanelWeight.rows_at`), then the native lookahead over those rows
    nothing      no host work, then the lookahead (the floor)

Prints a table per process and writes one JSON record (lenvm_rt.bench.report; default
benchmarks/results/bench_step_threads.json).

    python benchmarks/bench_step_threads.py --threads 2 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch  # before lenvm_rt: in the "unset" child, torch's OpenMP runtime loads without a wait policy

from lenvm_rt import Sampling, cpu_ops, load
from lenvm_rt.bench.report import format_table, stats_ms, write_record
from lenvm_rt.guidance import CandidateSettings, _candidates, build_candidates
from lenvm_rt.sampling import TokenChooser
from lenvm_rt.torch_threads import one_torch_thread

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_step_threads.json"
CONTEXT = 40
CPU = torch.device("cpu")


def cases(model_name: str) -> dict[str, tuple[Callable[[], object], Callable[[], object], Callable[[], object]]]:
    """name -> (host work as torch parallel regions, the same on one thread, the forward that follows)."""
    rt = load(model_name, device="cpu")
    model = rt.model
    model.allocate(batch=1, capacity=512)
    sampling = Sampling(temperature=1.0, top_k=15, seed=0)
    chooser = TokenChooser([sampling], CPU)
    settings = CandidateSettings.of([sampling], rt.eos_token_ids, CPU)
    ban = torch.tensor([True])
    cand = torch.arange(10, 25).view(1, 15)
    positions = torch.tensor([CONTEXT], dtype=torch.int32).numpy()
    head = model.w.lm_head
    with torch.inference_mode():
        logits = model.logits(model.prefill(torch.arange(100, 100 + CONTEXT).view(1, -1), [CONTEXT]))
    embedded: dict[str, torch.Tensor] = {}

    def torch_rows() -> None:
        embedded["x"] = head.panels[cand // 8, :, cand % 8].float()

    def numpy_rows() -> None:
        embedded["x"] = head.rows_at(cand)

    return {
        "sampler": (lambda: chooser._draw(logits, [0]), lambda: chooser(logits, [0]),
                    lambda: model.decode_step(torch.tensor([5]), [CONTEXT])),
        "candidates": (lambda: _candidates(logits, settings, ban, None, None),
                       lambda: build_candidates(logits, settings, ban), lambda: model.lookahead(cand, [CONTEXT])),
        "embedding": (torch_rows, numpy_rows, lambda: model._trunk.lookahead(embedded["x"], positions)),
        "nothing": (lambda: None, lambda: None, lambda: model.lookahead(cand, [CONTEXT])),
    }


def measure(host: Callable[[], object], forward: Callable[[], object], serial: bool) -> float:
    with one_torch_thread(CPU) if serial else nullcontext():
        host()
    start = time.perf_counter()
    forward()
    return time.perf_counter() - start


def child(model: str, threads: int, repeats: int) -> dict[str, object]:
    cpu_ops.set_num_threads(threads)
    torch.set_num_threads(threads)
    work = cases(model)
    times: dict[str, dict[str, list[float]]] = {name: {"parallel": [], "one_thread": []} for name in work}
    with torch.inference_mode():
        for step in range(repeats + 2):
            for name, (parallel, serial, forward) in work.items():
                ways = [("parallel", parallel, False), ("one_thread", serial, True)]
                for way, host, one in ways if step % 2 == 0 else ways[::-1]:
                    seconds = measure(host, forward, one)
                    if step >= 2:  # warm-up
                        times[name][way].append(seconds)
    results: dict[str, object] = {}
    for name, by_way in times.items():
        stats = {way: stats_ms(s) for way, s in by_way.items()}
        results[name] = {"forward_ms": stats,
                         "parallel_over_one_thread": stats["parallel"]["median"] / stats["one_thread"]["median"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.threads, args.repeats)))
        return
    results = {}
    for policy in ("unset", "PASSIVE"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy == "PASSIVE":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        argv = [sys.executable, __file__, "--child", "--model", args.model, "--threads", str(args.threads),
                "--repeats", str(args.repeats)]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        results[f"omp_wait_policy_{policy.lower()}"] = by_case = json.loads(done.stdout.strip().splitlines()[-1])
        rows = [[name, r["forward_ms"]["parallel"]["median"], r["forward_ms"]["parallel"]["p90"],
                 r["forward_ms"]["one_thread"]["median"], r["forward_ms"]["one_thread"]["p90"],
                 r["parallel_over_one_thread"]] for name, r in by_case.items()]
        print(f"OMP_WAIT_POLICY {policy}:")
        print(format_table(["case", "after parallel ms", "p90", "after one thread ms", "p90", "ratio"], rows))
    config = {"model": args.model, "threads": args.threads, "repeats": args.repeats, "context": CONTEXT,
              "candidates": 15}
    write_record(args.out, "step_threads", config, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
