"""Shared-trunk heads: final RMSNorm, LM-head top-k and logsumexp, and the LenVM value, without [R, V] logits.

Math:     hn = (h * rsqrt(mean(h^2) + eps)).to(dtype) * norm_weight        (norm in fp32, as transformers does)
          logits = hn @ lm_head^T (fp32 accumulation, never stored);  topk_ids/topk_logits = top-k of logits,
          sorted descending, equal logits ordered by smaller id;  lse = logsumexp(logits) over all V
          z = w2 . silu(W1 @ hn + b1) + b2,  u = sigmoid(z)             (as `value_head`)
Shapes:   h[R, D] model dtype (fp32 / bf16 / fp16), norm_weight[D], lm_head[V, D], W1[D, D], b1[D], w2[D] or [1, D],
          b2[1] or [] (all in h's dtype), 1 <= k <= min(64, V)  ->  FusedHeads(normed[R, D] model dtype,
          topk_ids[R, k] int64, topk_logits[R, k] fp32, lse[R] fp32, z[R] fp32, u[R] fp32).
Launches: two Triton launches, plus torch.empty for the outputs and the small partials.
  1. `_fused_heads_kernel`, grid (cdiv(R, BLOCK_R), P + Q). Axis 0 is the row tile, so the programs the GPU
     schedules together share a vocabulary chunk and read its lm_head rows from L2 once they are loaded.
     - P = cdiv(V, CHUNK_V) "vocab" programs, CHUNK_V = BLOCK_V * TILES_PER_PROG = 1024: each walks its chunk in
       [BLOCK_V, D] tiles of lm_head, computes the [BLOCK_R, BLOCK_V] logits tile in registers (tl.dot, fp32),
       folds it into a running (max, sum-exp) and a running top-KP (KP = next power of two >= k), and writes
       KP packed keys and one (max, sum-exp) pair per row. Program 0 of each row tile also writes `normed`.
     - Q = cdiv(D, BLOCK_N) "value" programs: each takes a [BLOCK_N, D] slab of W1 through b1, SiLU and w2 and
       writes one partial sum per row. The value head rides on the same pass over the normed rows; splitting W1
       over Q programs keeps decode-sized R from leaving SMs idle, and the merge launch finishes the sum.
  2. `_fused_heads_merge_kernel`, grid cdiv(R, 4) (16 rows per program under the interpreter): merges a row's
     P*KP keys into its sorted top-k, its P (max, sum-exp) pairs into lse, and its Q partials plus b2 into z, u.
Keys:     a logit and its id in one int64: high 32 bits = the fp32 bits made order-preserving as int32, low 32 bits =
          2^31 - 1 - id, so one signed compare ranks by logit, then by smaller id; lanes past V get INT64_MIN.
          A running top-KP takes a tile's maxima one at a time while they beat its KP-th key (`_insert_topk`): about
          KP steps for a program's first tile, then few on real logits; a vocabulary sorted by ascending logit is
          the worst case, KP steps per tile (slower, never wrong).
Traffic:  launch 1 reads lm_head (2*V*D bytes in bf16; 467 MB for Qwen2.5's V = 151936, D = 1536) and W1 (2*D*D)
          once per row tile, from DRAM once when row tiles run together; h from L2 (once per tile and per K chunk);
          writes 2*R*D (normed) + R*P*(8*KP + 8) + 4*R*Q bytes; at V = 151936, k <= 16 that is about 20 KB per row
          against 608 KB for an fp32 logits row. Launch 2 reads those partials and writes R*(12*k + 12) bytes.
Limits:   V < 2^31 (ids live in 31 bits); offsets into h, lm_head, W1 and the partials are int64 because R*D, V*D
          and D*D can pass 2^31 (V*D does at V = 262144, D = 8192). Non-finite logits give a non-finite lse.
Contract: no host sync (no .item() / .tolist() / bool(tensor)); only tensor metadata is checked; no device query at
          import; both backends return the same NamedTuple, shapes, dtypes and semantics. fp32 models use
          tl.dot(input_precision="ieee"), see `value_head`.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._compat import tl, triton
from .value_head import (
    _dot,
    _normed_chunk,
    _rms_rstd,
    _value_slab,
    autotune,
    check_tensor,
    check_value_head_args,
    describe,
    rms_norm_ref,
    use_triton,
    value_head_ref,
)

K_MAX = 64  # largest supported k: the per-program top-KP lives in registers
_BLOCK_V = 128  # vocabulary tile of a vocab program
_TILES_PER_PROG = 8  # tiles per vocab program: fewer, larger partials (KP keys per 1024 ids, not per 128)
_BLOCK_N = 64  # W1 slab of a value program
_BLOCK_C = 1024  # most keys (and partials) per row the merge kernel reads per step
# Rows per merge program: a few on a GPU, where the merge is tiny and rows should spread over SMs; more under the
# interpreter, which pays per program and per op, not per element.
_MERGE_ROWS = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 4


class FusedHeads(NamedTuple):
    normed: torch.Tensor  # [R, D] model dtype: final-norm hidden states, the LM head's input
    topk_ids: torch.Tensor  # [R, k] int64
    topk_logits: torch.Tensor  # [R, k] fp32, sorted descending
    lse: torch.Tensor  # [R] fp32, logsumexp over the full vocabulary
    z: torch.Tensor  # [R] fp32, value-head logit
    u: torch.Tensor  # [R] fp32, sigmoid(z)


def fused_heads_ref(
    h: torch.Tensor,  # [R, D] model dtype
    norm_weight: torch.Tensor,  # [D]
    lm_head: torch.Tensor,  # [V, D]
    w1: torch.Tensor,  # [D, D]
    b1: torch.Tensor,  # [D]
    w2: torch.Tensor,  # [D] or [1, D]
    b2: torch.Tensor,  # [1] or []
    *,
    eps: float,
    k: int,
    upcast: bool = True,
) -> FusedHeads:
    """Readable torch version with full logits: the test oracle and the CPU path.

    upcast=True computes logits and the value head in fp32 from the model-dtype normed rows; upcast=False
    computes them in h's dtype (the "same-dtype torch" baseline of the tolerance rule).
    """
    normed = rms_norm_ref(h, norm_weight, eps=eps)  # [R, D] model dtype
    dtype = torch.float32 if upcast else h.dtype
    logits = F.linear(normed.to(dtype), lm_head.to(dtype)).float()  # [R, V]
    top = torch.topk(logits, k, dim=-1)  # sorted descending
    z, u = value_head_ref(h, norm_weight, w1, b1, w2, b2, eps=eps, upcast=upcast)
    return FusedHeads(normed, top.indices, top.values, torch.logsumexp(logits, dim=-1), z, u)


def _configs() -> list:
    """Runs at import: may read the interpreter flag, must not touch the device."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # One config, so autotune never benchmarks; BLOCK_K < 96 so the test shapes take the K loop and its mask.
        return [triton.Config({"BLOCK_R": 16, "BLOCK_K": 64, "DOT_UPCAST": True}, num_warps=4)]
    # Candidates, not yet timed (no GPU was available when this was written); the autotuner picks among them in
    # Runtime.warmup(). BLOCK_R is small because decode R is small. Each compiles for sm_90 (Triton 3.7, bf16,
    # KP = 64) without register spills per `cuobjdump -res-usage`; BLOCK_R = 16, BLOCK_K = 64 at 4 warps spilled.
    return [
        triton.Config({"BLOCK_R": 16, "BLOCK_K": 64, "DOT_UPCAST": False}, num_warps=8),
        triton.Config({"BLOCK_R": 16, "BLOCK_K": 32, "DOT_UPCAST": False}, num_warps=4),
        triton.Config({"BLOCK_R": 32, "BLOCK_K": 64, "DOT_UPCAST": False}, num_warps=8),
    ]


