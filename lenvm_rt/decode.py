"""The decode loops: plain, and with a value model (values reported, optionally length-guided).

Shapes: B rows, K candidate slots, D hidden, V vocabulary.

    for emitted in decode(model, value, prompts, samplings, guidances, max_new_tokens, eos_ids, context,
                          top_logprobs=[n_0, ..., n_B-1]):
        emitted[b] = Emitted(token, finish_reason or None, predicted remaining or None, log p(token), rank, top),
        or None once row b has finished in an earlier step; log p and the 1-based rank are the token's under
        the policy's own logits of that step (temperature 1, no filters), for every row, guided or not; top
        holds the n_b most probable tokens of that distribution as (id, log p) (None where n_b is 0)

Plain: prefill, then one decode_step per token; rows sample with their own filters (TokenChooser).

With a value model, every step is one lookahead over K candidate slots per row (LENVM.md §4.1):
  1. candidates from the policy logits (guided rows), or the row's own sample in slot 0 (unguided
     rows: they keep their filters and seeds exactly as in plain decoding, R2); K is cut to the
     most slots any guided row filled this step
  2. values z[B, K] of the state each candidate leads to: the shared trunk's own lookahead
     (configuration b), or the separate LenVM's lookahead over its own cache (configuration a)
  3. the step controller picks a slot per guided row (one call for the batch)
  4. commit: the chosen candidate's K/V stay in the cache(s). Shared trunk: its lookahead output is
     the next step's hidden state, so one trunk forward per token. Separate: the policy decodes the
     chosen token while the LenVM keeps its own cache in step.
Finished rows ride along until the batch ends; their outputs are dropped.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from . import cpu_ops
from .config import Sampling
from .guidance import CandidateSettings, EosRule, Guidance, Step, build_candidates
from .model import CausalLM, right_padded
from .sampling import TokenChooser
from .selector import make_selector
from .value_math import remaining_from_logit
from .values import ValueModel

Alternatives = list[tuple[int, float]]  # (token id, log p), most probable first


class Emitted(NamedTuple):
    """One row's token of one step."""

    token: int
    finish_reason: str | None
    remaining: float | None  # predicted tokens left after it (0 after EOS); None without a value model
    logprob: float
    rank: int
    top: Alternatives | None = None  # the step's most probable tokens, when the row asked for them


CACHE_BLOCK = 256  # KV capacity grows in blocks so that similar requests reuse one allocation


