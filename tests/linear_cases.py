"""Shared pieces of the CPU linear-kernel tests: seeded inputs, the thread-count guard and the panel kernels'
sequential contract rebuilt in numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lenvm_rt import cpu_ops


@pytest.fixture(autouse=True)
def restore_threads():
    before = cpu_ops.get_num_threads()
    yield
    cpu_ops.set_num_threads(before)


def make(m: int, n: int, k: int, seed: int = 0, bias: bool = True):
    """x [m, k], w [n, k] scaled by 1 / sqrt(k), b [n] (or None), all from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / max(k, 1) ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


def sequential_sums(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, fused: bool) -> np.ndarray:
    """The contract's per-element sequence in numpy. A fused step is acc + x w computed exactly (the float64
    product of two floats is exact) and rounded once to float32; the portable step rounds the product first."""
    xs, ws = x.numpy(), w.numpy()
    acc = np.zeros((xs.shape[0], ws.shape[0]), dtype=np.float32)
    for kk in range(xs.shape[1]):
        product = np.outer(xs[:, kk].astype(np.float64), ws[:, kk].astype(np.float64))
        if fused:
            acc = (acc.astype(np.float64) + product).astype(np.float32)
        else:
            acc = acc + product.astype(np.float32)
    return acc if b is None else acc + b.numpy()