@triton.jit
def _pack_keys(logits, ids):
    """int64 keys ordered like (logit, -id): order-preserving fp32 bits above, 2^31 - 1 - id below."""
    bits = logits.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: reverse their magnitude order
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def _insert_topk(best, cand):
    """The top-KP keys (as an unordered set) of best[M, KP] and cand[M, N]; keys are unique except INT64_MIN.

    Moves cand's row maxima into best's smallest slots while any row has one above its KP-th best. After the first
    tiles few keys qualify, so a tile costs a handful of max reductions instead of a sort. (Also: tl.topk's
    bitonic network reduces with xor_sum, which the interpreter runs element by element, minutes per test.)
    """
    floor = tl.full(cand.shape, -1, tl.int64) << 63  # INT64_MIN
    slots = tl.arange(0, best.shape[1])[None, :]
    thr = tl.min(best, axis=1)  # [M] KP-th best so far
    top = tl.max(cand, axis=1)  # [M] best candidate not yet taken
    while tl.max((top > thr).to(tl.int32), axis=0) > 0:  # data-dependent trip count, on the device
        take = top > thr
        slot = tl.argmin(best, axis=1)  # first slot holding the minimum
        best = tl.where(take[:, None] & (slots == slot[:, None]), top[:, None], best)
        cand = tl.where(cand >= top[:, None], floor, cand)
        thr = tl.min(best, axis=1)
        top = tl.max(cand, axis=1)
    return best


