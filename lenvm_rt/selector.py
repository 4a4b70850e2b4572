"""The step controller behind guided decoding: one call per step for all guided rows.

    selector = make_selector(guidances, samplings, seeds, max_new_tokens, gamma, eos_ids, device)
    slot, token = selector.step(cand_ids[G, K], cand_logp[G, K], cand_z[G, K])   # G guided rows
    # or in two halves, the first before the values exist (the decode loop prepares during the lookahead's setup):
    slot, token = selector.choose(selector.prepare(cand_ids, cand_logp), cand_z)

Rows keep their state (tokens so far, RNG counter) inside the selector. Three implementations make
the same choices on the same inputs (the rules of `select_ref`):
  NativeSelector     the C++ core's GuidanceBatch: CPU tensors, one call per step, GIL released
  KernelSelector     the Triton `select` kernel: device tensors, no host sync in the step
  ReferenceSelector  plain Python, row by row: the specification, used by tests
Empty candidate slots arrive with logp = -inf and are passed on as id -1. slot and token come back as integer
tensors (int32 from the native controller, int64 otherwise); slot -1 marks an EOS forced outside the candidates.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from . import _native
from .config import Sampling
from .guidance import Guidance
from .select_ref import GUIDANCE_STREAM, RowState, select_row


class Selector(Protocol):
    def prepare(self, cand_ids: torch.Tensor, cand_logp: torch.Tensor) -> Any: ...

    def choose(self, prepared: Any, cand_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step(self, cand_ids: torch.Tensor, cand_logp: torch.Tensor, cand_z: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]: ...


class _TwoHalves:
    """step() as prepare() then choose()."""

    def step(self, cand_ids: torch.Tensor, cand_logp: torch.Tensor, cand_z: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.choose(self.prepare(cand_ids, cand_logp), cand_z)


def _marked(cand_ids: torch.Tensor, cand_logp: torch.Tensor) -> torch.Tensor:
    """Candidate ids with empty slots (logp = -inf) set to -1, int32."""
    return torch.where(torch.isfinite(cand_logp), cand_ids, -1).to(torch.int32)


class NativeSelector(_TwoHalves):
    def __init__(self, guidances: Sequence[Guidance], samplings: Sequence[Sampling], seeds: np.ndarray,
                 max_new_tokens: int, gamma: float, eos_ids: frozenset[int]) -> None:
        G = len(guidances)
        self.batch = _native.GuidanceBatch(G, sorted(eos_ids))
        for i, (g, s, seed) in enumerate(zip(guidances, samplings, seeds)):
            self.batch.admit(i, rule=g.rule, target=g.target, max_new=max_new_tokens, gamma=gamma, beta=g.beta,
                             seed=int(seed), greedy=s.greedy)
        self.rows = np.arange(G, dtype=np.int32)
        self.out_slot = np.empty(G, dtype=np.int32)
        self.out_token = np.empty(G, dtype=np.int32)
        self.out_done = np.empty(G, dtype=np.uint8)

    def prepare(self, cand_ids: torch.Tensor, cand_logp: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        # numpy views and numpy ops: on [G, K] arrays a torch op costs more than the native step itself
        logp = np.ascontiguousarray(cand_logp.numpy(), dtype=np.float32)
        return np.where(np.isfinite(logp), cand_ids.numpy(), -1).astype(np.int32), logp

    def choose(self, prepared: tuple[np.ndarray, np.ndarray], cand_z: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, logp = prepared
        z = np.ascontiguousarray(cand_z.numpy(), dtype=np.float32)
        self.batch.step(self.rows, ids, logp, z, self.out_slot, self.out_token, self.out_done)
        return torch.from_numpy(self.out_slot.copy()), torch.from_numpy(self.out_token.copy())  # int32


class KernelSelector(_TwoHalves):
    def __init__(self, guidances: Sequence[Guidance], samplings: Sequence[Sampling], seeds: np.ndarray,
                 max_new_tokens: int, gamma: float, eos_ids: frozenset[int], device: torch.device) -> None:
        from .kernels import GuidanceState

        G = len(guidances)
        self.state = GuidanceState.create(G, device)
        for i, (g, s, seed) in enumerate(zip(guidances, samplings, seeds)):
            self.state.admit(i, rule=g.rule, target=g.target, max_new=max_new_tokens, gamma=gamma, beta=g.beta,
                             seed=int(seed), greedy=s.greedy)
        self.rows = torch.arange(G, dtype=torch.int32, device=device)
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.int32, device=device)

    def prepare(self, cand_ids: torch.Tensor, cand_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _marked(cand_ids, cand_logp), cand_logp.float().contiguous()

    def choose(self, prepared: tuple[torch.Tensor, torch.Tensor], cand_z: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        from .kernels import select

        ids, logp = prepared
        slot, token, _ = select(self.rows, ids, logp, cand_z.float().contiguous(), self.state, self.eos,
                                backend="triton")
        return slot.long(), token.long()


class ReferenceSelector(_TwoHalves):
    def __init__(self, guidances: Sequence[Guidance], samplings: Sequence[Sampling], seeds: np.ndarray,
                 max_new_tokens: int, gamma: float, eos_ids: frozenset[int]) -> None:
        self.rows = [RowState(rule=g.rule, target=g.target, generated=0, max_new=max_new_tokens, gamma=gamma,
                              beta=g.beta, seed=int(seed), greedy=s.greedy)
                     for g, s, seed in zip(guidances, samplings, seeds)]
        self.eos = sorted(eos_ids)
        self.seeds = np.asarray(seeds, dtype=np.uint64)

    def prepare(self, cand_ids: torch.Tensor, cand_logp: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.device]:
        return _marked(cand_ids, cand_logp).cpu().numpy(), cand_logp.float().cpu().numpy(), cand_ids.device

    def choose(self, prepared: tuple[np.ndarray, np.ndarray, torch.device], cand_z: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, logp, dev = prepared
        z = cand_z.float().cpu().numpy()
        offsets = np.array([r.generated for r in self.rows], dtype=np.uint32)
        uniform = _native.philox_uniform(self.seeds, offsets, GUIDANCE_STREAM)
        slots, tokens = [], []
        for b, row in enumerate(self.rows):
            choice = select_row(ids[b], logp[b], z[b], row, self.eos, float(uniform[b]))
            row.generated += 1
            slots.append(choice.slot)
            tokens.append(choice.token)
        return torch.tensor(slots, device=dev), torch.tensor(tokens, device=dev)


def make_selector(guidances: Sequence[Guidance], samplings: Sequence[Sampling], seeds: np.ndarray,
                  max_new_tokens: int, gamma: float, eos_ids: frozenset[int],
                  device: torch.device) -> Selector:
    """The C++ controller for CPU tensors, the Triton kernel for CUDA tensors."""
    if device.type == "cuda":
        return KernelSelector(guidances, samplings, seeds, max_new_tokens, gamma, eos_ids, device)
    return NativeSelector(guidances, samplings, seeds, max_new_tokens, gamma, eos_ids)
