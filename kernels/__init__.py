"""Triton kernels of lenvm_rt, shipped as `lenvm_rt.kernels`.

Imports only torch and, when installed, triton; importing never needs a GPU. `HAS_TRITON` tells whether
kernels can be launched.
"""

from ._compat import HAS_TRITON
from .fused_heads import FusedHeads, fused_heads
from .philox import philox_uniform
from .select import GuidanceState, select
from .value_head import value_head

__all__ = [
    "HAS_TRITON",
    "FusedHeads",
    "GuidanceState",
    "fused_heads",
    "philox_uniform",
    "select",
    "value_head",
]