@autotune(_configs, key=["D", "V"])  # key on model-fixed sizes only, never on R
@triton.jit
def _fused_heads_kernel(h_ptr, nw_ptr, lm_ptr, w1_ptr, b1_ptr, w2_ptr,  # input pointers
                        normed_ptr, keys_ptr, max_ptr, sumexp_ptr, zpart_ptr,  # output pointers
                        R, D, V, P, Q, eps,  # sizes and scalars: P vocab programs, Q value programs
                        stride_h_r, stride_lm_v, stride_w1_n,  # strides (normed and partials are contiguous)
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,  # meta
                        TILES_PER_PROG: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr,
                        DOT_UPCAST: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    rows64 = rows.to(tl.int64)
    row_off = rows64 * stride_h_r  # int64: R*D passes 2^31 for long prefills
    rstd = _rms_rstd(h_ptr, row_off, row_mask, D, eps, BLOCK_R, BLOCK_K)
    if pid_n < P:
        if pid_n == 0:
            for k0 in range(0, D, BLOCK_K):
                hn = _normed_chunk(h_ptr, nw_ptr, row_off, row_mask, rstd, k0, D, BLOCK_K)
                ks = k0 + tl.arange(0, BLOCK_K)
                tl.store(normed_ptr + rows64[:, None] * D + ks[None, :], hn.to(normed_ptr.dtype.element_ty),
                         mask=row_mask[:, None] & (ks < D)[None, :])
        best = tl.full([BLOCK_R, KP], -1, tl.int64) << 63  # INT64_MIN: below every real key, -inf included
        floor = tl.full([BLOCK_R, BLOCK_V], -1, tl.int64) << 63
        run_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        for t in range(TILES_PER_PROG):
            vs = (pid_n * TILES_PER_PROG + t) * BLOCK_V + tl.arange(0, BLOCK_V)
            v_mask = vs < V
            lm_off = vs.to(tl.int64)[None, :] * stride_lm_v  # [1, BLOCK_V]; int64: V*D passes 2^31
            acc = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                hn = _normed_chunk(h_ptr, nw_ptr, row_off, row_mask, rstd, k0, D, BLOCK_K)  # [BLOCK_R, BLOCK_K]
                ks = k0 + tl.arange(0, BLOCK_K)
                lm = tl.load(lm_ptr + lm_off + ks[:, None], mask=v_mask[None, :] & (ks < D)[:, None], other=0.0)
                acc = _dot(hn, lm, acc, DOT_UPCAST)  # [BLOCK_R, BLOCK_V] += hn @ lm_head[vs, ks]^T
            logits = tl.where(v_mask[None, :], acc, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: avoid -inf - -inf
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
            run_max = new_max
            best = _insert_topk(best, tl.where(v_mask[None, :], _pack_keys(logits, vs[None, :]), floor))
        kp = tl.arange(0, KP)
        key_off = (rows64[:, None] * P + pid_n) * KP + kp[None, :]  # keys[R, P, KP]
        tl.store(keys_ptr + key_off, best, mask=row_mask[:, None])
        tl.store(max_ptr + rows64 * P + pid_n, run_max, mask=row_mask)  # max[R, P]
        tl.store(sumexp_ptr + rows64 * P + pid_n, run_sum, mask=row_mask)  # sumexp[R, P]
    else:
        zp = _value_slab(h_ptr, nw_ptr, w1_ptr, b1_ptr, w2_ptr, row_off, row_mask, rstd, (pid_n - P) * BLOCK_N, D,
                         stride_w1_n, BLOCK_R, BLOCK_N, BLOCK_K, DOT_UPCAST)
        tl.store(zpart_ptr + rows64 * Q + (pid_n - P), zp, mask=row_mask)  # zpart[R, Q]


@triton.jit
def _fused_heads_merge_kernel(keys_ptr, max_ptr, sumexp_ptr, zpart_ptr, b2_ptr,  # input pointers
                              ids_ptr, vals_ptr, lse_ptr, z_ptr, u_ptr,  # output pointers
                              R, k, P, Q,  # sizes (all buffers contiguous)
                              KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):  # meta
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < R
    rows64 = rows.to(tl.int64)[:, None]  # [BLOCK_M, 1]
    cols = tl.arange(0, BLOCK_C)[None, :]  # [1, BLOCK_C]
    floor = tl.full([BLOCK_M, KP], -1, tl.int64) << 63  # INT64_MIN, as in `_fused_heads_kernel`
    best = floor
    for c0 in range(0, P * KP, BLOCK_C):
        mask = row_mask[:, None] & (c0 + cols < P * KP)
        keys = tl.load(keys_ptr + rows64 * P * KP + c0 + cols, mask=mask, other=0)
        best = _insert_topk(best, tl.where(mask, keys, tl.full([BLOCK_M, BLOCK_C], -1, tl.int64) << 63))
    slots = tl.arange(0, KP)[None, :]
    ranked = floor
    for i in range(KP):  # selection sort of the KP keys, descending
        top = tl.max(best, axis=1)[:, None]
        ranked = tl.where(slots == i, top, ranked)
        best = tl.where(best >= top, floor, best)
    ordered = (ranked >> 32).to(tl.int32)
    vals = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    ids = 0x7FFFFFFF - (ranked & 0x7FFFFFFF)  # the low word is 2^31 - 1 - id < 2^31
    out_mask = row_mask[:, None] & (slots < k)
    tl.store(ids_ptr + rows64 * k + slots, ids, mask=out_mask)
    tl.store(vals_ptr + rows64 * k + slots, vals, mask=out_mask)

    lane_max = tl.full([BLOCK_M, BLOCK_C], float("-inf"), tl.float32)  # per-lane running (max, sum-exp)
    lane_sum = tl.full([BLOCK_M, BLOCK_C], 0.0, tl.float32)
    for p0 in range(0, P, BLOCK_C):
        mask = row_mask[:, None] & (p0 + cols < P)
        m = tl.load(max_ptr + rows64 * P + p0 + cols, mask=mask, other=float("-inf"))
        s = tl.load(sumexp_ptr + rows64 * P + p0 + cols, mask=mask, other=0.0)
        new_max = tl.maximum(lane_max, m)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: avoid -inf - -inf
        lane_sum = lane_sum * tl.exp(lane_max - shift) + s * tl.exp(m - shift)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=1)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(lane_sum * tl.exp(lane_max - shift[:, None]), axis=1)
    lse = shift + tl.log(tl.where(row_mask, total, 1.0))  # rows past R: no log(0) (a warning under the interpreter)
    tl.store(lse_ptr + rows, lse, mask=row_mask)

    zacc = tl.full([BLOCK_M, BLOCK_C], 0.0, tl.float32)
    for q0 in range(0, Q, BLOCK_C):
        zacc += tl.load(zpart_ptr + rows64 * Q + q0 + cols, mask=row_mask[:, None] & (q0 + cols < Q), other=0.0)
    z = tl.sum(zacc, axis=1) + tl.load(b2_ptr).to(tl.float32)
    tl.store(z_ptr + rows, z, mask=row_mask)
    tl.store(u_ptr + rows, 1.0 / (1.0 + tl.exp(-z)), mask=row_mask)


def _fused_heads_triton(h: torch.Tensor, norm_weight: torch.Tensor, lm_head: torch.Tensor, w1: torch.Tensor,
                        b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, eps: float, k: int) -> FusedHeads:
    """Allocate, launch both kernels on h's device, return without synchronising. Inputs are already checked."""
    R, D = h.shape
    V = lm_head.shape[0]
    dev = h.device
    normed = torch.empty(R, D, dtype=h.dtype, device=dev)
    ids = torch.empty(R, k, dtype=torch.int64, device=dev)
    vals = torch.empty(R, k, dtype=torch.float32, device=dev)
    lse, z, u = (torch.empty(R, dtype=torch.float32, device=dev) for _ in range(3))
    if R:
        KP = triton.next_power_of_2(k)
        P = triton.cdiv(V, _BLOCK_V * _TILES_PER_PROG)
        Q = triton.cdiv(D, _BLOCK_N)
        keys = torch.empty(R, P, KP, dtype=torch.int64, device=dev)
        run_max = torch.empty(R, P, dtype=torch.float32, device=dev)
        run_sum = torch.empty(R, P, dtype=torch.float32, device=dev)
        zpart = torch.empty(R, Q, dtype=torch.float32, device=dev)

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(R, meta["BLOCK_R"]), P + Q)

        _fused_heads_kernel[grid](h, norm_weight, lm_head, w1, b1, w2,
                                  normed, keys, run_max, run_sum, zpart,
                                  R, D, V, P, Q, eps,
                                  h.stride(0), lm_head.stride(0), w1.stride(0),
                                  BLOCK_V=_BLOCK_V, TILES_PER_PROG=_TILES_PER_PROG, BLOCK_N=_BLOCK_N, KP=KP)
        _fused_heads_merge_kernel[(triton.cdiv(R, _MERGE_ROWS),)](
            keys, run_max, run_sum, zpart, b2,
            ids, vals, lse, z, u,
            R, k, P, Q,
            KP=KP, BLOCK_M=_MERGE_ROWS, BLOCK_C=min(_BLOCK_C, triton.next_power_of_2(max(P * KP, Q))))
    return FusedHeads(normed, ids, vals, lse, z, u)


