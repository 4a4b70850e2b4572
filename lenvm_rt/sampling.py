"""Next-token choice for a batch of rows, each with its own Sampling settings.

    chooser = TokenChooser(samplings)                # once per batch; seeds resolved here
    next_ids = chooser(logits[B, V] fp32, offsets)   # offsets[b] = index of the token being drawn

Greedy rows take the argmax. Sampled rows apply temperature, then top-k, top-p (exclusive prefix
mass of full-vocabulary probabilities <= top_p; 1 filters nothing) and min-p (p >= min_p * p_max), then draw by
inverse CDF in vocabulary order with one uniform from the counter-based Philox generator of the C++
core keyed by (seed, offset). A row's draw depends only on its own logits, seed and offset, never
on the batch it shares, so a seeded request is reproducible wherever it runs.

On the CPU a sampled row's choice runs on one torch thread (torch_threads.one_torch_thread), and when every
sampled row's filters keep only tokens among its few most probable (TokenChooser.head: k_max + 1 under top-k
alone, else TOP_P_HEAD), the filters and the draw run on that head instead of the whole vocabulary: the same keep
set, and the same draw, since the vocabulary-order running sum adds exact zeros for the tokens the filters drop.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import torch

from . import _native
from .config import Sampling
from .torch_threads import one_torch_thread

TOP_P_HEAD = 256  # tokens a CPU top-p filter (top_p_mask) and draw look at before taking a whole row


def resolve_seed(sampling: Sampling) -> int:
    return sampling.seed if sampling.seed is not None else secrets.randbits(63)


def filter_mask(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                *, k_max: int, use_top_p: bool) -> torch.Tensor:
    """Boolean keep-mask [B, V] for probs[B, V] under per-row top_k[B] (0: off), top_p[B], min_p[B].

    k_max = max(top_k) and use_top_p = any(top_p < 1) are passed from the host so that the filter
    never reads a device value. The most probable token always survives; ties at the top-k
    boundary are all kept.
    """
    p_max = probs.max(dim=-1, keepdim=True).values  # [B, 1]
    keep = probs >= min_p.view(-1, 1) * p_max
    if k_max > 0:
        kth = probs.topk(min(k_max, probs.shape[-1]), dim=-1).values  # [B, k_max], descending
        index = (top_k.clamp(min=1, max=kth.shape[-1]) - 1).view(-1, 1)
        threshold = torch.where(top_k.view(-1, 1) > 0, kth.gather(1, index), torch.zeros_like(p_max))
        keep &= probs >= threshold
    if use_top_p:
        keep &= top_p_mask(probs, top_p)
    return keep | (probs >= p_max)


def top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep-mask [B, V]: a token stays when the mass of the tokens sorted before it is <= top_p[b]; top_p >= 1 keeps
    the whole row (a float32 running sum can pass 1 before its tail).

    On the CPU the TOP_P_HEAD most probable tokens come first (a partial top-k, ~20x cheaper than sorting the
    vocabulary): when the mass before the last of them already passes every top-p row's limit, nothing beyond can
    stay, and the prefix sums are those of the full sort (a running sum reads only what precedes it). Otherwise, and
    on other devices (where the check would be a host sync), the rows are sorted whole.
    """
    limit = top_p.view(-1, 1)
    whole_row = limit >= 1
    if probs.device.type == "cpu" and probs.shape[-1] > TOP_P_HEAD:
        head_p, head = probs.topk(TOP_P_HEAD, dim=-1)  # descending
        exclusive = head_p.cumsum(dim=-1) - head_p  # mass strictly before each rank
        if bool((whole_row | (exclusive[:, -1:] > limit)).all()):
            return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, head, exclusive <= limit) | whole_row
    sorted_p, order = probs.sort(dim=-1, descending=True)
    exclusive = sorted_p.cumsum(dim=-1) - sorted_p
    return torch.empty_like(probs, dtype=torch.bool).scatter_(1, order, exclusive <= limit) | whole_row


