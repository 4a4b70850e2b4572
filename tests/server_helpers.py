"""Shared pieces of the server tests: a tiny random runtime and an engine driven synchronously."""
from __future__ import annotations

import threading
from pathlib import Path

from checkpoints import make_checkpoint, make_value_head

import lenvm_rt
from lenvm_rt.runtime import Runtime
from lenvm_rt.server.engine import Engine, EngineEvent


def tiny_runtime(root: Path, *, value: bool = True, max_context: int | None = None) -> Runtime:
    """A random 2-layer Llama (hidden 64, context 512 or max_context) with a random head on its own trunk."""
    policy = make_checkpoint(root / "policy", "llama", seed=3)
    head = make_value_head(root / "head" / "value_head.safetensors", 64, gamma=0.97) if value else None
    return torch_head(lenvm_rt.load(policy, value_model=head, device="cpu", max_context=max_context))


def torch_head(rt: Runtime) -> Runtime:
    """The value head through its torch reference: under TRITON_INTERPRET (CPU test runs) the interpreted
    kernel would take ~90% of a test's time. Engine and alone runs share it, so equality tests hold."""
    if rt.value is not None:
        from lenvm_rt.kernels.value_head import value_head

        vm, h = rt.value, rt.value.head
        vm.values = lambda x: value_head(x, vm._final_norm, h.w1, h.b1, h.w2, h.b2, eps=vm._eps, backend="torch")
    return rt


class Collector:
    """Gathers one request's events; `wait()` returns (tokens, remaining, finish_reason)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float | None] = []
        self.ranks: list[int | None] = []
        self.tops: list[list[tuple[int, float]] | None] = []
        self.remaining: list[float] = []
        self.reason: str | None = None
        self.done = threading.Event()

    def __call__(self, ev: EngineEvent) -> None:
        if ev.token_id is not None:
            self.tokens.append(ev.token_id)
            self.logprobs.append(ev.logprob)
            self.ranks.append(ev.rank)
            self.tops.append(ev.top_logprobs)
            if ev.remaining is not None:
                self.remaining.append(ev.remaining)
        if ev.finish_reason is not None:
            self.reason = ev.finish_reason
            self.done.set()

    def wait(self, timeout: float = 60.0) -> tuple[list[int], list[float], str | None]:
        assert self.done.wait(timeout), "request not answered in time"
        return self.tokens, self.remaining, self.reason


def run_alone(engine: Engine, prompt_ids, max_new, sampling, guidance):
    c = Collector()
    engine.submit(prompt_ids, max_new, sampling, guidance, c)
    return c.wait()
