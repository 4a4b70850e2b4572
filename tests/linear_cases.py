"""Shared pieces of the CPU linear-kernel tests: seeded inputs and the thread-count guard."""
from __future__ import annotations

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
