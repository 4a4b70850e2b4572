"""`lenvm-rt bench guided`: per-token cost of length-guided decoding against plain decoding.

One run on one model, interleaved repeats, batch 1, every peer decoding the same prompt for the same
number of tokens (an At Least target beyond the horizon keeps every peer going):

    plain       lenvm_rt without a value model
    shared      guided, head on the policy's own trunk: one lookahead forward of k candidates per token
    separate    guided, a separate LenVM of the same architecture with its own KV cache
    reference   the reference implementation's method on the same trunks: policy decode, then a LenVM
                extend by the last chosen token, then a LenVM forward over the candidates (their K/V
                thrown away), scores brought to the host and chosen in a Python loop

at k = 15 (top-k 15, top-p 1) and at the LIFEBench settings (top-k 15, top-p 0.999, temperature 1).
The heads are random but of the right shape: speed does not depend on their values. A per-section
breakdown (µs per step) comes from the decode loop's stopwatch.
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..config import LengthTarget, Sampling
from ..decode import Stopwatch, decode
from ..guidance import CandidateSettings, Guidance, build_candidates
from ..runtime import Runtime, load
from ..select_ref import AT_LEAST
from .report import format_table, stats_ms, write_record

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
SETTINGS = {"k15": Sampling(temperature=1.0, top_k=15, seed=0),
            "lifebench": Sampling(temperature=1.0, top_k=15, top_p=0.999, seed=0)}


def _write_head(path: Path, hidden: int, gamma: float) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"v_head.fc.weight": torch.randn(hidden, hidden, generator=g) / hidden**0.5,
               "v_head.fc.bias": torch.zeros(hidden), "v_head.summary.weight": torch.randn(1, hidden, generator=g)
               / hidden**0.5, "v_head.summary.bias": torch.zeros(1)}, path, metadata={"gamma": str(gamma)})
    return path


def _separate_lenvm(policy_dir: Path, root: Path, gamma: float, hidden: int) -> Path:
    """A LenVM directory with the policy's own architecture and weights, plus a random head."""
    lenvm = root / "lenvm"
    lenvm.mkdir()
    for f in policy_dir.iterdir():
        if f.is_file():
            (lenvm / f.name).symlink_to(f.resolve())
    _write_head(lenvm / "value_head.safetensors", hidden, gamma)
    return lenvm


def _timed(rt: Runtime, prompt: list[int], sampling: Sampling, guidance: Guidance | None, n: int,
           watch: Stopwatch | None) -> list[float]:
    stamps = []
    for _ in decode(rt.model, rt.value if guidance is not None else None, [prompt], [sampling], [guidance], n,
                    rt.eos_token_ids, rt.max_context, watch):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _reference_method(rt: Runtime, prompt: list[int], sampling: Sampling, guidance: Guidance, n: int) -> list[float]:
    """The reference implementation's step, on lenvm_rt's own trunks (see module docstring)."""
    policy, lenvm = rt.model, rt.value.trunk
    gamma = rt.value.gamma
    settings = CandidateSettings.of([sampling], rt.eos_token_ids, policy.device)
    L = len(prompt)
    policy.allocate(batch=1, capacity=L + n + 1)
    lenvm.allocate(batch=1, capacity=L + n + 1)
    stamps = []
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        x = policy.prefill(ids, [L])
        lenvm.prefill(ids[:, :-1], [L - 1])  # lazy prefill: the last prompt token is extended below
        last, pos = prompt[-1], L - 1
        for step in range(n):
            lenvm.decode_step(torch.tensor([last]), [pos])  # phase A: extend by the last chosen token
            ban = torch.tensor([guidance.rule == AT_LEAST and step + 1 < guidance.target])
            cand, logp, filled = build_candidates(policy.logits(x), settings, ban)
            cand_list, filled_list = cand[0].tolist(), filled[0].tolist()  # host round trip
            z = rt.value.values(lenvm.lookahead(cand, [pos + 1])[0])[0].tolist()  # phase B, KV discarded
            rho = max(guidance.target - step - 1, 0)
            best, best_err = 0, math.inf
            for j, (token, ok) in enumerate(zip(cand_list, filled_list)):  # Python-side scoring
                if not ok:
                    continue
                remaining = 0.0 if token in rt.eos_token_ids else math.log1p(math.exp(z[j])) / -math.log(gamma)
                err = -remaining if guidance.rule == AT_LEAST else abs(remaining - rho)
                if err < best_err:
                    best, best_err = j, err
            last = cand_list[best]
            x = policy.decode_step(torch.tensor([last]), [L + step])
            pos += 1
            stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _matmul_rows(rt: Runtime, k: int, repeats: int) -> dict[str, float]:
    """One trunk forward of 1 token vs k sibling candidates, on the current cache (ms, medians)."""
    model = rt.model
    model.allocate(batch=1, capacity=256)
    one, many = [], []
    with torch.inference_mode():
        model.prefill(torch.tensor([[1, 2, 3, 4]]), [4])
        cand = torch.arange(10, 10 + k).view(1, k)
        for _ in range(repeats):
            t = time.perf_counter()
            model.decode_step(torch.tensor([5]), [4])
            one.append(time.perf_counter() - t)
            t = time.perf_counter()
            model.lookahead(cand, [4])
            many.append(time.perf_counter() - t)
    a, b = stats_ms(one)["median"], stats_ms(many)["median"]
    return {"one_row_ms": a, f"{k}_rows_ms": b, "ratio": b / a}