class TokenChooser:
    """Chooses one token per row; settings, seeds and scratch buffers are fixed per batch."""

    def __init__(self, samplings: Sequence[Sampling], device: torch.device) -> None:
        self.samplings = list(samplings)
        B = len(self.samplings)
        self.greedy = [s.greedy for s in self.samplings]
        self.all_greedy = all(self.greedy)
        self.seeds = np.array([resolve_seed(s) for s in self.samplings], dtype=np.uint64)
        self._uniform = np.empty(B, dtype=np.float32)
        self._offsets = np.empty(B, dtype=np.uint32)
        sampled = [s for s in self.samplings if not s.greedy] or [Sampling()]
        self._k_max = max(s.top_k or 0 for s in sampled)
        self._use_top_p = any(s.top_p < 1 for s in sampled)
        self._needs_filter = self._k_max > 0 or self._use_top_p or any(s.min_p > 0 for s in sampled)
        temps = [s.temperature if not s.greedy else 1.0 for s in self.samplings]
        self.inv_temperature = torch.tensor([1.0 / t for t in temps], device=device).view(B, 1)
        self._unit_temperature = all(t == 1.0 for t in temps)
        self.top_k = torch.tensor([s.top_k or 0 for s in self.samplings], device=device)
        self.top_p = torch.tensor([s.top_p for s in self.samplings], device=device)
        self.min_p = torch.tensor([s.min_p for s in self.samplings], device=device)
        self.greedy_rows = torch.tensor(self.greedy, device=device)
        top_k_alone = not self._use_top_p and all(0 < (s.top_k or 0) < TOP_P_HEAD for s in sampled)
        self.head = self._k_max + 1 if top_k_alone else TOP_P_HEAD  # tokens a CPU draw tries first

    def __call__(self, logits: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
        """logits[B, V] fp32 -> token ids[B] int64."""
        if self.all_greedy:
            return logits.argmax(dim=-1)
        with one_torch_thread(logits.device):
            return self._draw(logits, offsets)

    def _draw(self, logits: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
        argmax = logits.argmax(dim=-1)
        unscaled = self._unit_temperature and logits.dtype == torch.float32  # x * 1 is x, bit for bit
        probs = torch.softmax(logits if unscaled else logits * self.inv_temperature, dim=-1)
        self._offsets[:] = offsets
        _native.philox_uniform(self.seeds, self._offsets, 0, self._uniform)
        uniform = torch.from_numpy(self._uniform).to(probs.device).view(-1, 1)
        drawn = None
        if self._needs_filter and probs.device.type == "cpu" and self._k_max < self.head < probs.shape[-1]:
            drawn = self._draw_from_head(probs, uniform)
        if drawn is None:
            drawn = self._draw_from_row(probs, uniform)
        return torch.where(self.greedy_rows, argmax, drawn)

    def _draw_from_row(self, probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF draw over the whole (filtered) row, in vocabulary order."""
        if self._needs_filter:
            keep = filter_mask(probs, self.top_k, self.top_p, self.min_p, k_max=self._k_max,
                               use_top_p=self._use_top_p)
            probs = probs * keep
        cdf = probs.cumsum(dim=-1)  # [B, V], vocabulary order
        return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).view(-1).clamp_(max=probs.shape[-1] - 1)

    def _draw_from_head(self, probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor | None:
        """The same draw from each row's `head` most probable tokens, or None when a sampled row's filters keep the
        last of them (its keep set may reach beyond)."""
        head_p, head = probs.topk(self.head, dim=-1)  # descending
        keep = filter_mask(head_p, self.top_k, self.top_p, self.min_p, k_max=self._k_max, use_top_p=self._use_top_p)
        if bool((keep[:, -1] & ~self.greedy_rows).any()):
            return None
        order = head.argsort(dim=-1)  # vocabulary order within the head
        cdf = (head_p * keep).gather(1, order).cumsum(dim=-1)  # the row's running sum at its kept tokens
        slot = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=self.head - 1)
        return head.gather(1, order).gather(1, slot).view(-1)
