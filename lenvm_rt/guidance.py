"""Candidate sets and per-row guidance settings for length-guided decoding (LENVM.md §4.1–§4.2).

Shapes: B rows, V vocabulary, K candidate slots, E EOS ids.

    ban, force = EosRule(guidances, device).masks(step)               # bool[B] each, or None: no row
    cands = build_candidates(logits[B, V], settings, ban, force)      # ids/logp[B, K], filled[B, K]

Candidates per row: softmax(logits / temperature) (temperature 1 for greedy rows), the K most
probable tokens sorted descending (K is the row's top_k, capped at K_MAX; DEFAULT_K when top_k is
off), then top-p on the exclusive prefix mass of full-vocabulary probabilities (1: none), then min-p against
the row's most probable token. Slot 0 always survives. Unfilled slots repeat slot 0's id (so the
lookahead has a real token to run) and carry logp = -inf.

EOS (EosRule): rows in `ban_eos` (At Least by either rule, and the quality-preserving Equal-To rules, before
their target) never see an EOS candidate; rows in
`force_eos` (any length rule from its target on) always do: when the filters dropped EOS, it takes the
first empty slot (else the last one) with its own log-probability, so a row can end where its target says even when the
policy ranks EOS below its top-k (EOS reachability).

Ending window (the band rules of At Most and At Least): a text that must end by a limit ends best where the policy
itself would accept an end, not at the limit, where EOS mid-sentence costs the policy 18-35 nats. W = max(BAND_ABS,
BAND_REL·N) tokens for a target of N tokens (T = N + 1). An At Most band row is in its window while N - W < t + 1 < T
(t tokens generated), an At Least band row while T <= t + 1 < T + W; at t + 1 = T + W the At Least band row must end.
A row in its window whose policy gives EOS (full vocabulary, the row's temperature, summed over the EOS ids) a
probability >= END_P, and a row that must end, gets the single candidate EOS (its most probable id), which every rule
takes. Rows of all other rules never see the window.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import LengthTarget, Sampling
from .select_ref import (
    AT_LEAST,
    AT_LEAST_BAND,
    AT_MOST,
    AT_MOST_BAND,
    BAND_ABS,
    BAND_REL,
    EQUAL,
    EQUAL_BAND,
    EQUAL_SOFT,
    TILT,
)
from .torch_threads import one_torch_thread

DEFAULT_K = 15  # LIFEBench guided settings use top-k 15 (LENVM.md §4.2)
K_MAX = 64
_RULES = {("equal", "strict"): EQUAL, ("equal", "band"): EQUAL_BAND, ("equal", "soft"): EQUAL_SOFT,
          ("at_most", "strict"): AT_MOST, ("at_most", "band"): AT_MOST_BAND,
          ("at_least", "strict"): AT_LEAST, ("at_least", "band"): AT_LEAST_BAND}  # (constraint, LengthTarget.rule)
# Rules whose rows never see EOS before their target: At Least by definition, and the tolerance band and the
# soft Equal To, whose text should end where the target says rather than wherever every continuation looks long
# (the paper's strict Equal To keeps EOS as a candidate at every step, value 0). For the soft rule this matters
# most: EOS (u = 0) below u* always keeps some tilted mass, so with EOS a candidate a row stops early at any step
# the policy likes EOS (with the oracle of tests/test_guided.py, a mean of 13 tokens for a target of 17).
EOS_BANNED_BEFORE_TARGET = frozenset({AT_LEAST, AT_LEAST_BAND, EQUAL_BAND, EQUAL_SOFT})
# The ending window (module docstring): EOS this likely under the policy ends a band row inside its window.
END_P = 1e-4


def ending_window(target: int) -> int:
    """W: tokens of the ending window for a target of T generated tokens (N = T - 1 response tokens)."""
    return max(int(BAND_ABS), math.ceil(BAND_REL * (target - 1)))


@dataclass(frozen=True)
class Guidance:
    """A row's guidance: a length rule with its target, or a tilt β."""

    rule: int
    target: int  # T: generated tokens including EOS (TILT: unused, 0)
    beta: float

    @staticmethod
    def of(length: LengthTarget | None, tilt: float | None) -> Guidance | None:
        if length is not None and tilt is not None:
            raise ValueError("pass either length=... or tilt=..., not both")
        if length is not None:
            if not isinstance(length, LengthTarget):
                raise ValueError(f"length must be a LengthTarget; got {type(length).__name__}")
            rule = _RULES[length.constraint, length.rule]
            return Guidance(rule, length.generated_target, 0.0)
        if tilt is not None:
            if isinstance(tilt, bool) or not isinstance(tilt, (int, float)) or not abs(tilt) < float("inf"):
                raise ValueError(f"tilt must be a finite number (β < 0 shortens, β > 0 lengthens); got {tilt!r}")
            return Guidance(TILT, 0, float(tilt))
        return None


