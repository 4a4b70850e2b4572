"""Shared fixtures: interpreter-mode Triton on CPU-only machines, kernel device, tolerance check.

TRITON_INTERPRET must be set before any kernel module is imported: `@triton.jit` reads it when it
decorates, so this module sets it at import when no GPU is visible.

Hypothesis runs derandomized by default, so a suite that passed once passes again on the same code;
HYPOTHESIS_PROFILE=explore draws fresh examples on every run (use it to hunt for new failures).
"""
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# torch.cuda.is_available() asks the driver (NVML) and creates no CUDA context.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _has_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.fixture
def kernel_device() -> str:
    """"cuda" with compiled Triton, "cpu" under the Triton interpreter, else skip."""
    from lenvm_rt.kernels import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if _has_cuda():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("needs CUDA or TRITON_INTERPRET=1")