def fused_heads(
    h: torch.Tensor,  # [R, D] pre-final-norm hidden states, model dtype
    norm_weight: torch.Tensor,  # [D] final norm weight
    lm_head: torch.Tensor,  # [V, D]
    w1: torch.Tensor,  # [D, D] v_head.fc.weight
    b1: torch.Tensor,  # [D] v_head.fc.bias
    w2: torch.Tensor,  # [D] or [1, D] v_head.summary.weight
    b2: torch.Tensor,  # [1] or [] v_head.summary.bias
    *,
    eps: float,
    k: int,
    backend: str = "auto",
) -> FusedHeads:
    """Final norm, LM-head top-k and logsumexp, and the LenVM value of each row, without materialising logits.

    "auto" uses Triton when it is installed and h is on CUDA (or TRITON_INTERPRET=1), else the reference with
    upcast=True; "triton" raises ValueError where it cannot run; "torch" always runs the reference. Falling back
    changes speed, never results (top-k order among exactly equal logits aside). No host sync.
    """
    check_value_head_args(h, norm_weight, w1, b1, w2, b2, eps, backend)
    if not isinstance(lm_head, torch.Tensor) or lm_head.dim() != 2:
        got = describe(lm_head) if isinstance(lm_head, torch.Tensor) else type(lm_head).__name__
        raise ValueError(f"lm_head: expected a [V, D] tensor with D = {h.shape[1]}, got {got}")
    V = lm_head.shape[0]
    check_tensor("lm_head", lm_head, ((V, h.shape[1]),), h, rows_strided=True)
    if not 1 <= V < 2**31:
        raise ValueError(f"lm_head: expected 1 <= V < 2**31 rows, got {describe(lm_head)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(K_MAX, V):
        raise ValueError(f"k: expected an int in [1, min({K_MAX}, V = {V})], got {k!r}")
    if use_triton("fused_heads", h.device, backend):
        return _fused_heads_triton(h, norm_weight, lm_head, w1, b1, w2, b2, float(eps), k)
    return fused_heads_ref(h, norm_weight, lm_head, w1, b1, w2, b2, eps=eps, k=k, upcast=True)
