"""LenVM value head on pre-final-norm hidden states: final RMSNorm + fc + SiLU + summary + sigmoid, one launch.

Math:     hn[r] = (h[r] * rsqrt(mean(h[r]^2) + eps)).to(dtype) * norm_weight   (norm in fp32, as transformers does)
          z[r]  = w2 . silu(W1 @ hn[r] + b1) + b2,   u[r] = sigmoid(z[r])       (fp32 from the matmul on)
Shapes:   h[R, D] model dtype (fp32 / bf16 / fp16), norm_weight[D], W1[D, D] (row n = output n), b1[D],
          w2[D] or [1, D] (checkpoint layout), b2[1] or [], all in h's dtype  ->  z[R], u[R] fp32.
Launch:   ONE Triton launch, grid = cdiv(R, BLOCK_R). A program owns BLOCK_R rows: it computes their rstd,
          then walks W1 in [BLOCK_N, D] slabs, accumulating hn @ W1^T in fp32 (tl.dot), and folds each slab
          through b1, SiLU and w2 into z before the next, so the [R, D] activation never reaches memory.
Traffic:  W1 (2*D*D bytes in bf16; 4.7 MB at D = 1536) is read once per program, i.e. cdiv(R, BLOCK_R) times,
          all but the first from L2 when W1 fits there; h is read (1 + cdiv(D, BLOCK_N)) times per program,
          from L2 after the first; 8*R bytes are written. Memory-bound: report GB/s against 2*D*D + 2*R*D.
          For decode-sized R (a few tiles) the grid occupies only a few SMs; `fused_heads` splits W1 over
          programs instead, because it can finish the reduction in its merge launch.
Interp.:  Triton's interpreter keeps bf16 as raw uint16 and truncates fp32 -> bf16, so all in-kernel arithmetic is
          fp32 on values rounded to the model dtype (`_round_to`), and under the interpreter tl.dot multiplies fp32
          copies (DOT_UPCAST, exact for bf16/fp16 products): both paths differ only in accumulation order.
Contract: no host sync (no .item() / .tolist() / bool(tensor)); only tensor metadata is checked; no device
          query at import; both backends return the same shapes, dtypes and semantics. fp32 inputs use
          tl.dot(input_precision="ieee"): the head's output feeds a sigmoid and a length inverse, and TF32's
          10-bit mantissa would cost more accuracy than fp32 callers expect.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._compat import HAS_TRITON, tl, triton

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def value_head_ref(
    h: torch.Tensor,  # [R, D] model dtype
    norm_weight: torch.Tensor,  # [D]
    w1: torch.Tensor,  # [D, D]
    b1: torch.Tensor,  # [D]
    w2: torch.Tensor,  # [D] or [1, D]
    b2: torch.Tensor,  # [1] or []
    *,
    eps: float,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readable torch version: the test oracle and the CPU path. Returns (z, u), both fp32 [R].

    upcast=True runs the head in fp32 on the model-dtype normed rows; upcast=False runs it in h's dtype
    (the "same-dtype torch" baseline of the tolerance rule). The norm is identical in both.
    """
    hn = rms_norm_ref(h, norm_weight, eps=eps)  # [R, D] model dtype
    dtype = torch.float32 if upcast else h.dtype
    act = F.silu(F.linear(hn.to(dtype), w1.to(dtype), b1.to(dtype)))  # [R, D]
    z = (act @ w2.reshape(-1).to(dtype) + b2.reshape(()).to(dtype)).float()  # [R]
    return z, torch.sigmoid(z)