def _capacity(lengths: list[int], max_new_tokens: int, limit: int) -> int:
    return min(-(-(max(lengths) + max_new_tokens) // CACHE_BLOCK) * CACHE_BLOCK, limit)


class Stopwatch:
    """Optional per-section timing of the guided step (seconds, summed over steps).

    Laps use the host clock: exact on the CPU, where every op is synchronous; on CUDA they measure
    launch time only unless the caller synchronises.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.steps = 0
        self._t = time.perf_counter()

    def start(self) -> None:
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self._t
        self._t = now


class _NoStopwatch(Stopwatch):
    def start(self) -> None:
        pass

    def lap(self, name: str) -> None:
        pass


class _Rows:
    """Finish bookkeeping shared by both loops."""

    def __init__(self, n: int, max_new_tokens: int, eos_ids: frozenset[int]) -> None:
        self.running = [True] * n
        self.max_new = max_new_tokens
        self.eos = eos_ids

    def emit(self, step: int, tokens: list[int], logp: list[float], rank: list[int],
             remaining: list[float] | None, top: list[Alternatives | None]) -> list[Emitted | None]:
        """Host values of one step -> the rows' Emitted (None for rows already finished); remaining is 0 after EOS."""
        out: list[Emitted | None] = []
        for b, token in enumerate(tokens):
            if not self.running[b]:
                out.append(None)
                continue
            eos = token in self.eos
            reason = "stop" if eos else ("length" if step + 1 == self.max_new else None)
            self.running[b] = reason is None
            out.append(Emitted(token, reason, None if remaining is None else (0.0 if eos else remaining[b]), logp[b],
                               rank[b], top[b]))
        return out


def chosen_stats(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[list[int], list[float], list[int]]:
    """(tokens, log p, rank) of each row's token as host lists, in one device-to-host transfer."""
    logp, rank = token_stats(logits, tokens)
    ids, logp, rank = torch.stack((tokens.double(), logp.double(), rank.double())).tolist()
    return [int(t) for t in ids], logp, [int(r) for r in rank]


def _native_logits(logits: torch.Tensor) -> bool:
    """Whether cpu_ops.token_stats can read these logits as they are (contiguous CPU fp32)."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous()


def token_stats(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(tokens[b]) under softmax(logits[b]) [B] and its 1-based rank [B] (1 + tokens strictly more likely).

    CPU fp32 logits take one native pass per row (cpu_ops.token_stats); others run in torch.
    """
    if _native_logits(logits):
        return cpu_ops.token_stats(logits, tokens.to(torch.int64).contiguous())
    logits = logits.float()
    chosen = logits.gather(1, tokens.view(-1, 1))  # [B, 1]
    logp = chosen.squeeze(1) - torch.logsumexp(logits, dim=-1)
    rank = (logits > chosen).sum(dim=-1) + 1
    return logp, rank


def top_alternatives(logits: torch.Tensor, counts: Sequence[int]) -> list[Alternatives | None]:
    """Row b's counts[b] most probable tokens under softmax(logits[b]) [B, V] as (id, log p), most probable first and
    equal logits by lower id (None where counts[b] is 0).

    Each row is taken on its own, so a row gets the same list whatever the batch, and log p comes from token_stats,
    so the chosen token's entry equals its own log p. CPU rows are selected in numpy: torch's elementwise ops over
    a vocabulary run as parallel regions, whose OpenMP workers may then spin into the next forward (torch_threads.py).
    """
    out: list[Alternatives | None] = [None] * len(counts)
    for b, n in enumerate(counts):
        if n <= 0:
            continue
        ids = torch.from_numpy(_top_ids(logits[b].numpy(), n)) if logits.device.type == "cpu" else \
            _top_ids_torch(logits[b], n)
        logp, _ = token_stats(logits[b:b + 1], ids.to(logits.device).view(1, -1))
        out[b] = list(zip(ids.tolist(), logp.view(-1).tolist()))
    return out


def _top_ids(row: np.ndarray, n: int) -> np.ndarray:
    n = min(n, row.size)
    edge = np.partition(row, row.size - n)[row.size - n]  # the n-th largest logit
    ids = np.flatnonzero(row >= edge)
    return ids[np.lexsort((ids, -row[ids]))][:n]  # logit descending, then id ascending


def _top_ids_torch(row: torch.Tensor, n: int) -> torch.Tensor:
    edge = torch.topk(row, min(n, row.shape[0])).values[-1]
    ids = torch.nonzero(row >= edge).view(-1)  # ascending ids, so a stable sort orders ties by id
    return ids[torch.sort(row[ids], descending=True, stable=True).indices[:n]]


CandidateStats = tuple[np.ndarray, np.ndarray, np.ndarray]  # candidate ids, log p, rank: [B, K] each


def cpu_candidate_stats(logits: torch.Tensor, cand: torch.Tensor) -> CandidateStats | None:
    """(ids, log p, rank) [B, K] of every candidate under the policy's logits, for CPU fp32 logits (one native pass
    per row); None elsewhere, where the chosen tokens' statistics are taken after the choice."""
    if not _native_logits(logits):
        return None
    logp, rank = cpu_ops.token_stats(logits, cand)
    return cand.numpy(), logp.numpy(), rank.numpy()


def chosen_remaining(z: torch.Tensor, slots: list[int], tokens: list[int], gamma: float,
                     eos_ids: frozenset[int]) -> list[float]:
    """Predicted remaining tokens after each row's chosen candidate z[b, slots[b]] as Python floats, 0 after EOS
    (one host transfer of z [B, K] instead of a torch op for each step of the arithmetic)."""
    zs = z.tolist()
    return [0.0 if t in eos_ids else remaining_from_logit(zs[b][s], gamma)
            for b, (s, t) in enumerate(zip(slots, tokens))]


def host_values(logits: torch.Tensor, tokens: torch.Tensor, slot: torch.Tensor, z: torch.Tensor, gamma: float,
                 cand_stats: CandidateStats | None) -> tuple[list[int], list[float], list[int], list[float]]:
    """The step's tokens, their log p and rank, and the predicted remaining length after each chosen candidate."""
    if cand_stats is not None:  # CPU: a few list conversions and Python floats, no torch op per value
        slots, ids = slot.tolist(), tokens.tolist()
        remaining = chosen_remaining(z, slots, ids, gamma, frozenset())
        cand, logp, rank = cand_stats
        if all(cand[b, s] == t for b, (s, t) in enumerate(zip(slots, ids))):
            return (ids, [float(logp[b, s]) for b, s in enumerate(slots)],
                    [int(rank[b, s]) for b, s in enumerate(slots)], remaining)
        # an EOS the controller forced outside the candidates: statistics of the tokens themselves
        return (*chosen_stats(logits, tokens), remaining)
    remaining = remaining_from_logit(z, gamma)  # [B, K]
    chosen = remaining.gather(1, slot.view(-1, 1)).squeeze(1)
    logp, rank = token_stats(logits, tokens)
    ids, logp, rank, rem = torch.stack((tokens.double(), logp.double(), rank.double(), chosen.double())).tolist()
    return [int(t) for t in ids], logp, [int(r) for r in rank], rem


def live_width(filled: torch.Tensor, unguided: torch.Tensor) -> int:
    """Slots the lookahead needs this step: the most filled slots of any guided row (unguided rows: 1).

    Filled slots are a prefix of each row (candidates sorted by probability, filters monotone, a
    forced EOS takes the first empty slot), so cutting the empty tail changes no choice and saves
    the lookahead rows a min-p or top-p filter emptied (one host sync per step, as emitting does).
    """
    counts = torch.where(unguided, 1, filled.sum(dim=-1))
    return int(counts.max())


def step_candidates(logits: torch.Tensor, settings: CandidateSettings, eos_rule: EosRule, step: Step,
                    plain: torch.Tensor, unguided: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's lookahead candidates (ids, log p [B, W]): the candidate set under the rows' EOS rules, cut to the
    live width, with each unguided row's plain draw plain[B] in its slots (unguided[B] bool). The decode loop and
    the server engine both build their steps' candidates here, so a request gets the same ones in either."""
    ban, force = eos_rule.masks(step)
    cand, logp, filled = build_candidates(logits, settings, ban, force, eos_rule.ending(step))  # [B, K]
    width = live_width(filled, unguided)
    cand, logp = cand[:, :width], logp[:, :width]
    return torch.where(unguided.view(-1, 1), plain.view(-1, 1), cand), logp


def decode(model: CausalLM, value: ValueModel | None, prompts: list[list[int]], samplings: list[Sampling],
           guidances: list[Guidance | None], max_new_tokens: int, eos_ids: frozenset[int],
           context: int, stopwatch: Stopwatch | None = None, *,
           top_logprobs: Sequence[int] | None = None) -> Iterator[list[Emitted | None]]:
    counts = list(top_logprobs) if top_logprobs is not None else [0] * len(prompts)
    if value is None:
        return _plain(model, prompts, samplings, max_new_tokens, eos_ids, context, counts)
    return _valued(model, value, prompts, samplings, guidances, max_new_tokens, eos_ids, context,
                   stopwatch or _NoStopwatch(), counts)


def _plain(model: CausalLM, prompts: list[list[int]], samplings: list[Sampling], max_new_tokens: int,
           eos_ids: frozenset[int], context: int, counts: list[int]) -> Iterator[list[Emitted | None]]:
    ids, lengths = right_padded(prompts)
    B = len(prompts)
    model.allocate(batch=B, capacity=_capacity(lengths, max_new_tokens, context))
    chooser = TokenChooser(samplings, model.device)
    rows = _Rows(B, max_new_tokens, eos_ids)
    with torch.inference_mode():
        x = model.prefill(ids.to(model.device), lengths)
        positions = list(lengths)
        pos = torch.tensor(positions, device=model.device)
        for step in range(max_new_tokens):
            logits = model.logits(x)
            next_ids = chooser(logits, [step] * B)
            yield rows.emit(step, *chosen_stats(logits, next_ids), None, top_alternatives(logits, counts))
            if not any(rows.running):
                return
            x = model.decode_step(next_ids, positions, pos)
            positions = [p + 1 for p in positions]
            pos += 1


def _valued(model: CausalLM, value: ValueModel, prompts: list[list[int]], samplings: list[Sampling],
            guidances: list[Guidance | None], max_new_tokens: int, eos_ids: frozenset[int],
            context: int, watch: Stopwatch, counts: list[int]) -> Iterator[list[Emitted | None]]:
    dev = model.device
    ids, lengths = right_padded(prompts)
    B = len(prompts)
    capacity = _capacity(lengths, max_new_tokens, context)
    trunk = value.trunk or model  # the trunk the value head reads
    model.allocate(batch=B, capacity=capacity)
    if value.trunk is not None:
        value.trunk.allocate(batch=B, capacity=capacity)
    chooser = TokenChooser(samplings, dev)
    guided = [b for b, g in enumerate(guidances) if g is not None]
    guided_index = torch.tensor(guided, dtype=torch.long, device=dev)
    unguided = torch.tensor([g is None for g in guidances], device=dev)
    settings = CandidateSettings.of(samplings, eos_ids, dev)
    selector = make_selector([guidances[b] for b in guided], [samplings[b] for b in guided],
                             chooser.seeds[guided], max_new_tokens, value.gamma, eos_ids, dev) if guided else None
    eos_rule = EosRule(guidances, dev)
    rows = _Rows(B, max_new_tokens, eos_ids)
    with torch.inference_mode():
        prompt_ids = ids.to(dev)
        x = model.prefill(prompt_ids, lengths)
        if value.trunk is not None:
            value.trunk.prefill(prompt_ids, lengths)
        positions = list(lengths)
        pos = torch.tensor(positions, device=dev)
        arange = torch.arange(B, device=dev)
        for step in range(max_new_tokens):
            watch.start()
            logits = model.logits(x)
            # unguided rows: exactly their plain-decoding draw (skipped when every row is guided)
            plain = chooser(logits, [step] * B) if len(guided) < B else torch.zeros(B, dtype=torch.long, device=dev)
            cand, logp = step_candidates(logits, settings, eos_rule, step, plain, unguided)  # [B, W]
            # CPU: log p and rank of every candidate now, while the logits are in cache (the lookahead evicts them)
            cand_stats = cpu_candidate_stats(logits, cand)
            top = top_alternatives(logits, counts)
            prepared = None
            if selector is not None:
                prepared = selector.prepare(*((cand, logp) if len(guided) == B else
                                              (cand[guided_index], logp[guided_index])))
            watch.lap("lm_head_and_candidates")
            lookahead = trunk.lookahead(cand, positions, pos)  # [B, K, D]
            watch.lap("lookahead_forward")
            z = value.values(lookahead.reshape(B * cand.shape[1], -1))[0].view(B, -1)  # [B, K] fp32
            watch.lap("value_head")
            if selector is None:
                slot, tokens = torch.zeros(B, dtype=torch.long, device=dev), plain
            elif len(guided) == B:  # every row guided: no gather and scatter
                slot, tokens = selector.choose(prepared, z)
                slot = slot.clamp(min=0)
            else:
                slot, tokens = torch.zeros(B, dtype=torch.long, device=dev), plain.clone()
                g_slot, g_token = selector.choose(prepared, z[guided_index])
                slot[guided_index] = g_slot.clamp(min=0).to(slot.dtype)
                tokens[guided_index] = g_token.to(tokens.dtype)
            watch.lap("select")
            emitted = rows.emit(step, *host_values(logits, tokens, slot, z, value.gamma, cand_stats), top)
            watch.lap("host")
            yield emitted
            if not any(rows.running):
                return
            watch.start()
            trunk.commit(slot, positions, pos)
            if value.trunk is None:
                x = lookahead[arange, slot]  # the chosen candidate's output is the next hidden state
            else:
                x = model.decode_step(tokens, positions, pos)
            positions = [p + 1 for p in positions]
            pos += 1
            watch.lap("commit_and_policy_forward")
            watch.steps += 1