def candidate_slots(sampling: Sampling) -> int:
    return min(sampling.top_k or DEFAULT_K, K_MAX)


@dataclass
class CandidateSettings:
    """Per-row filter settings as device tensors, built once per batch."""

    k: int  # slots per row (max over rows)
    inv_temperature: torch.Tensor  # [B, 1]
    top_k: torch.Tensor  # [B]
    top_p: torch.Tensor  # [B]
    min_p: torch.Tensor  # [B]
    eos_ids: torch.Tensor  # [E]
    unit_temperature: bool = False  # every row at temperature 1: the logits need no scaling

    @staticmethod
    def of(samplings: Sequence[Sampling], eos_ids: Sequence[int], device: torch.device) -> CandidateSettings:
        slots = [candidate_slots(s) for s in samplings]
        return CandidateSettings(
            k=max(slots),
            inv_temperature=torch.tensor([1.0 if s.greedy else 1.0 / s.temperature for s in samplings],
                                         device=device).view(-1, 1),
            top_k=torch.tensor(slots, device=device),
            top_p=torch.tensor([s.top_p for s in samplings], device=device),
            min_p=torch.tensor([s.min_p for s in samplings], device=device),
            eos_ids=torch.tensor(sorted(eos_ids), device=device, dtype=torch.long),
            unit_temperature=all(s.greedy or s.temperature == 1.0 for s in samplings),
        )


Step = int | Sequence[int] | torch.Tensor  # a 0-based step for all rows, or one per row


