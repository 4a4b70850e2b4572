"""Typed facade over the C++ core `lenvm_rt._core`; the only module that imports it.

Contract:
    philox_uniform(seeds: uint64[B], offsets: uint32[B], stream=0, out: float32[B] | None) -> float32[B]
        Per-row Philox4x32-10 uniforms in [0, 1), bit-identical to `lenvm_rt.kernels.philox_uniform`.
    linear(x: float32[M, K], weight: float32[N, K], bias: float32[N] | None, out: float32[M, N]) -> out
        out = x @ weight.T + bias in fp32; out[m, n] depends only on x[m], weight[n], bias[n] and K (bit-identical
        for any M and thread count). `out` must not overlap the inputs. Runs with the GIL released.
    set_num_threads(n) / get_num_threads(): threads of the native pool (calling thread included), n in
        [1, 1024]; the default is LENVM_RT_NUM_THREADS, else min(cores, 8).
    linear_kernel() -> "avx2_fma" | "scalar": the kernel `linear` uses in this process.
    pack_panels(weight: float32[N, K], out: float32 | int16 | float16 [ceil(N / 8), K, 8]) / panel_linear(x, panels,
        n, bias, out): the same product over a weight packed in panels of 8 rows (csrc/panel_linear.h), stored as
        float32, as bfloat16 bits (int16) or as float16 when every weight is exact there (storage_exact): out[m, j]
        is one ordered sum over K, again bit-identical for any M and thread count, and for every storage.
    GuidanceBatch(capacity, eos_ids): length-guided selection (rules of `select_ref.select_row`) for a slot
        table of requests; `step(rows, cand_ids, cand_logp, cand_z, out_slot, out_token, out_done)` is the one
        native call per decode step for the whole batch, GIL released.
    Trunk(layers, hidden, heads, kv_heads, head_dim, intermediate, eps, scale, weights): the decoder layers of a
        Llama / Qwen2 / Qwen3 model in fp32 (csrc/trunk.h); `decode` and `lookahead` run every layer in one call.
Arrays must be C-contiguous numpy arrays of exactly the stated dtype and rank (no silent conversion); a
mismatch raises ValueError naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from . import _core
from .select_ref import RULES

_LINEAR_ARGUMENTS = ("x", "weight", "bias", "out")


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


def linear(
    x: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None,
    out: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """Write x @ weight.T + bias into `out` and return it (shapes and contract in the module docstring)."""
    try:
        _core.linear(x, weight, bias, out)
    except TypeError:
        # The core refuses wrong dtypes and layouts without converting; name the offending argument.
        for name, value in zip(_LINEAR_ARGUMENTS, (x, weight, bias, out)):
            if value is not None:
                _require_array(value, name, np.float32, ndim=1 if name == "bias" else 2)
        raise
    return out


def set_num_threads(n: int) -> None:
    """Use `n` threads (calling thread included) for native kernels; n in [1, 1024]."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise ValueError(f"n: expected an integer in [1, 1024], got {n!r}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Threads (calling thread included) the native kernels use."""
    return _core.get_num_threads()


def linear_kernel() -> str:
    """"avx2_fma" or "scalar": the kernel `linear` uses in this process."""
    return _core.linear_kernel()


_STEP_ARGUMENTS = (("rows", np.int32, 1), ("cand_ids", np.int32, 2), ("cand_logp", np.float32, 2),
                   ("cand_z", np.float32, 2), ("out_slot", np.int32, 1), ("out_token", np.int32, 1),
                   ("out_done", np.uint8, 1))


def _require_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name}: expected an int in [{low}, {high}], got {value!r}")
    return int(value)


class GuidanceBatch:
    """Length-guided token selection for a batch of decoding rows, in the C++ core.

    A fixed table of `capacity` slots holds each request's rule, target T, generated count t, max_new, gamma,
    beta, seed and greedy flag. Each decode step makes one native call for the whole batch: `step` applies
    `select_ref.select_row` to every row (same choices on the same inputs), writes the caller's output arrays
    and advances t of every row by one; done rows stay admitted until `retire`. Not thread-safe.

    Example:
        >>> batch = GuidanceBatch(capacity=8, eos_ids=[2])
        >>> batch.admit(0, rule="equal", target=101, max_new=512, gamma=0.997)
        >>> batch.step(rows, cand_ids, cand_logp, cand_z, out_slot, out_token, out_done)  # shapes in `step`
    """

    def __init__(self, capacity: int, eos_ids: Sequence[int]) -> None:
        _require_int("capacity", capacity, 1, 2**24)
        eos = [_require_int(f"eos_ids[{i}]", e, 0, 2**31 - 1) for i, e in enumerate(eos_ids)]
        if not eos:
            raise ValueError("eos_ids: expected at least one token id, got an empty sequence")
        self._core = _core.GuidanceBatch(int(capacity), eos)

    @property
    def capacity(self) -> int:
        return self._core.capacity()

    @property
    def eos_ids(self) -> list[int]:
        return self._core.eos_ids()

    def admit(self, slot: int, *, rule: int | str, target: int, max_new: int, gamma: float, beta: float = 0.0,
              seed: int = 0, greedy: bool = False) -> None:
        """Start a request in a free slot with t = 0.

        rule: a name of select_ref.RULES ("equal", "at_most", "at_least", "tilt", "equal_band", "equal_soft",
        "at_most_band", "at_least_band") or its number 1-8; target >= 1 generated tokens including EOS (ignored by
        tilt); max_new >= 1; 0 < gamma < 1; |beta| <= 1e30 (tilt strength); seed in [0, 2**64); greedy: tilt, the
        band rules and equal_soft take the argmax instead of sampling.
        """
        rule_id = RULES.get(rule) if isinstance(rule, str) else rule
        if rule_id is None or isinstance(rule_id, bool) or rule_id not in RULES.values():
            raise ValueError(f"rule: expected one of {sorted(RULES)} or {sorted(RULES.values())}, got {rule!r}")
        _require_int("slot", slot, -(2**63), 2**63 - 1)  # the core raises IndexError outside the table
        _require_int("target", target, -(2**63), 2**63 - 1)
        _require_int("max_new", max_new, 1, 2**63 - 1)
        _require_int("seed", seed, 0, 2**64 - 1)
        for name, value in (("gamma", gamma), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise ValueError(f"{name}: expected a number, got {value!r}")
        if not isinstance(greedy, (bool, np.bool_)):
            raise ValueError(f"greedy: expected a bool, got {greedy!r}")
        self._core.admit(int(slot), int(rule_id), int(target), int(max_new), float(gamma), float(beta), int(seed),
                         bool(greedy))

    def retire(self, slot: int) -> None:
        """Free an active slot."""
        self._core.retire(_require_int("slot", slot, -(2**63), 2**63 - 1))

    def step(
        self,
        rows: npt.NDArray[np.int32],  # [B] distinct active slots
        cand_ids: npt.NDArray[np.int32],  # [B, K] -1 = empty; filled slots first, slot 0 filled
        cand_logp: npt.NDArray[np.float32],  # [B, K] finite where filled
        cand_z: npt.NDArray[np.float32],  # [B, K] not NaN where filled
        out_slot: npt.NDArray[np.int32],  # [B] chosen slot, -1 = forced EOS
        out_token: npt.NDArray[np.int32],  # [B]
        out_done: npt.NDArray[np.uint8],  # [B] 1 = EOS or max_new reached
    ) -> None:
        """One decode step for the whole batch; on error (ValueError / IndexError) nothing is written or advanced."""
        args = (rows, cand_ids, cand_logp, cand_z, out_slot, out_token, out_done)
        try:
            self._core.step(*args)
        except TypeError:
            # The core refuses wrong dtypes and layouts without converting; name the offending argument.
            for (name, dtype, ndim), value in zip(_STEP_ARGUMENTS, args):
                _require_array(value, name, dtype, ndim)
            raise

    def generated(self, slot: int) -> int:
        """t: tokens the request in `slot` has generated (EOS included)."""
        return self._core.generated(slot)

    def is_active(self, slot: int) -> bool:
        return self._core.is_active(slot)

    def active_count(self) -> int:
        return self._core.active_count()


def _map64(fn, x: npt.ArrayLike, gamma: float) -> npt.NDArray[np.float64]:
    arr = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
    out = np.empty_like(arr)
    fn(arr, float(gamma), out)
    return out


def value_of_length(lengths: npt.ArrayLike, gamma: float) -> npt.NDArray[np.float64]:
    """C++ mirror of value_math.value_of_length, elementwise over float64."""
    return _map64(_core.value_of_length, lengths, gamma)


def logit_of_length(lengths: npt.ArrayLike, gamma: float) -> npt.NDArray[np.float64]:
    """C++ mirror of value_math.logit_of_length."""
    return _map64(_core.logit_of_length, lengths, gamma)


def remaining_from_logit(z: npt.ArrayLike, gamma: float) -> npt.NDArray[np.float64]:
    """C++ mirror of value_math.remaining_from_logit."""
    return _map64(_core.remaining_from_logit, z, gamma)


def remaining_from_value(u: npt.ArrayLike, gamma: float) -> npt.NDArray[np.float64]:
    """C++ mirror of value_math.remaining_from_value."""
    return _map64(_core.remaining_from_value, u, gamma)


def td_residual(u_prev: npt.ArrayLike, u_next: npt.ArrayLike, gamma: float) -> npt.NDArray[np.float64]:
    """C++ mirror of value_math.td_residual."""
    a = np.ascontiguousarray(u_prev, dtype=np.float64).reshape(-1)
    b = np.ascontiguousarray(u_next, dtype=np.float64).reshape(-1)
    out = np.empty_like(a)
    _core.td_residual(a, b, float(gamma), out)
    return out


def gamma_from_lengths(lengths: npt.ArrayLike, quantile: float = 0.99, mass: float = 0.99) -> float:
    """C++ mirror of value_math.gamma_from_lengths."""
    return _core.gamma_from_lengths([float(v) for v in np.asarray(lengths).reshape(-1)], float(quantile), float(mass))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out = x / sqrt(mean(x**2) + eps) * weight per row; float32 C-contiguous arrays."""
    _core.rms_norm(x, weight, float(eps), out)


