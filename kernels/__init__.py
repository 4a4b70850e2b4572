"""Triton kernels of lenvm_rt, shipped as `lenvm_rt.kernels`.

Imports only torch and, when installed, triton; importing never needs a GPU. `HAS_TRITON` tells whether
kernels can be launched.
"""

from ._compat import HAS_TRITON
from .philox import philox_uniform

__all__ = ["HAS_TRITON", "philox_uniform"]