def rms_norm_ref(h: torch.Tensor, norm_weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Final RMSNorm as transformers computes it: fp32 statistics, cast back to h's dtype, then * weight."""
    return F.rms_norm(h.float(), (h.shape[-1],), eps=eps).to(h.dtype) * norm_weight


def autotune(configs: Callable[[], list], key: list[str]) -> Callable:
    """`triton.autotune` over configs(), or no decorator without Triton (`_compat` placeholders are not callable)."""
    if not HAS_TRITON:
        return lambda fn: fn
    return triton.autotune(configs=configs(), key=key)


def _configs() -> list:
    """Runs at import: may read the interpreter flag, must not touch the device."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # One config: autotune then never benchmarks. BLOCK_K < 96 so the test shapes take the K loop and its mask.
        return [triton.Config({"BLOCK_R": 16, "BLOCK_N": 64, "BLOCK_K": 64, "DOT_UPCAST": True}, num_warps=4)]
    # Candidates, not yet timed (no GPU was available when this was written); the autotuner picks among them in
    # Runtime.warmup(). Each compiles for sm_90 (Triton 3.7, bf16) without register spills per
    # `cuobjdump -res-usage`; BLOCK_R = 64, BLOCK_N = 64 at 4 warps spilled.
    return [
        triton.Config({"BLOCK_R": 16, "BLOCK_N": 64, "BLOCK_K": 64, "DOT_UPCAST": False}, num_warps=4),
        triton.Config({"BLOCK_R": 16, "BLOCK_N": 128, "BLOCK_K": 64, "DOT_UPCAST": False}, num_warps=8),
        triton.Config({"BLOCK_R": 64, "BLOCK_N": 64, "BLOCK_K": 64, "DOT_UPCAST": False}, num_warps=8),
        triton.Config({"BLOCK_R": 64, "BLOCK_N": 128, "BLOCK_K": 32, "DOT_UPCAST": False}, num_warps=8),
    ]


@triton.jit
def _dot(a, b, acc, DOT_UPCAST: tl.constexpr):
    """acc + a @ b in fp32. a is fp32 holding model-dtype values (see `_round_to`), b is in the model dtype.

    fp32 models use exact (IEEE) products, see the header. DOT_UPCAST (the interpreter) multiplies fp32 copies:
    the interpreter stores bf16 as raw uint16 and its dot would multiply the integers. Products of bf16/fp16
    values are exact in fp32, so both paths differ only in accumulation order.
    """
    if DOT_UPCAST or b.dtype == tl.float32:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 x rounded to nearest-even in DTYPE, returned as fp32.

    bf16 rounds with integer ops instead of a cast because the interpreter's fp32 -> bf16 cast truncates; on a
    GPU this is three integer ops per element and gives the same bits as the hardware conversion.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _rms_rstd(h_ptr, row_off, row_mask, D, eps, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """rsqrt(mean(h^2) + eps) per row, fp32 [BLOCK_R]; row_off[BLOCK_R] are int64 element offsets of the rows."""
    sq = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (ks < D)[None, :]
        x = tl.load(h_ptr + row_off[:, None] + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        sq += x * x
    return tl.rsqrt(tl.sum(sq, axis=1) / D + eps)


@triton.jit
def _normed_chunk(h_ptr, nw_ptr, row_off, row_mask, rstd, k0, D, BLOCK_K: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) of the normed rows, [BLOCK_R, BLOCK_K], zero outside D.

    fp32 holding model-dtype values: (h * rstd) rounded to the model dtype, times the weight, rounded again,
    exactly as transformers' two model-dtype steps. All arithmetic is fp32 (see `_round_to`).
    """
    DTYPE: tl.constexpr = nw_ptr.dtype.element_ty
    ks = k0 + tl.arange(0, BLOCK_K)
    k_mask = ks < D
    x = tl.load(h_ptr + row_off[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    w = tl.load(nw_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
    return _round_to(_round_to(x.to(tl.float32) * rstd[:, None], DTYPE) * w[None, :], DTYPE)


@triton.jit
def _value_slab(h_ptr, nw_ptr, w1_ptr, b1_ptr, w2_ptr,  # pointers
                row_off, row_mask, rstd, n0, D,  # rows and sizes
                stride_w1_n,  # strides
                BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """sum over n in [n0, n0 + BLOCK_N) of w2[n] * silu((W1 @ hn)[n] + b1[n]), fp32 [BLOCK_R]."""
    ns = n0 + tl.arange(0, BLOCK_N)
    n_mask = ns < D
    w1_off = ns.to(tl.int64)[None, :] * stride_w1_n  # [1, BLOCK_N]; int64: D*D passes 2^31 from D = 46341
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        hn = _normed_chunk(h_ptr, nw_ptr, row_off, row_mask, rstd, k0, D, BLOCK_K)  # [BLOCK_R, BLOCK_K]
        ks = k0 + tl.arange(0, BLOCK_K)
        w1 = tl.load(w1_ptr + w1_off + ks[:, None], mask=n_mask[None, :] & (ks < D)[:, None], other=0.0)
        acc = _dot(hn, w1, acc, DOT_UPCAST)  # [BLOCK_R, BLOCK_N] += hn @ W1[ns, ks]^T
    pre = acc + tl.load(b1_ptr + ns, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    act = pre * tl.sigmoid(pre)  # SiLU
    w2 = tl.load(w2_ptr + ns, mask=n_mask, other=0.0).to(tl.float32)  # zero outside D: padded lanes add nothing
    return tl.sum(act * w2[None, :], axis=1)


@autotune(_configs, key=["D"])  # key on model-fixed sizes only, never on R
@triton.jit
def _value_head_kernel(h_ptr, nw_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, z_ptr, u_ptr,  # pointers
                       R, D, eps,  # sizes and scalars
                       stride_h_r, stride_w1_n,  # strides
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # meta
                       DOT_UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    row_off = rows.to(tl.int64) * stride_h_r  # int64: R*D passes 2^31 for long prefills
    rstd = _rms_rstd(h_ptr, row_off, row_mask, D, eps, BLOCK_R, BLOCK_K)
    z = tl.zeros([BLOCK_R], dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        z += _value_slab(h_ptr, nw_ptr, w1_ptr, b1_ptr, w2_ptr, row_off, row_mask, rstd, n0, D, stride_w1_n,
                         BLOCK_R, BLOCK_N, BLOCK_K, DOT_UPCAST)
    z += tl.load(b2_ptr).to(tl.float32)
    tl.store(z_ptr + rows, z, mask=row_mask)
    tl.store(u_ptr + rows, tl.sigmoid(z), mask=row_mask)


def _value_head_triton(h: torch.Tensor, norm_weight: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                       w2: torch.Tensor, b2: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate, launch on h's device, return without synchronising. Inputs are already checked."""
    R, D = h.shape
    z = torch.empty(R, dtype=torch.float32, device=h.device)
    u = torch.empty(R, dtype=torch.float32, device=h.device)
    if R:
        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(R, meta["BLOCK_R"]),)

        _value_head_kernel[grid](h, norm_weight, w1, b1, w2, b2, z, u,
                                 R, D, eps,
                                 h.stride(0), w1.stride(0))
    return z, u


def describe(t: torch.Tensor) -> str:
    """Metadata of a tensor for error messages; never reads its values."""
    layout = "contiguous" if t.is_contiguous() else f"strides {tuple(t.stride())}"
    return f"{t.dtype} tensor of shape {tuple(t.shape)} ({layout}) on {t.device}"


def check_tensor(name: str, t: object, shapes: tuple[tuple[int, ...], ...], like: torch.Tensor,
                 *, rows_strided: bool = False) -> None:
    """Raise ValueError naming `name` unless t has one of `shapes`, like's dtype and device, and a usable layout.

    rows_strided=True accepts any row stride as long as the last dimension is dense; otherwise t must be
    contiguous (the caller never copies silently).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    want = " or ".join(str(s) for s in shapes)
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name}: expected shape {want}, got {describe(t)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name}: expected {like.dtype} on {like.device} like h, got {describe(t)}")
    dense = t.stride(-1) == 1 or t.shape[-1] == 1 if rows_strided else t.is_contiguous()
    if not dense:
        hint = "a dense last dimension" if rows_strided else "a contiguous tensor"
        raise ValueError(f"{name}: expected {hint} (no silent copies; make it contiguous once, at load), "
                         f"got {describe(t)}")


def check_value_head_args(h: object, norm_weight: object, w1: object, b1: object, w2: object, b2: object,
                          eps: object, backend: object) -> None:
    """Metadata checks shared by `value_head` and `fused_heads`; raises ValueError naming the argument."""
    if not isinstance(h, torch.Tensor):
        raise ValueError(f"h: expected a torch.Tensor, got {type(h).__name__}")
    if h.dim() != 2 or h.shape[1] < 1 or h.dtype not in _DTYPES:
        raise ValueError(f"h: expected a [R, D] float32/bfloat16/float16 tensor with D >= 1, got {describe(h)}")
    D = h.shape[1]
    check_tensor("h", h, (tuple(h.shape),), h, rows_strided=True)
    check_tensor("norm_weight", norm_weight, ((D,),), h)
    check_tensor("w1", w1, ((D, D),), h, rows_strided=True)
    check_tensor("b1", b1, ((D,),), h)
    check_tensor("w2", w2, ((D,), (1, D)), h)
    check_tensor("b2", b2, ((1,), ()), h)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"eps: expected a positive finite float (the model's rms_norm_eps), got {eps!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(op: str, device: torch.device, backend: str) -> bool:
    """Resolve `backend` for a tensor on `device`: True for the Triton kernel, False for the torch reference."""
    runnable = HAS_TRITON and (device.type == "cuda" or _interpreting())
    if backend == "torch":
        return False
    if backend == "triton":
        if not runnable:
            raise ValueError(
                f"{op}: backend='triton' cannot run on {device} (HAS_TRITON={HAS_TRITON}, "
                f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}); pass CUDA tensors, set TRITON_INTERPRET=1 "
                f"before importing lenvm_rt.kernels, or use backend='auto' / 'torch'"
            )
        return True
    if not runnable and device.type == "cuda":
        _log_fallback(op)
    return runnable


@functools.cache
def _log_fallback(op: str) -> None:
    logger.warning("%s: Triton is not installed; CUDA tensors use the torch reference (same results, slower)", op)


def value_head(
    h: torch.Tensor,  # [R, D] pre-final-norm hidden states, model dtype
    norm_weight: torch.Tensor,  # [D] final norm weight
    w1: torch.Tensor,  # [D, D] v_head.fc.weight
    b1: torch.Tensor,  # [D] v_head.fc.bias
    w2: torch.Tensor,  # [D] or [1, D] v_head.summary.weight
    b2: torch.Tensor,  # [1] or [] v_head.summary.bias
    *,
    eps: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """LenVM value of each row: returns (z, u), fp32 [R], with u = sigmoid(z) in (0, 1) (larger = longer).

    "auto" uses Triton when it is installed and h is on CUDA (or TRITON_INTERPRET=1), else the reference with
    upcast=True; "triton" raises ValueError where it cannot run; "torch" always runs the reference. Falling
    back changes speed, never results. No host sync; only metadata is checked.
    """
    check_value_head_args(h, norm_weight, w1, b1, w2, b2, eps, backend)
    if use_triton("value_head", h.device, backend):
        return _value_head_triton(h, norm_weight, w1, b1, w2, b2, float(eps))
    return value_head_ref(h, norm_weight, w1, b1, w2, b2, eps=eps, upcast=True)
