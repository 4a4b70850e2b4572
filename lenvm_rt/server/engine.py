"""Continuous batching: one running decode batch that requests join and leave, on one background thread.

    engine = Engine(runtime, max_batch=16, max_queue=64).start()
    req = engine.submit(prompt_ids, max_new_tokens, sampling, guidance, on_event, top_logprobs=0)  # QueueFull
    on_event(EngineEvent(token_id, remaining, finish_reason, error, logprob, rank, top_logprobs))  # engine thread
    req.cancel()                                                 # frees the row and its KV at the next step
    engine.call(fn) -> concurrent.futures.Future                 # fn(engine) between two steps (length prediction)
    engine.stop()

The engine thread owns the model (and a separate value trunk): nothing else may touch it while the engine
runs. The loop is decode.py's `_plain` / `_valued` made step-wise and slot-based: active rows always sit in
cache rows 0..n-1 (a finished row's slot takes the last row's KV), a new request is prefilled alone into the
next free row (`prefill(slots=[n])`), and every step advances all active rows by one token, guided and
unguided rows mixed, each with its own sampling, seed, length rule and step counter.

Batch invariance: a request draws the same tokens as `Runtime.generate` of the same request alone, and its
events carry the same log p and rank of each token and the same alternatives (`Generation.token_logprobs` /
`token_ranks` / `top_logprobs`). Its prompt is prefilled alone, its draws are keyed by (seed, its own step),
its guided choices come from its own slot of the step controller, and the per-row ops (the CPU core's skinny GEMM
and attention) give a row the same bits whatever the batch (tests/test_server_engine.py checks this for plain and
guided rows).
With a value model every row goes through the valued step (as `Runtime.generate` does), so streamed tokens
carry the live predicted remaining length.
"""
from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..config import Sampling
from ..decode import (
    CACHE_BLOCK,
    Alternatives,
    chosen_stats,
    cpu_candidate_stats,
    host_values,
    step_candidates,
    top_alternatives,
)
from ..guidance import CandidateSettings, EosRule, Guidance
from ..runtime import Runtime, top_logprobs_counts
from ..sampling import TokenChooser, resolve_seed
from ..value_math import remaining_from_logit
from .slots import SlotGuide, grow_cache, move_row


class QueueFull(RuntimeError):
    """The engine holds max_queue requests already (running + waiting)."""


class EngineStopped(RuntimeError):
    """The engine is not running."""


@dataclass(frozen=True)
class EngineEvent:
    """One generated token (finish_reason set on the last), or the end of a request without a token."""

    token_id: int | None
    remaining: float | None = None  # predicted tokens left after this one (EOS counted); needs a value model
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    logprob: float | None = None  # log p of the token under the policy's logits of its step (temperature 1)
    rank: int | None = None  # its 1-based rank there (1 + tokens strictly more likely)
    top_logprobs: Alternatives | None = None  # the step's most probable tokens (id, log p), when asked for


