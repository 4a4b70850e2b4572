"""Typed facade over the C++ core `lenvm_rt._core`; the only module that imports it.

Contract:
    philox_uniform(seeds: uint64[B], offsets: uint32[B], stream=0, out: float32[B] | None) -> float32[B]
    Per-row Philox4x32-10 uniforms in [0, 1), bit-identical to `lenvm_rt.kernels.philox_uniform`.
Arrays must be 1-D, C-contiguous numpy arrays of exactly the stated dtype (no silent conversion); a
mismatch raises ValueError naming the argument.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from . import _core


def _require_array(value: object, name: str, dtype: type[np.generic], ndim: int = 1) -> np.ndarray:
    """Return `value` if it is a C-contiguous numpy array of `dtype` (native byte order) and rank `ndim`."""
    expected = np.dtype(dtype)
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name}: expected a numpy {expected} array, got {type(value).__name__}")
    if value.dtype != expected or value.ndim != ndim or not value.flags.c_contiguous:
        layout = "C-contiguous" if value.flags.c_contiguous else "non-contiguous"
        raise ValueError(
            f"{name}: expected a C-contiguous {ndim}-D {expected} array, "
            f"got a {layout} {value.ndim}-D {value.dtype} array"
        )
    return value


def philox_uniform(
    seeds: npt.NDArray[np.uint64],
    offsets: npt.NDArray[np.uint32],
    stream: int = 0,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Uniforms in [0, 1): key = seeds[i], counter = (offsets[i], stream, 0, 0); written to `out` if given."""
    seeds = _require_array(seeds, "seeds", np.uint64)
    offsets = _require_array(offsets, "offsets", np.uint32)
    if out is None:
        out = np.empty(seeds.shape, dtype=np.float32)
    out = _require_array(out, "out", np.float32)
    _core.philox_uniform(seeds, offsets, stream, out)
    return out
