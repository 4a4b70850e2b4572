"""Benchmark: peak memory of loading a 16-bit checkpoint into a CPU fp32 model, packing each matrix as it is read
(`load_weights(pack=panel_packer(...))`, what `lenvm_rt.load` does) against converting every matrix first and
packing afterwards.

A checkpoint of a real architecture's shapes with random weights (Qwen2.5-1.5B in bfloat16 by default) is written
to a temporary directory; each run loads it in a fresh child process (`load_weights` + `CausalLM`) while a thread
samples the process's anonymous resident memory (RssAnon in /proc/self/status, every 20 ms; file-backed pages of
the memory-mapped checkpoint are not counted, the kernel can drop them) and its whole resident set. The two
ways alternate run by run.

Prints a table and writes a JSON record (lenvm_rt.bench.report; default benchmarks/results/bench_load_memory.json):
per way the peak anonymous and resident GB and the load seconds of each run, and the packed model's size.

    python benchmarks/bench_load_memory.py --arch qwen2.5-1.5b --dtype bfloat16 --runs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_load_memory.json"
WAYS = ("pack_while_loading", "convert_then_pack")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(directory: Path, way: str) -> None:
    """Load the checkpoint one way and print one JSON line of what was measured."""
    import torch

    from lenvm_rt.model import CausalLM, panel_packer
    from lenvm_rt.weights import load_weights, read_config

    peak = {"RssAnon": 0, "VmRSS": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for field in peak:
                peak[field] = max(peak[field], _status_kb(field))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu = torch.device("cpu")
    cfg = read_config(directory)
    pack = panel_packer(cpu, torch.float32) if way == "pack_while_loading" else None
    start = time.perf_counter()
    model = CausalLM(cfg, load_weights(directory, cfg, device=cpu, dtype=torch.float32, pack=pack))
    seconds = time.perf_counter() - start
    time.sleep(0.05)
    done.set()
    sampler.join()
    packed = sum(m.panels.nbytes for m in model.w.matrices())
    print(json.dumps({"peak_anon_gb": peak["RssAnon"] * 1024 / 1e9, "peak_rss_gb": peak["VmRSS"] * 1024 / 1e9,
                      "load_s": seconds, "packed_gb": packed / 1e9,
                      "storage": str(model.w.layers[0].qkv.storage).removeprefix("torch.")}))


def main() -> None:
    from lenvm_rt.bench.archs import ARCHS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen2.5-1.5b", choices=sorted(ARCHS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", nargs=2, metavar=("DIR", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return
    import torch

    from lenvm_rt.bench.archs import write_random_checkpoint
    from lenvm_rt.bench.report import write_record

    results: dict[str, list[dict]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_random_checkpoint(Path(tmp) / args.arch, ARCHS[args.arch], getattr(torch, args.dtype))
        checkpoint_gb = (directory / "model.safetensors").stat().st_size / 1e9
        print(f"{args.arch} in {args.dtype}: {checkpoint_gb:.2f} GB checkpoint")
        print(f"{'way':>20} {'run':>3} {'peak anon GB':>12} {'peak RSS GB':>11} {'load s':>6} {'packed GB':>9}")
        for run in range(args.runs):
            for way in WAYS if run % 2 == 0 else WAYS[::-1]:
                out = subprocess.run([sys.executable, __file__, "--child", str(directory), way], check=True,
                                     capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results[way].append(r)
                print(f"{way:>20} {run:>3} {r['peak_anon_gb']:12.2f} {r['peak_rss_gb']:11.2f} {r['load_s']:6.1f} "
                      f"{r['packed_gb']:9.2f}")
    config = {"arch": args.arch, "dtype": args.dtype, "runs": args.runs, "checkpoint_gb": checkpoint_gb,
              "shapes": ARCHS[args.arch]}
    write_record(args.out, "load_memory", config, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