@dataclass(eq=False)
class EngineRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling  # seed resolved at submit
    guidance: Guidance | None
    on_event: Callable[[EngineEvent], None]
    top_logprobs: int = 0  # alternatives to report with each token
    cancelled: bool = False
    engine: Engine | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Ask the engine to drop this request; its row and KV are freed before the next step."""
        self.cancelled = True
        if self.engine is not None:
            self.engine._wake()


@dataclass(eq=False)
class _Row:
    req: EngineRequest
    position: int  # cache position of the token the next step writes
    step: int = 0  # tokens generated so far
    guide_slot: int = -1  # slot in the step controller (guided rows)


class Engine:
    """A continuous decode batch over one Runtime; see the module docstring."""

    def __init__(self, runtime: Runtime, *, max_batch: int = 16, max_queue: int = 64) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.rt = runtime
        self.max_batch = max_batch
        self.max_queue = max(max_queue, max_batch)
        self.scratch = max_batch  # one cache row beyond the batch, for length predictions
        self._pending: deque[EngineRequest] = deque()
        self._calls: deque[tuple[Callable[[Engine], Any], Future]] = deque()
        self._rows: list[_Row] = []
        self._inflight: set[EngineRequest] = set()  # submitted and not yet answered with a finish event
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._x: torch.Tensor | None = None  # [n, D] hidden state of each active row
        self._dirty = True  # the batch's rows changed: rebuild the per-batch settings
        self.steps = 0  # decode steps run
        self.cancelled = 0  # requests ended by cancel() (client gone, stop string)
        value = runtime.value
        self._guide = SlotGuide(max_batch, runtime.eos_token_ids, runtime.device) if value is not None else None

    # ---- client side (any thread) ---------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def load(self) -> tuple[int, int]:
        """(active rows, waiting requests)."""
        with self._cond:
            return len(self._rows), len(self._pending)

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lenvm-rt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def submit(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, guidance: Guidance | None,
               on_event: Callable[[EngineEvent], None], *, top_logprobs: int = 0) -> EngineRequest:
        """Queue a validated request (Runtime._prepare's checks); raises QueueFull or EngineStopped (ValueError for a
        top_logprobs outside [0, 20])."""
        top_logprobs = top_logprobs_counts([top_logprobs], 1)[0]  # one int
        if sampling.seed is None:
            sampling = replace(sampling, seed=resolve_seed(sampling))
        req = EngineRequest(list(prompt_ids), max_new_tokens, sampling, guidance, on_event, top_logprobs,
                            engine=self)
        with self._cond:
            if not self.running:
                raise EngineStopped("the engine is not running")
            if len(self._inflight) >= self.max_queue:
                raise QueueFull(f"the server holds {self.max_queue} requests already; retry later")
            self._pending.append(req)
            self._inflight.add(req)
            self._cond.notify_all()
        return req

    def call(self, fn: Callable[[Engine], Any]) -> Future:
        """Run fn(engine) on the engine thread between two steps; the future holds its result."""
        fut: Future = Future()
        with self._cond:
            if not self.running:
                raise EngineStopped("the engine is not running")
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    def predict_lengths(self, encoded: list[list[int]]) -> list[float]:
        """Predicted generation length of each prompt (EOS counted); call through `call` (engine thread).

        Each prompt is prefilled alone into the scratch row, so predictions never touch running rows.
        """
        value = self.rt.value
        if value is None:
            raise ValueError("length prediction needs a value model; start the server with --value-model")
        trunk = value.trunk or self.rt.model
        out: list[float] = []
        for ids in encoded:
            self._ensure_cache(len(ids))
            x = trunk.prefill(torch.tensor([ids], device=trunk.device), [len(ids)], slots=[self.scratch])
            z, _ = value.values(x)
            out.append(float(remaining_from_logit(z.double(), value.gamma)[0]))
        return out

    # ---- engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not (self._stopping or self._pending or self._calls or self._rows):
                    self._cond.wait()
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
                dropped = [r for r in self._pending if r.cancelled]  # cancelled while waiting: no place taken
                self._pending = deque(r for r in self._pending if not r.cancelled)
                free = self.max_batch - len(self._rows)
                new = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
            for req in dropped:
                self._send(req, EngineEvent(None, None, "cancelled"))
            with torch.inference_mode():
                for fn, fut in calls:
                    self._run_call(fn, fut)
                for req in new:
                    try:
                        self._admit(req)
                    except Exception as exc:  # a bug, not a bad request: fail this request only
                        traceback.print_exc()
                        self._send(req, EngineEvent(None, None, "error", f"internal error: {type(exc).__name__}"))
                try:
                    self._drop([i for i, r in enumerate(self._rows) if r.req.cancelled], "cancelled")
                    if self._rows:
                        self._step()
                except Exception as exc:  # a bug, not a bad request: fail the running rows, keep serving
                    traceback.print_exc()
                    self._fail_all(f"internal error: {type(exc).__name__}: {exc}")
        self._fail_all("the server is shutting down")
        with self._cond:
            for req in self._pending:
                self._send(req, EngineEvent(None, None, "error", "the server is shutting down"))
            self._pending.clear()
            for _, fut in self._calls:
                fut.set_exception(EngineStopped("the engine stopped"))
            self._calls.clear()

    def _run_call(self, fn: Callable[[Engine], Any], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(self))
        except Exception as exc:  # handed to the caller (a ValueError is a bad request)
            fut.set_exception(exc)

    def _send(self, req: EngineRequest, event: EngineEvent) -> None:
        if event.finish_reason is not None:
            with self._cond:
                self._inflight.discard(req)
                self.cancelled += event.finish_reason == "cancelled"
        try:
            req.on_event(event)
        except Exception:  # a broken consumer only loses its own request
            req.cancelled = True

    def _fail_all(self, message: str) -> None:
        rows, self._rows = self._rows, []
        for row in rows:
            if row.guide_slot >= 0 and self._guide is not None:
                self._guide.retire(row.guide_slot)
            self._send(row.req, EngineEvent(None, None, "error", message))
        self._x = None
        self._dirty = True

    def _ensure_cache(self, tokens: int) -> None:
        ctx = self.rt.max_context
        capacity = min(-(-tokens // CACHE_BLOCK) * CACHE_BLOCK, ctx)
        grow_cache(self.rt.model, self.max_batch + 1, capacity)
        if self.rt.value is not None and self.rt.value.trunk is not None:
            grow_cache(self.rt.value.trunk, self.max_batch + 1, capacity)

    def _admit(self, req: EngineRequest) -> None:
        if req.cancelled:
            self._send(req, EngineEvent(None, None, "cancelled"))
            return
        model, value = self.rt.model, self.rt.value
        self._ensure_cache(len(req.prompt_ids) + req.max_new_tokens)
        slot = len(self._rows)
        ids = torch.tensor([req.prompt_ids], device=model.device)
        x = model.prefill(ids, [ids.shape[1]], slots=[slot])
        if value is not None and value.trunk is not None:
            value.trunk.prefill(ids, [ids.shape[1]], slots=[slot])
        row = _Row(req, position=ids.shape[1])
        if req.guidance is not None and self._guide is not None:
            row.guide_slot = self._guide.admit(req.guidance, req.sampling, req.max_new_tokens, value.gamma)
        self._x = x if self._x is None else torch.cat((self._x, x))
        with self._cond:
            self._rows.append(row)
        self._dirty = True

    def _drop(self, indices: list[int], reason: str | None) -> None:
        """Free rows (finished or cancelled): the last row's KV and state move into each freed slot."""
        model, value = self.rt.model, self.rt.value
        for i in sorted(indices, reverse=True):
            row = self._rows[i]
            last = len(self._rows) - 1
            if i != last:
                moved = self._rows[last]
                move_row(model, last, i, moved.position + 1)
                if value is not None and value.trunk is not None:
                    move_row(value.trunk, last, i, moved.position + 1)
                self._x[i] = self._x[last]
            with self._cond:
                self._rows[i] = self._rows[last]
                self._rows.pop()
            self._x = self._x[:last] if last > 0 else None
            if row.guide_slot >= 0 and self._guide is not None:
                self._guide.retire(row.guide_slot)
            if reason is not None:
                self._send(row.req, EngineEvent(None, None, reason))
            self._dirty = True

    def _settings(self) -> None:
        if not self._dirty:
            return
        dev = self.rt.device
        samplings = [r.req.sampling for r in self._rows]
        guidances = [r.req.guidance for r in self._rows]
        self._chooser = TokenChooser(samplings, dev)
        self._guided = [i for i, g in enumerate(guidances) if g is not None]
        self._guide_slots = [self._rows[i].guide_slot for i in self._guided]
        self._top_counts = [r.req.top_logprobs for r in self._rows]
        self._unguided = torch.tensor([g is None for g in guidances], device=dev)
        if self.rt.value is not None:
            self._cand_settings = CandidateSettings.of(samplings, self.rt.eos_token_ids, dev)
            self._eos_rule = EosRule(guidances, dev)
        self._dirty = False

    def _step(self) -> None:
        self._settings()
        rows, model, value, dev = self._rows, self.rt.model, self.rt.value, self.rt.device
        B = len(rows)
        steps = [r.step for r in rows]
        positions = [r.position for r in rows]
        pos = torch.tensor(positions, device=dev)
        logits = model.logits(self._x)
        # before the lookahead evicts the logits from the cache
        top = top_alternatives(logits, self._top_counts)
        if value is None:
            tokens = self._chooser(logits, steps)
            finished = self._emit(*chosen_stats(logits, tokens), None, top)
        else:
            tokens, stats, slot, lookahead = self._valued(logits, steps, positions, pos)
            finished = self._emit(*stats, top)
        self.steps += 1
        if len(finished) == B:
            self._drop(finished, None)
            return
        if value is None:
            self._x = model.decode_step(tokens, positions, pos)
        else:
            trunk = value.trunk or model
            trunk.commit(slot, positions, pos)
            if value.trunk is None:
                self._x = lookahead[torch.arange(B, device=dev), slot]
            else:
                self._x = model.decode_step(tokens, positions, pos)
        for r in rows:
            r.position += 1
            r.step += 1
        self._drop(finished, None)

    def _valued(self, logits: torch.Tensor, steps: list[int], positions: list[int], pos: torch.Tensor):
        value, dev = self.rt.value, self.rt.device
        B = len(self._rows)
        guided = self._guided
        unguided = self._unguided
        plain = (self._chooser(logits, steps) if len(guided) < B
                 else torch.zeros(B, dtype=torch.long, device=dev))
        # the rows' own steps, host ints: a mask no row is in is skipped
        cand, logp = step_candidates(logits, self._cand_settings, self._eos_rule, steps, plain, unguided)
        cand_stats = cpu_candidate_stats(logits, cand)  # while the logits are in cache, as the decode loop does
        trunk = value.trunk or self.rt.model
        lookahead = trunk.lookahead(cand, positions, pos)  # [B, K, D]
        z = value.values(lookahead.reshape(B * cand.shape[1], -1))[0].view(B, -1)
        slot = torch.zeros(B, dtype=torch.long, device=dev)
        tokens = plain.clone()
        if guided:
            g_slot, g_token = self._guide.step(self._guide_slots, cand[guided], logp[guided], z[guided])
            slot[guided] = g_slot.to(dev).clamp(min=0)
            tokens[guided] = g_token.to(dev)
        return tokens, host_values(logits, tokens, slot, z, value.gamma, cand_stats), slot, lookahead

    def _emit(self, tokens: list[int], logprobs: list[float], ranks: list[int], remaining: list[float] | None,
              top: list[Alternatives | None]) -> list[int]:
        """Send each row its token (remaining: the predicted tokens left, 0 after EOS); the rows that finished."""
        finished = []
        eos = self.rt.eos_token_ids
        for i, (row, token, logprob, rank) in enumerate(zip(self._rows, tokens, logprobs, ranks)):
            reason = "stop" if token in eos else ("length" if row.step + 1 == row.req.max_new_tokens else None)
            if row.req.cancelled:
                reason = reason or "cancelled"
            left = None if remaining is None else (0.0 if reason == "stop" else remaining[i])
            self._send(row.req, EngineEvent(token, left, reason, logprob=logprob, rank=rank, top_logprobs=top[i]))
            if reason is None and row.req.cancelled:  # cancelled while its event was being handled
                self._send(row.req, EngineEvent(None, None, "cancelled"))
                reason = "cancelled"
            if reason is not None:
                finished.append(i)
        return finished
