"""The step controller behind guided decoding: one call per step for all guided rows.

    selector = make_selector(guidances, samplings, seeds, max_new_tokens, gamma, eos_ids)
    slot, token = selector.step(cand_ids[G, K], cand_logp[G, K], cand_z[G, K])   # G guided rows

Rows keep their state (tokens so far, RNG counter) inside the selector. `ReferenceSelector` runs
the plain-Python rules of `select_ref` row by row: the specification, and the fallback.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import _native
from .config import Sampling
from .guidance import Guidance
from .select_ref import GUIDANCE_STREAM, RowState, select_row


class ReferenceSelector:
    def __init__(self, guidances: Sequence[Guidance], samplings: Sequence[Sampling], seeds: np.ndarray,
                 max_new_tokens: int, gamma: float, eos_ids: frozenset[int]) -> None:
        self.rows = [RowState(rule=g.rule, target=g.target, generated=0, max_new=max_new_tokens, gamma=gamma,
                              beta=g.beta, seed=int(seed), greedy=s.greedy)
                     for g, s, seed in zip(guidances, samplings, seeds)]
        self.eos = sorted(eos_ids)
        self.seeds = np.asarray(seeds, dtype=np.uint64)

    def step(self, cand_ids: torch.Tensor, cand_logp: torch.Tensor, cand_z: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.where(torch.isfinite(cand_logp), cand_ids, -1).to(torch.int32).cpu().numpy()
        logp, z = cand_logp.float().cpu().numpy(), cand_z.float().cpu().numpy()
        offsets = np.array([r.generated for r in self.rows], dtype=np.uint32)
        uniform = _native.philox_uniform(self.seeds, offsets, GUIDANCE_STREAM)
        slots, tokens = [], []
        for b, row in enumerate(self.rows):
            choice = select_row(ids[b], logp[b], z[b], row, self.eos, float(uniform[b]))
            row.generated += 1
            slots.append(choice.slot)
            tokens.append(choice.token)
        dev = cand_ids.device
        return torch.tensor(slots, device=dev), torch.tensor(tokens, device=dev)


def make_selector(guidances: Sequence[Guidance], samplings: Sequence[Sampling], seeds: np.ndarray,
                  max_new_tokens: int, gamma: float, eos_ids: frozenset[int]) -> ReferenceSelector:
    return ReferenceSelector(guidances, samplings, seeds, max_new_tokens, gamma, eos_ids)
