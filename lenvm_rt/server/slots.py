"""Slot-level pieces of the continuous batch: the step controller with one slot per engine row, and KV rows
that keep their contents when the cache grows or a row moves.

    guide = SlotGuide(capacity, eos_ids, device); slot = guide.admit(guidance, sampling, max_new, gamma)
    slot, token = guide.step(slots, cand[G, K], logp[G, K], z[G, K]);  guide.retire(slot)
    grow_cache(model, batch, capacity)      # allocate() that keeps the rows already cached
    move_row(model, src, dst, length)       # copy a row's first `length` cache positions into another row
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _native
from ..config import Sampling
from ..guidance import Guidance
from ..model import CausalLM
from ..selector import _marked


class SlotGuide:
    """The step controller with one slot per engine row: C++ core on the CPU, the Triton kernel on CUDA."""

    def __init__(self, capacity: int, eos_ids: frozenset[int], device: torch.device) -> None:
        self.device = device
        self.free = list(range(capacity - 1, -1, -1))
        if device.type == "cuda":
            from ..kernels import GuidanceState

            self.state = GuidanceState.create(capacity, device)
            self.eos = torch.tensor(sorted(eos_ids), dtype=torch.int32, device=device)
        else:
            self.batch = _native.GuidanceBatch(capacity, sorted(eos_ids))

    def admit(self, g: Guidance, sampling: Sampling, max_new: int, gamma: float) -> int:
        slot = self.free.pop()
        admit = self.state.admit if self.device.type == "cuda" else self.batch.admit
        admit(slot, rule=g.rule, target=g.target, max_new=max_new, gamma=gamma, beta=g.beta,
              seed=int(sampling.seed), greedy=sampling.greedy)
        return slot

    def retire(self, slot: int) -> None:
        if self.device.type != "cuda":
            self.batch.retire(slot)
        self.free.append(slot)

    def step(self, slots: list[int], cand: torch.Tensor, logp: torch.Tensor, z: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            from ..kernels import select

            rows = torch.tensor(slots, dtype=torch.int32, device=self.device)
            slot, token, _ = select(rows, _marked(cand, logp), logp.float().contiguous(), z.float().contiguous(),
                                    self.state, self.eos, backend="triton")
            return slot.long(), token.long()
        G = len(slots)
        out_slot, out_token = np.empty(G, dtype=np.int32), np.empty(G, dtype=np.int32)
        self.batch.step(np.array(slots, dtype=np.int32), _marked(cand, logp).numpy(),
                        logp.to(torch.float32).contiguous().numpy(), z.to(torch.float32).contiguous().numpy(),
                        out_slot, out_token, np.empty(G, dtype=np.uint8))
        return torch.from_numpy(out_slot.astype(np.int64)), torch.from_numpy(out_token.astype(np.int64))


def grow_cache(model: CausalLM, batch: int, capacity: int) -> None:
    """allocate() that keeps the rows already in the cache (allocate itself starts from zeros)."""
    if batch <= model.batch_capacity and capacity <= model.capacity:
        return
    old_k, old_v, ob, oc = model.k_cache, model.v_cache, model.batch_capacity, model.capacity
    model.allocate(batch=batch, capacity=capacity)
    for i in range(len(old_k)):
        model.k_cache[i][:ob, :, :oc] = old_k[i]
        model.v_cache[i][:ob, :, :oc] = old_v[i]


def move_row(model: CausalLM, src: int, dst: int, length: int) -> None:
    for k, v in zip(model.k_cache, model.v_cache):
        k[dst, :, :length] = k[src, :, :length]
        v[dst, :, :length] = v[src, :, :length]