def run(model: str = "default", *, tokens: int = 32, repeats: int = 3, gamma: float = 0.997,
        out: str | None = "benchmarks/results/bench_guided.json", device: str | None = None,
        progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    plain = load(model, device=device)
    hidden = plain.config.hidden_size
    root = Path(tempfile.mkdtemp(prefix="lenvm_bench_"))
    try:
        shared = load(model, value_model=_write_head(root / "value_head.safetensors", hidden, gamma), device=device)
        separate = load(model, value_model=_separate_lenvm(plain.directory, root, gamma, hidden), device=device)
        prompt = plain.encode(PROMPT)
        guidance = Guidance.of(LengthTarget.at_least(10**9), None)
        samples: dict[str, list[float]] = {}
        watches: dict[str, Stopwatch] = {}
        peers = [("plain", plain, None, "k15")]
        for setting in SETTINGS:
            peers += [(f"shared_{setting}", shared, guidance, setting), (f"separate_{setting}", separate, guidance,
                                                                         setting)]
        for _name, rt, g, setting in peers:  # warm-up: allocation, page faults
            _timed(rt, prompt, SETTINGS[setting], g, 4, None)
        for _ in tqdm(range(repeats), desc="bench guided", disable=not progress):
            for name, rt, g, setting in peers:
                watch = watches.setdefault(name, Stopwatch()) if g is not None else None
                samples.setdefault(name, []).extend(_timed(rt, prompt, SETTINGS[setting], g, tokens, watch))
            samples.setdefault("reference_k15", []).extend(
                _reference_method(separate, prompt, SETTINGS["k15"], guidance, tokens))
        stats = {name: stats_ms(s) for name, s in samples.items()}
        base = stats["plain"]["median"]
        ratios = {name: s["median"] / base for name, s in stats.items()}
        breakdown = {name: {k: 1e6 * v / max(w.steps, 1) for k, v in w.totals.items()} for name, w in watches.items()}
        results = {
            "ms_per_token": stats,
            "ratio_vs_plain": ratios,
            "speedup_vs_reference": {n: stats["reference_k15"]["median"] / stats[n]["median"]
                                     for n in ("shared_k15", "separate_k15")},
            "breakdown_us_per_step": breakdown,
            "trunk_rows": _matmul_rows(plain, 15, 10),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [[n, s["median"], s["p90"], ratios[n]] for n, s in stats.items()]
    print(format_table(["peer", "median ms/tok", "p90", "x plain"], rows))
    print("speed-up over the reference method:",
          ", ".join(f"{k} {v:.2f}x" for k, v in results["speedup_vs_reference"].items()))
    for name, parts in breakdown.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.0f} µs" for k, v in parts.items()))
    tr = results["trunk_rows"]
    print(f"trunk forward: 1 row {tr['one_row_ms']:.1f} ms, 15 rows {tr['15_rows_ms']:.1f} ms ({tr['ratio']:.2f}x)")
    config = {"model": model, "tokens": tokens, "repeats": repeats, "batch": 1, "gamma": gamma,
              "settings": {k: vars(v) for k, v in SETTINGS.items()}, "device": str(plain.device),
              "prompt_tokens": len(prompt)}
    if out:
        write_record(out, "guided", config, results)
        print(f"wrote {out}")
    return results
