"""`lenvm-rt bench serve`: the HTTP server with continuous batching against the same requests run alone.

For each concurrency level (default 1, 4 and 16 streams) and each mode (unguided; guided: Equal To N/2 with
greedy top-15 min-p 0.2 candidates, when a value model is loaded), `requests` chat requests of up to
`tokens` tokens go through the server on a loopback port, `streams` of them in flight at a time, each
streamed (SSE). Measured per request: time to first token (send -> first token chunk) and inter-token
latency (gaps between token chunks); per level: throughput = completion tokens / wall time. The baseline
runs the same requests one at a time in process (`Runtime.stream`, same TTFT / ITL definitions, no HTTP), in
slices between the server levels so that both see the same background load on a shared machine. Requests
are seeded, so the engine's tokens equal the baseline's (checked: `tokens_match`).
"""
from __future__ import annotations

import json
import os
import statistics
import threading
import time
from typing import Any

from ..config import LengthTarget, Sampling
from ..runtime import Runtime
from .report import format_table, stats_ms, write_record

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a haiku about the sea.",
    "What is a length value model?",
    "Give three tips for learning to cook.",
    "Describe a lighthouse at night.",
    "Why do cats purr?",
    "Summarise the water cycle.",
    "What makes a good password?",
]


def _request(i: int, tokens: int, guided: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                            "max_tokens": tokens, "seed": i, "stream": True}
    if guided:
        body.update(temperature=0.0, top_k=15, min_p=0.2, length={"target": tokens // 2, "constraint": "equal"})
    else:
        body.update(temperature=0.7, top_p=0.9)
    return body


def _stats(seconds: list[float]) -> dict[str, float]:
    """stats_ms, or NaNs when every request ended after one token (no gaps to measure)."""
    return stats_ms(seconds) if seconds else {k: float("nan") for k in ("min", "median", "p90", "mean", "n")}


def _alone(rt: Runtime, body: dict[str, Any]) -> dict[str, Any]:
    """Runtime.stream of the same request in process: tokens, TTFT and inter-token gaps (s)."""
    length = body.get("length")
    sampling = Sampling(temperature=body["temperature"], top_k=body.get("top_k"), top_p=body.get("top_p", 1.0),
                        min_p=body.get("min_p", 0.0), seed=body["seed"])
    start = time.perf_counter()
    tokens, stamps = [], []
    for ev in rt.stream(body["messages"], max_new_tokens=body["max_tokens"], sampling=sampling,
                        length=LengthTarget(length["constraint"], length["target"]) if length else None):
        tokens.append(ev.token_id)
        stamps.append(time.perf_counter())
    return {"token_ids": tokens, "tokens": len(tokens), "ttft": stamps[0] - start,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "wall": stamps[-1] - start}


def _stream(url: str, body: dict[str, Any], record: dict[str, Any]) -> None:
    import httpx

    stamps: list[float] = []
    start = time.perf_counter()
    with httpx.Client(timeout=600) as client, client.stream("POST", url, json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                if "role" not in choice["delta"] and choice["finish_reason"] != "cancelled":
                    stamps.append(time.perf_counter())
            if chunk.get("usage"):
                record["tokens"] = chunk["usage"]["completion_tokens"]
    record.update(ttft=stamps[0] - start, itl=[b - a for a, b in zip(stamps, stamps[1:])], end=stamps[-1])


def _level(url: str, bodies: list[dict[str, Any]], streams: int) -> dict[str, Any]:
    records: list[dict[str, Any]] = [{} for _ in bodies]
    todo = iter(range(len(bodies)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            _stream(url, {**bodies[i], "stream_options": {"include_usage": True}}, records[i])

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in records)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_ms": stats_ms([r["ttft"] for r in records]),
            "itl_ms": _stats([x for r in records for x in r["itl"]])}


def run(rt: Runtime, *, model_name: str = "default", streams: str = "1,4,16", requests: int = 16, tokens: int = 32,
        max_batch: int = 16, out: str | None = "benchmarks/results/bench_serve.json") -> dict[str, Any]:
    from ..server.app import ServerThread, create_app
    from ..server.engine import Engine

    levels = [int(s) for s in str(streams).split(",") if s.strip()]
    if not levels or min(levels) < 1 or tokens < 2 or requests < 1:
        raise ValueError("--streams must be positive ints, --tokens >= 2 and --requests >= 1")
    modes = ["unguided"] + (["guided"] if rt.value is not None else [])
    results: dict[str, Any] = {}
    rows = []
    for mode in modes:
        n = max(requests, max(levels))
        bodies = [{**_request(i, tokens, mode == "guided"), "model": model_name} for i in range(n)]
        chunks = [list(range(n))[k::len(levels) + 1] for k in range(len(levels) + 1)]
        alone: list[dict[str, Any]] = [{} for _ in bodies]
        engine = Engine(rt, max_batch=max_batch, max_queue=max(64, n))
        server_rows = []
        with ServerThread(create_app(engine, model_name)) as server:
            url = f"{server.url}/v1/chat/completions"
            _alone(rt, bodies[0])  # warm-ups
            _level(url, bodies[:1], 1)
            results[mode] = {"server": {}}
            # the in-process baseline runs in slices between the levels, so that both see the same
            # background load; the engine is idle then and does not touch the model
            for k in range(len(levels) + 1):
                while engine.load() != (0, 0):
                    time.sleep(0.01)
                for i in chunks[k]:
                    alone[i] = _alone(rt, bodies[i])
                if k == len(levels):
                    break
                r = _level(url, bodies, levels[k])
                results[mode]["server"][str(levels[k])] = r
                server_rows.append([mode, f"server, {levels[k]} streams", r["tokens_per_s"], r["ttft_ms"]["median"],
                                    r["ttft_ms"]["p90"], r["itl_ms"]["median"], r["itl_ms"]["p90"]])
        base_tokens = sum(a["tokens"] for a in alone)
        base = {"tokens": base_tokens, "wall_s": sum(a["wall"] for a in alone),
                "ttft_ms": stats_ms([a["ttft"] for a in alone]),
                "itl_ms": _stats([x for a in alone for x in a["itl"]])}
        base["tokens_per_s"] = base_tokens / base["wall_s"]
        results[mode]["one_at_a_time_in_process"] = base
        rows.append([mode, "alone, in process", base["tokens_per_s"], base["ttft_ms"]["median"],
                     base["ttft_ms"]["p90"], base["itl_ms"]["median"], base["itl_ms"]["p90"]])
        rows += server_rows
        results[mode]["tokens_match"] = _same_tokens(rt, bodies, [a["token_ids"] for a in alone], max_batch)
    results["load_average_1min_at_end"] = os.getloadavg()[0]
    config = {"model": model_name, "streams": levels, "requests": max(requests, max(levels)), "tokens": tokens,
              "max_batch": max_batch, "device": str(rt.device), "dtype": str(rt.dtype)}
    print(format_table(["mode", "peer", "tokens/s", "TTFT p50 ms", "TTFT p90", "ITL p50 ms", "ITL p90"], rows))
    print(summary(results))
    print("tokens equal to the requests run alone: " + ", ".join(f"{m} {results[m]['tokens_match']}" for m in modes))
    print(f"1-minute load average at the end: {results['load_average_1min_at_end']:.2f} on {os.cpu_count()} cores")
    if out:
        write_record(out, "serve", config, results)
        print(f"wrote {out}")
    return results


def _same_tokens(rt: Runtime, bodies: list[dict[str, Any]], expected: list[list[int]],
                 max_batch: int) -> bool:
    """The engine's tokens for every request, all submitted at once, against the alone runs."""
    from ..guidance import Guidance
    from ..server.engine import Engine

    engine = Engine(rt, max_batch=max_batch, max_queue=max(64, len(bodies))).start()
    try:
        got: list[list[int]] = [[] for _ in bodies]
        done = [threading.Event() for _ in bodies]
        for i, b in enumerate(bodies):
            length = b.get("length")
            sampling = Sampling(temperature=b["temperature"], top_k=b.get("top_k"), top_p=b.get("top_p", 1.0),
                                min_p=b.get("min_p", 0.0), seed=b["seed"])
            guidance = Guidance.of(LengthTarget(length["constraint"], length["target"]) if length else None, None)

            def sink(ev, i=i):
                if ev.token_id is not None:
                    got[i].append(ev.token_id)
                if ev.finish_reason is not None:
                    done[i].set()
            engine.submit(rt.encode(b["messages"]), b["max_tokens"], sampling, guidance, sink)
        for d in done:
            d.wait(600)
        return got == expected
    finally:
        engine.stop()


def summary(results: dict[str, Any]) -> str:
    """One line per mode: server throughput at each level relative to the alone run."""
    lines = []
    for mode, r in results.items():
        if not isinstance(r, dict):
            continue
        base = r["one_at_a_time_in_process"]["tokens_per_s"]
        ratios = {k: v["tokens_per_s"] / base for k, v in r["server"].items()}
        lines.append(f"{mode}: " + ", ".join(f"{k} streams x{v:.2f}" for k, v in ratios.items())
                     + f" (median over levels x{statistics.median(ratios.values()):.2f})")
    return "\n".join(lines)
