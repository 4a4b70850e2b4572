"""`lenvm-rt bench decode`: per-token decode time of lenvm_rt vs transformers vs the weight-read floor.

One run, interleaved repeats (ours, transformers, floor, ours, ...), same model, same chat prompt,
same greedy tokens (checked). Per-token samples are the intervals between consecutive tokens, so the
prefill is excluded.

    transformers  AutoModelForCausalLM.generate(do_sample=False) with its default KV cache, timed by
                  a streamer that stamps every new token
    torch floor   one batch-1 pass of torch.nn.functional.linear over every weight matrix the decode
                  step reads (all layers and the LM head): what any torch-based decoder pays at least
    stream floor  weight bytes / the machine's streaming-read bandwidth, measured in the same run by
                  summing the same matrices (an estimate of the hardware limit)
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from ..config import Sampling
from ..cpu_ops import PanelWeight
from ..runtime import Runtime
from .report import format_table, stats_ms, write_record

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a "
                                      "bottle. Use at least five sentences."}]


def _ours(rt: Runtime, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    stamps, tokens = [], []
    for event in rt.stream(prompt, max_new_tokens=n, sampling=Sampling(temperature=0)):
        stamps.append(time.perf_counter())
        tokens.append(event.token_id)
    return tokens, [b - a for a, b in zip(stamps, stamps[1:])]


class _Stamper:
    """transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())
        self.tokens.extend(value.view(-1).tolist())

    def end(self) -> None:
        pass


def _transformers(hf: Any, prompt: list[int], n: int, eos: list[int]) -> tuple[list[int], list[float]]:
    stamper = _Stamper()
    with torch.inference_mode():
        hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, streamer=stamper,
                    eos_token_id=eos, pad_token_id=eos[0])
    s = stamper.stamps
    return stamper.tokens, [b - a for a, b in zip(s, s[1:])]


def _floor_pass(matrices: list[torch.Tensor], inputs: dict[int, torch.Tensor]) -> float:
    start = time.perf_counter()
    for w in matrices:
        F.linear(inputs[w.shape[1]], w)
    return time.perf_counter() - start


def _stream_bandwidth(matrices: list[torch.Tensor]) -> float:
    """Bytes per second of a full read of the matrices (torch sum, all threads)."""
    start = time.perf_counter()
    for w in matrices:
        w.sum()
    return sum(w.numel() * w.element_size() for w in matrices) / (time.perf_counter() - start)


def run(rt: Runtime, *, tokens: int = 64, repeats: int = 5, model_name: str = "default",
        out: str | None = "benchmarks/results/bench_decode.json", progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(rt.directory, dtype=rt.dtype).eval()
    prompt = rt.encode(PROMPT)
    eos = sorted(rt.eos_token_ids)
    # the floor reads the matrices in torch's own layout (a CPU fp32 model holds its layers packed in panels)
    matrices = [w.unpacked() if isinstance(w, PanelWeight) else w for w in rt.model.w.matrices()]
    inputs = {k: torch.randn(1, k, dtype=rt.dtype) for k in {w.shape[1] for w in matrices}}
    weight_bytes = sum(w.numel() * w.element_size() for w in matrices)
    samples: dict[str, list[float]] = {"lenvm_rt": [], "transformers": [], "torch_floor": []}
    bandwidth: list[float] = []
    match = True
    _ours(rt, prompt, 4)  # warm-up: allocates the cache and touches every weight page
    _transformers(hf, prompt, 4, eos)
    for _ in range(repeats + 1):
        _floor_pass(matrices, inputs)
    for _ in tqdm(range(repeats), desc="bench decode", disable=not progress):
        ours_tokens, ours_dt = _ours(rt, prompt, tokens)
        hf_tokens, hf_dt = _transformers(hf, prompt, tokens, eos)
        match &= ours_tokens == hf_tokens[: len(ours_tokens)]
        samples["lenvm_rt"] += ours_dt
        samples["transformers"] += hf_dt
        samples["torch_floor"] += [_floor_pass(matrices, inputs) for _ in range(len(ours_dt))]
        bandwidth.append(_stream_bandwidth(matrices))
    stats = {name: stats_ms(s) for name, s in samples.items()}
    best_bandwidth = max(bandwidth)
    results = {
        "ms_per_token": stats,
        "ratio_vs_transformers": stats["lenvm_rt"]["median"] / stats["transformers"]["median"],
        "ratio_vs_torch_floor": stats["lenvm_rt"]["median"] / stats["torch_floor"]["median"],
        "ratio_p90_vs_transformers": stats["lenvm_rt"]["p90"] / stats["transformers"]["p90"],
        "stream_floor_ms": 1000.0 * weight_bytes / best_bandwidth,
        "stream_bandwidth_gb_s": best_bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "greedy_tokens_match": bool(match),
    }
    results["ratio_vs_stream_floor"] = stats["lenvm_rt"]["median"] / results["stream_floor_ms"]
    config = {"model": model_name, "tokens": tokens, "repeats": repeats, "batch": 1, "dtype": str(rt.dtype),
              "device": str(rt.device), "prompt_tokens": len(prompt)}
    rows = [[name, s["median"], s["p90"], s["min"], s["n"]] for name, s in stats.items()]
    rows.append(["stream floor (est.)", results["stream_floor_ms"], "", "", ""])
    print(format_table(["decoder", "median ms/tok", "p90", "min", "samples"], rows))
    print(f"lenvm_rt / transformers = {results['ratio_vs_transformers']:.3f}   "
          f"lenvm_rt / torch floor = {results['ratio_vs_torch_floor']:.3f}   "
          f"lenvm_rt / stream floor = {results['ratio_vs_stream_floor']:.3f}   "
          f"greedy tokens match: {results['greedy_tokens_match']}")
    if out:
        write_record(out, "decode", config, results)
        print(f"wrote {out}")
    return results
