"""Per-row Philox4x32-10 uniforms on the GPU, bit-identical to the C++ core (`lenvm_rt._core`).

Contract:
    philox_uniform(seeds: int64|uint64[B], offsets: int32[B], stream: int, backend="auto") -> float32[B]
    out[i] = uniform from key = seeds[i] (low word, high word), counter = (offsets[i], stream, 0, 0):
    the first Philox output word mapped to [0, 1) by `tl.uint_to_uniform_float`, as `tl.rand` does.
    int64 seeds and int32 offsets are read as their unsigned bit patterns; stream lies in [0, 2**32).
    Inputs are 1-D, contiguous, of equal length and on one device; the result is on that device.
    Backends: "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1); "auto" picks "triton" where it can
    run and raises RuntimeError otherwise (CPU callers use the C++ core through numpy).
"""

from __future__ import annotations

import os

import torch

from ._compat import HAS_TRITON, tl, triton

_BLOCK = 1024
_BACKENDS = ("auto", "triton")


@triton.jit
def _philox_uniform_kernel(seeds_ptr, offsets_ptr, out_ptr, n, stream, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    seed = tl.load(seeds_ptr + idx, mask=mask, other=0).to(tl.uint64, bitcast=True)
    offset = tl.load(offsets_ptr + idx, mask=mask, other=0).to(tl.uint32, bitcast=True)
    zero = tl.zeros_like(offset)
    word, _, _, _ = tl.philox(seed, offset, tl.full([BLOCK], stream, tl.uint32), zero, zero)
    tl.store(out_ptr + idx, tl.uint_to_uniform_float(word), mask=mask)


def _philox_uniform_triton(seeds: torch.Tensor, offsets: torch.Tensor, stream: int) -> torch.Tensor:
    out = torch.empty(seeds.shape, dtype=torch.float32, device=seeds.device)
    n = seeds.numel()
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        _philox_uniform_kernel[grid](seeds.view(torch.int64), offsets, out, n, stream, BLOCK=_BLOCK)
    return out


def _check_inputs(seeds: torch.Tensor, offsets: torch.Tensor, stream: int) -> None:
    if seeds.dtype not in (torch.int64, torch.uint64) or seeds.dim() != 1 or not seeds.is_contiguous():
        raise ValueError(f"seeds: expected a contiguous 1-D int64 or uint64 tensor, got {_describe(seeds)}")
    if offsets.dtype != torch.int32 or offsets.dim() != 1 or not offsets.is_contiguous():
        raise ValueError(f"offsets: expected a contiguous 1-D int32 tensor, got {_describe(offsets)}")
    if offsets.shape != seeds.shape or offsets.device != seeds.device:
        raise ValueError(
            f"offsets: expected shape {tuple(seeds.shape)} on {seeds.device}, got {_describe(offsets)}"
        )
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 2**32:
        raise ValueError(f"stream: expected an integer in [0, 2**32), got {stream!r}")


def _describe(t: torch.Tensor) -> str:
    layout = "contiguous" if t.is_contiguous() else "non-contiguous"
    return f"{layout} {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def _triton_can_run(device: torch.device) -> bool:
    return HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def philox_uniform(
    seeds: torch.Tensor, offsets: torch.Tensor, stream: int = 0, backend: str = "auto"
) -> torch.Tensor:
    """Return float32[B] uniforms in [0, 1): Philox4x32-10 keyed by seeds[i], counter (offsets[i], stream)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    _check_inputs(seeds, offsets, stream)
    if not _triton_can_run(seeds.device):
        raise RuntimeError(
            f"philox_uniform: the triton backend cannot run on {seeds.device} "
            f"(HAS_TRITON={HAS_TRITON}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})"
        )
    return _philox_uniform_triton(seeds, offsets, stream)