class EosRule:
    """Which guided rows must not, and which must, see EOS among their candidates at a step, and which are in their
    ending window or must end (module docstring)."""

    def __init__(self, guidances: Sequence[Guidance | None], device: torch.device) -> None:
        never = 2**62
        length_rows = [g is not None and g.rule != TILT for g in guidances]
        self.target = torch.tensor([g.target if on else never for g, on in zip(guidances, length_rows)],
                                   device=device)
        banning = [g is not None and g.rule in EOS_BANNED_BEFORE_TARGET for g in guidances]
        self.banning = torch.tensor(banning, device=device)
        self.any_length = any(length_rows)
        self.any_banning = any(banning)
        # before the first forced count no row is forced; from the last banning target on no row is banned
        self.first_force_count = min((g.target for g, on in zip(guidances, length_rows) if on), default=never)
        self.last_ban_count = max((g.target for g, on in zip(guidances, banning) if on), default=0)
        # [start, stop) of each row's ending window in generated tokens (t + 1), and the count that must end
        start, stop, end = [never] * len(guidances), [never] * len(guidances), [never] * len(guidances)
        for b, g in enumerate(guidances):
            if g is not None and g.rule == AT_MOST_BAND:
                start[b], stop[b] = g.target - ending_window(g.target), g.target
            elif g is not None and g.rule == AT_LEAST_BAND:
                start[b] = g.target
                stop[b] = end[b] = g.target + ending_window(g.target)
        self.any_window = any(x != never for x in start)
        self.first_window_count = min(start, default=never)  # before it no row is in a window or must end
        self.window_start = torch.tensor(start, device=device)
        self.window_stop = torch.tensor(stop, device=device)
        self.must_end_at = torch.tensor(end, device=device)

    def masks(self, step: Step) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(ban[B], force[B]) for the token drawn at 0-based `step` (one for all rows, or each row's), i.e. the
        (step + 1)-th generated. None for a mask no row can be in at that step (known on the host for int steps):
        the candidate builder then skips that work, with the same result as an all-False mask."""
        if not self.any_length:
            return None, None
        host = _host_counts(step)
        banning = self.any_banning and not (host is not None and host[0] >= self.last_ban_count)
        forcing = not (host is not None and host[1] < self.first_force_count)
        if not (banning or forcing):
            return None, None
        before = self._counts(step) < self.target
        return (self.banning & before) if banning else None, ~before if forcing else None

    def ending(self, step: Step) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(in_window[B], must_end[B]) for the token drawn at 0-based `step`; None when no row can be in its window
        (no band bound row, or int steps before every window: the candidate builder then skips the window)."""
        host = _host_counts(step)
        if not self.any_window or (host is not None and host[1] < self.first_window_count):
            return None
        count = self._counts(step)
        return (count >= self.window_start) & (count < self.window_stop), count >= self.must_end_at

    def _counts(self, step: Step) -> int | torch.Tensor:
        """Generated-token counts t + 1: an int for one host step, else a [B] tensor on the rule's device."""
        if isinstance(step, (list, tuple)):
            return torch.tensor(step, device=self.target.device) + 1
        return step + 1


def _host_counts(step: Step) -> tuple[int, int] | None:
    """(least, most) count t + 1 over the rows when the steps are host ints; None for a device tensor."""
    if isinstance(step, int):
        return step + 1, step + 1
    if isinstance(step, (list, tuple)) and step:
        return min(step) + 1, max(step) + 1
    return None


def build_candidates(logits: torch.Tensor, cfg: CandidateSettings, ban_eos: torch.Tensor | None,
                     force_eos: torch.Tensor | None = None,
                     ending: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits[B, V] fp32 -> (ids[B, K] int64, logp[B, K] fp32, filled[B, K] bool); `ending` from EosRule.ending.
    CPU: on one torch thread (torch_threads)."""
    with one_torch_thread(logits.device):
        return _candidates(logits, cfg, ban_eos, force_eos, ending)


def _candidates(logits: torch.Tensor, cfg: CandidateSettings, ban_eos: torch.Tensor | None,
                force_eos: torch.Tensor | None, ending: tuple[torch.Tensor, torch.Tensor] | None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if ban_eos is None and cfg.unit_temperature and logits.dtype == torch.float32:
        scaled = logits  # x * 1 is x, bit for bit
    else:
        scaled = logits * cfg.inv_temperature  # a fresh tensor: a ban writes its [B, E] EOS columns in place
    if ban_eos is not None:
        eos_columns = scaled.index_select(1, cfg.eos_ids)
        scaled.index_copy_(1, cfg.eos_ids, eos_columns.masked_fill(ban_eos.view(-1, 1), float("-inf")))
    full = torch.log_softmax(scaled, dim=-1)
    logp, ids = full.topk(cfg.k, dim=-1)  # sorted descending
    p = logp.exp()
    rank = torch.arange(cfg.k, device=logits.device).view(1, -1)
    filled = rank < cfg.top_k.view(-1, 1)
    filled &= ((p.cumsum(dim=-1) - p) <= cfg.top_p.view(-1, 1)) | (cfg.top_p.view(-1, 1) >= 1)  # sums can pass 1
    filled &= p >= cfg.min_p.view(-1, 1) * p[:, :1]
    filled[:, 0] = True
    ids = torch.where(filled, ids, ids[:, :1])
    logp = logp.masked_fill(~filled, float("-inf"))
    if force_eos is not None:
        eos = cfg.eos_ids[:1]  # [1]: the first EOS id stands for all
        has_eos = (filled & torch.isin(ids, cfg.eos_ids)).any(dim=-1)
        add = force_eos & ~has_eos & (cfg.k > 1)  # [B]; slot 0 (the most probable token) always stays
        rows = torch.arange(ids.shape[0], device=ids.device)
        slot = filled.sum(dim=-1).clamp(max=cfg.k - 1)  # the first empty slot, else the last one
        ids[rows, slot] = torch.where(add, eos, ids[rows, slot])
        logp[rows, slot] = torch.where(add, full[:, eos[0]], logp[rows, slot])
        filled[rows, slot] |= add
    if ending is not None:
        in_window, must_end = ending
        eos_logp = full[:, cfg.eos_ids]  # [B, E]
        likely = torch.logsumexp(eos_logp, dim=-1) >= math.log(END_P)
        end = must_end | (in_window & likely)  # [B]
        best = eos_logp.argmax(dim=-1)  # the most probable EOS id of each row
        end_id, end_logp = cfg.eos_ids[best], eos_logp.gather(1, best.view(-1, 1)).squeeze(1)
        ids = torch.where(end.view(-1, 1), end_id.view(-1, 1), ids)
        first = torch.zeros_like(filled)
        first[:, 0] = True
        filled = torch.where(end.view(-1, 1), first, filled)
        logp = torch.where(end.view(-1, 1), torch.where(first, end_logp.view(-1, 1), float("-inf")), logp)
    return ids, logp, filled
