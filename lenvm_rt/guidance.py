"""Candidate sets and per-row guidance settings for length-guided decoding (LENVM.md §4.1–§4.2).

Shapes: B rows, V vocabulary, K candidate slots, E EOS ids.

    ban, force = EosRule(guidances, device).masks(step)               # bool[B] each, or None
    cands = build_candidates(logits[B, V], settings, ban, force)      # ids/logp[B, K], filled[B, K]

Candidates per row: softmax(logits / temperature) (temperature 1 for greedy rows), the K most
probable tokens sorted descending (K is the row's top_k, capped at K_MAX; DEFAULT_K when top_k is
off), then top-p on the exclusive prefix mass of full-vocabulary probabilities, then min-p against
the row's most probable token. Slot 0 always survives. Unfilled slots repeat slot 0's id (so the
lookahead has a real token to run) and carry logp = -inf.

EOS (EosRule): rows in `ban_eos` (At Least by either rule, and the quality-preserving Equal-To rules, before
their target) never see an EOS candidate; rows in
`force_eos` (any length rule from its target on) always do: when the filters dropped EOS, it takes the
first empty slot (else the last one) with its own log-probability, so a row can end where its target says even when the
policy ranks EOS below its top-k (EOS reachability).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import LengthTarget, Sampling
from .select_ref import AT_LEAST, AT_LEAST_BAND, AT_MOST, AT_MOST_BAND, EQUAL, EQUAL_BAND, EQUAL_SOFT, TILT

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
        )


class EosRule:
    """Which guided rows must not, and which must, see EOS among their candidates at a step."""

    def __init__(self, guidances: Sequence[Guidance | None], device: torch.device) -> None:
        never = 2**62
        length_rows = [g is not None and g.rule != TILT for g in guidances]
        self.target = torch.tensor([g.target if on else never for g, on in zip(guidances, length_rows)],
                                   device=device)
        banning = [g is not None and g.rule in EOS_BANNED_BEFORE_TARGET for g in guidances]
        self.banning = torch.tensor(banning, device=device)
        self.any_length = any(length_rows)
        self.any_banning = any(banning)

    def masks(self, step: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(ban[B], force[B]) for the token drawn at 0-based `step`, i.e. the (step + 1)-th generated."""
        if not self.any_length:
            return None, None
        before = step + 1 < self.target
        return (self.banning & before) if self.any_banning else None, ~before


def build_candidates(logits: torch.Tensor, cfg: CandidateSettings, ban_eos: torch.Tensor | None,
                     force_eos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits[B, V] fp32 -> (ids[B, K] int64, logp[B, K] fp32, filled[B, K] bool)."""
    scaled = logits * cfg.inv_temperature
    if ban_eos is not None:
        banned = torch.zeros_like(scaled, dtype=torch.bool)
        banned[:, cfg.eos_ids] = True
        scaled = scaled.masked_fill(banned & ban_eos.view(-1, 1), float("-inf"))
    full = torch.log_softmax(scaled, dim=-1)
    logp, ids = full.topk(cfg.k, dim=-1)  # sorted descending
    p = logp.exp()
    rank = torch.arange(cfg.k, device=logits.device).view(1, -1)
    filled = rank < cfg.top_k.view(-1, 1)
    filled &= (p.cumsum(dim=-1) - p) <= cfg.top_p.view(-1, 1)
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
    return ids, logp, filled