def token_stats(logits: np.ndarray, tokens: np.ndarray, logp: np.ndarray, rank: np.ndarray) -> None:
    """logp[r] = log softmax(logits[r])[tokens[r]] and rank[r] = 1 + #(logits[r] > the chosen logit)
    (csrc/token_stats.h); logits float32 [R, V], tokens int64 [R] or [R, W] in [0, V), logp float64 and rank int64
    shaped like tokens."""
    _core.token_stats(logits, tokens, logp, rank)


def decode_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, span: np.ndarray, scale: float,
                     out: np.ndarray) -> None:
    """Decode-step attention (csrc/decode_ops.h); float32 arrays, span int32[B]."""
    _core.decode_attention(q, k_cache, v_cache, span, float(scale), out)


def rope_cache_attention(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                         positions: np.ndarray, heads: int, scale: float, out: np.ndarray) -> None:
    """RoPE, cache write and attention of one decode step (csrc/decode_ops.h); float32, positions int32[B]."""
    _core.rope_cache_attention(qkv, cos, sin, k_cache, v_cache, positions, int(heads), float(scale), out)


def rope_lookahead_attention(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, k_cache: np.ndarray,
                             v_cache: np.ndarray, positions: np.ndarray, heads: int, scale: float, out: np.ndarray,
                             k_new: np.ndarray, v_new: np.ndarray) -> None:
    """Tree-masked lookahead attention (csrc/decode_ops.h); float32, positions int32[B]."""
    _core.rope_lookahead_attention(qkv, cos, sin, k_cache, v_cache, positions, int(heads), float(scale), out, k_new,
                                   v_new)


