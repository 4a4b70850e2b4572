"""Benchmark: float32 vs 16-bit panel storage of a bfloat16 or float16 checkpoint on the CPU (the same results, half
the bytes).

A model with a real architecture's shapes (SmolLM2-135M and Qwen2.5-0.5B by default, Qwen2.5-1.5B on request) and
random weights rounded to the checkpoint dtype, which is what loading such a checkpoint as float32 gives, is built
twice: `CausalLM(panel_storage="float32")` and the default "auto" (16-bit panels). In one run, alternating the two
models step by step after warm-up steps: a decode step of one row with its logits (the LM head included) and a
lookahead of 15 candidates, both at a 64-token context. The weights are far larger than the caches, so each step
streams them from memory.

Prints a table and writes a JSON record (lenvm_rt.bench.report: machine, versions, timestamp, config; default
benchmarks/results/bench_storage.json): per architecture and checkpoint dtype the packed matrices' GB in each
storage, median / p90 / min ms per step, the 16-bit median over the float32 one, and whether the two gave the same
logits and lookahead states bit for bit.

    python benchmarks/bench_storage.py --threads 2 --repeats 15 --arch smollm2-135m qwen2.5-0.5b qwen2.5-1.5b
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# isort: off
import lenvm_rt  # noqa: F401  (before torch: lenvm_rt sets the OpenMP wait policy torch reads at import)
import torch
# isort: on

from lenvm_rt import cpu_ops
from lenvm_rt.bench.archs import ARCHS
from lenvm_rt.bench.report import stats_ms, write_record
from lenvm_rt.config import ModelConfig
from lenvm_rt.model import CausalLM
from lenvm_rt.weights import LayerWeights, ModelWeights

CONTEXT, CANDIDATES = 64, 15
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_storage.json"


def random_weights(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> ModelWeights:
    """Random float32 weights whose every value is a `dtype` value (a checkpoint in that dtype loaded as float32)."""
    generator = torch.Generator().manual_seed(seed)

    def matrix(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(dtype).float()

    D, inner, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * dh
    layers = [LayerWeights(input_norm=torch.ones(D), qkv=matrix(qkv_rows, D),
                           qkv_bias=matrix(qkv_rows) if cfg.qkv_bias else None, q_norm=None, k_norm=None,
                           o=matrix(D, cfg.num_heads * dh), o_bias=None, post_norm=torch.ones(D),
                           gate_up=matrix(2 * inner, D), gate_up_bias=None, down=matrix(D, inner), down_bias=None)
              for _ in range(cfg.num_layers)]
    embed = matrix(cfg.vocab_size, D)
    return ModelWeights(embed=embed, layers=layers, final_norm=torch.ones(D),
                        lm_head=embed if cfg.tie_word_embeddings else matrix(cfg.vocab_size, D))


def panel_gb(model: CausalLM) -> float:
    return sum(m.panels.nbytes for m in model.w.matrices()) / 1e9


def bench_arch(name: str, dtype: str, repeats: int, warmup: int) -> dict[str, object]:
    cfg = ModelConfig.from_hf(ARCHS[name])
    weights = random_weights(cfg, getattr(torch, dtype), seed=0)
    models = {"float32": CausalLM(cfg, weights, panel_storage="float32"), "half": CausalLM(cfg, weights)}
    assert models["half"].w.lm_head.storage == getattr(torch, dtype)
    del weights
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, CONTEXT), generator=generator)
    token = torch.randint(0, cfg.vocab_size, (1,), generator=generator)
    cand = torch.randint(0, cfg.vocab_size, (1, CANDIDATES), generator=generator)
    times: dict[str, dict[str, list[float]]] = {s: {"decode": [], "lookahead": []} for s in models}
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode():
        for model in models.values():
            model.allocate(batch=1, capacity=CONTEXT + 8)
            model.prefill(prompt, [CONTEXT])
        for step in range(warmup + repeats):
            order = list(models) if step % 2 == 0 else list(models)[::-1]
            for storage in order:
                model = models[storage]
                start = time.perf_counter()
                logits = model.logits(model.decode_step(token, [CONTEXT]))
                middle = time.perf_counter()
                look = model.lookahead(cand, [CONTEXT + 1])
                end = time.perf_counter()
                if step >= warmup:
                    times[storage]["decode"].append(middle - start)
                    times[storage]["lookahead"].append(end - middle)
                outputs[storage] = (logits, look)
    same = all(torch.equal(a, b) for a, b in zip(outputs["float32"], outputs["half"]))
    result: dict[str, object] = {"panel_gb": {s: panel_gb(m) for s, m in models.items()}, "same_bits": same}
    for kind in ("decode", "lookahead"):
        stats = {s: stats_ms(times[s][kind]) for s in models}
        result[kind] = {"ms": stats, "half_over_fp32": stats["half"]["median"] / stats["float32"]["median"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"], choices=sorted(ARCHS))
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"],
                        help="checkpoint dtypes (the 16-bit storage follows)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    cpu_ops.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    config = {"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "context": CONTEXT,
              "candidates": CANDIDATES, "archs": {a: ARCHS[a] for a in args.arch}, "dtypes": args.dtype}
    results = {}
    print(f"{'arch':>13} {'dtype':>8} {'step':>9} {'fp32 ms':>8} {'16-bit ms':>9} {'ratio':>6} {'GB fp32':>8} "
          f"{'GB 16-bit':>9} same")
    for name in args.arch:
        for dtype in args.dtype:
            result = bench_arch(name, dtype, args.repeats, args.warmup)
            results[f"{name}/{dtype}"] = result
            gb = result["panel_gb"]
            for kind in ("decode", "lookahead"):
                r = result[kind]
                print(f"{name:>13} {dtype:>8} {kind:>9} {r['ms']['float32']['median']:8.2f} "
                      f"{r['ms']['half']['median']:9.2f} {r['half_over_fp32']:6.2f} {gb['float32']:8.2f} "
                      f"{gb['half']:9.2f} {result['same_bits']}")
    write_record(args.out, "storage", config, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