def value_head(x: np.ndarray, norm: np.ndarray, eps: float, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray,
               b2: float, z: np.ndarray) -> None:
    """z[r] = b2 + w2 . silu(w1 rms_norm(x[r]) + b1) (csrc/value_head.h); float32, x [R, D], w1 [H, D], z [R]."""
    _core.value_head(x, norm, float(eps), w1, b1, w2, float(b2), z)


def pack_panels(weight: np.ndarray, out: np.ndarray) -> None:
    """out[p, kk, l] = weight[8 p + l, kk] (0 past the last row); weight float32, out [ceil(N / 8), K, 8] float32,
    int16 (bfloat16 bits) or float16, for a weight exact in that storage (ValueError otherwise)."""
    _core.pack_panels(weight, out)


def panel_linear(x: np.ndarray, panels: np.ndarray, n: int, bias: np.ndarray | None, out: np.ndarray) -> None:
    """out = x @ weight.T + bias for weight [n, K] packed by pack_panels (float32, int16 or float16 panels);
    x [M, K], bias [n] and out [M, n] float32."""
    _core.panel_linear(x, panels, int(n), bias, out)


def storage_exact(weight: np.ndarray, storage: str) -> bool:
    """Whether every value of a float32 array is exactly a value of `storage` ("bfloat16" or "float16")."""
    return bool(_core.storage_exact(weight, storage))


Trunk = _core.Trunk
