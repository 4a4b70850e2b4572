"""CPU fp32 operators on torch tensors, backed by the native core (`lenvm_rt._native`).

Contract:
    linear(x: float32[..., K], weight: float32[N, K], bias: float32[N] | None = None) -> float32[..., N]
        x @ weight.T + bias, like torch.nn.functional.linear, for contiguous fp32 CPU tensors. out[..., n] depends
        only on that row of x, weight[n], bias[n] and K: a row gives bit-identical results whatever the batch
        and thread count. The tensors are viewed as numpy arrays (no copy; read-only memory-mapped weights
        are fine); the result is a new tensor. No autograd: inputs that require grad are refused while grad
        mode is on and detached otherwise. Bad inputs raise ValueError naming the argument.
    pack_panels(weight: float32[N, K], storage="auto") -> PanelWeight; panel_linear(x[..., K], PanelWeight,
        bias[N] | None) -> float32[..., N]: the same product over a copy of the weight in panels of 8 rows
        (csrc/panel_linear.h), which streams from memory in long runs (faster than `linear` here:
        benchmarks/results/bench_linear.json); out[..., j] is one ordered sum over K, again the same bits for a
        row whatever the batch. Storage "auto" keeps the panels in bfloat16 (or float16) when
        every weight is exactly such a value (a checkpoint stored in bfloat16 or float16, loaded as float32):
        half the bytes, the same float32 weights and results bit for bit. Bad inputs raise ValueError naming the
        argument (IndexError for rows_at).
    value_head(x[R, D], norm, eps, w1[H, D], b1[H], w2[H], b2) -> z[R]: the LenVM head in one native call.
    set_num_threads(n) / get_num_threads(): threads of the native pool, calling thread included.
    Trunk(cfg, layers, scale): every decoder layer of a decode step or a lookahead in one native call (csrc/trunk.h),
        over layers whose four matrices are PanelWeights; the arrays it reads are views of the torch tensors it
        was given (weights, caches), kept alive by it.

The fast path converts and calls without checks (~100 calls per decode step); only when the core refuses
an input does `_diagnose` look at the tensors to name the argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import _native

if TYPE_CHECKING:
    from .config import ModelConfig
    from .weights import LayerWeights

_TRUNK_FIELDS = ("input_norm", "qkv", "qkv_bias", "q_norm", "k_norm", "o", "o_bias", "post_norm", "gate_up",
                 "gate_up_bias", "down", "down_bias")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for contiguous fp32 CPU tensors: x [..., K], weight [N, K], bias [N] -> [..., N]."""
    try:
        x_array = x.numpy()
        weight_array = weight.numpy()
        bias_array = None if bias is None else bias.numpy()
        out = np.empty(x_array.shape[:-1] + weight_array.shape[:1], dtype=np.float32)
        if x_array.ndim == 2 or not x_array.flags.c_contiguous:  # a non-contiguous x is refused by the core
            _native.linear(x_array, weight_array, bias_array, out)
        else:
            rows = x_array.reshape(-1, x_array.shape[-1])
            _native.linear(rows, weight_array, bias_array, out.reshape(rows.shape[0], out.shape[-1]))
    except (TypeError, RuntimeError, ValueError, IndexError, AttributeError):
        tensors = (x, weight, bias)
        if not torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
            return linear(*(t.detach() if isinstance(t, torch.Tensor) else t for t in tensors))
        _diagnose(x, weight, bias)
        raise
    return torch.from_numpy(out)


def _diagnose(x: object, weight: object, bias: object) -> None:
    """Raise ValueError naming the first argument that `linear` cannot take as it is; else return."""
    for name, value, ndim in (("x", x, None), ("weight", weight, 2), ("bias", bias, 1)):
        if value is None and name == "bias":
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if value.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor, got a tensor on {value.device}")
        if value.dtype != torch.float32:
            raise ValueError(f"{name}: expected a torch.float32 tensor, got {value.dtype}")
        if not value.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(value.stride())}")
        if value.requires_grad:
            raise ValueError(f"{name}: expected a tensor that does not require grad (linear has no autograd)")
        if ndim is not None and value.dim() != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
        if ndim is None and value.dim() == 0:
            raise ValueError(f"{name}: expected a tensor of shape [..., K], got a 0-D tensor")


@dataclass(frozen=True)
class PanelWeight:
    """A float32 weight matrix [rows, K] packed for panel_linear: panels [ceil(rows / 8), K, 8] stored as float32,
    or as bfloat16 / float16 when every weight is exactly such a value (`storage`); either way it stands for the
    same float32 matrix (`dtype`), which rows_at and unpacked return."""

    panels: torch.Tensor
    rows: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.panels.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def storage(self) -> torch.dtype:
        return self.panels.dtype

    def numel(self) -> int:
        return self.rows * self.panels.shape[1]

    def element_size(self) -> int:
        """Bytes per stored weight (4 for float32 panels, 2 for bfloat16 and float16)."""
        return self.panels.element_size()

    def native(self) -> np.ndarray:
        """The panels as the core reads them: float32, int16 holding the bfloat16 bits, or float16."""
        if self.panels.dtype == torch.bfloat16:
            return self.panels.view(torch.int16).numpy()
        return self.panels.numpy()

    def rows_at(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ids[...] of the matrix -> float32 [..., K], as torch.nn.functional.embedding would give (a tied
        embedding)."""
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.rows:
            raise IndexError(f"ids: expected row indices in [0, {self.rows}), got {int(ids.min())}..{int(ids.max())}")
        # a numpy gather: torch's advanced indexing here runs a parallel region, whose OpenMP workers may then spin
        # into the native forward that follows (torch_threads.py)
        flat = ids.reshape(-1).numpy()
        rows = self.native()[flat // 8, :, flat % 8]  # [n, K] in the storage's dtype
        if self.panels.dtype == torch.bfloat16:  # int16 bits -> the float32 with those upper 16 bits, exactly
            rows = (rows.astype(np.int32) << 16).view(np.float32)
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).view(*ids.shape, self.panels.shape[1])

    def unpacked(self) -> torch.Tensor:
        """A new float32 [rows, K] tensor with the original layout."""
        return self.panels.permute(0, 2, 1).reshape(-1, self.panels.shape[1])[: self.rows].float().contiguous()


STORAGES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pack_panels(weight: torch.Tensor, storage: str = "auto") -> PanelWeight:
    """Copy a float32 CPU weight [N, K] into panels of 8 rows (zero-padded) for panel_linear.

    storage: "float32", "bfloat16" or "float16" (every weight must be exact there: ValueError otherwise), or
    "auto": bfloat16 when every weight is a bfloat16 value, else float16 when every weight is a float16 value,
    else float32.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D torch.Tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if storage != "auto" and storage not in STORAGES:
        raise ValueError(f"storage: expected one of auto, {', '.join(STORAGES)}, got {storage!r}")
    _diagnose(torch.empty(0, weight.shape[1]), weight, None)
    n, k = weight.shape
    values = weight.detach().numpy()
    if storage == "auto":
        exact = (s for s in ("bfloat16", "float16") if weight.numel() and _native.storage_exact(values, s))
        storage = next(exact, "float32")
    packed = PanelWeight(torch.empty(((n + 7) // 8, k, 8), dtype=STORAGES[storage]), n)
    _native.pack_panels(values, packed.native())
    return packed


def panel_linear(x: torch.Tensor, weight: PanelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + bias for W packed by pack_panels: x [..., K] contiguous float32 CPU -> [..., N]."""
    try:
        rows = x.numpy().reshape(math.prod(x.shape[:-1]), x.shape[-1])
        out = np.empty((rows.shape[0], weight.rows), dtype=np.float32)
        _native.panel_linear(rows, weight.native(), weight.rows, None if bias is None else bias.numpy(), out)
    except (TypeError, RuntimeError, ValueError, IndexError, AttributeError):
        if not isinstance(weight, PanelWeight):
            raise ValueError(f"weight: expected a PanelWeight (pack_panels), got {type(weight).__name__}") from None
        _diagnose(x, weight.panels.new_empty(weight.rows, weight.panels.shape[1]), bias)
        raise
    return torch.from_numpy(out).view(*x.shape[:-1], weight.rows)


def value_head(x: torch.Tensor, norm: torch.Tensor, eps: float, w1: torch.Tensor, b1: torch.Tensor,
               w2: torch.Tensor, b2: float) -> torch.Tensor:
    """The LenVM head in one native call: x [R, D] contiguous fp32 -> z [R] = b2 + w2 . silu(w1 rms_norm(x) + b1)."""
    z = np.empty(x.shape[0], dtype=np.float32)
    _native.value_head(x.numpy(), norm.numpy(), eps, w1.numpy(), b1.numpy(), w2.numpy(), b2, z)
    return torch.from_numpy(z)


def set_num_threads(n: int) -> None:
    """Use `n` threads (calling thread included) in native CPU operators; n in [1, 1024]."""
    _native.set_num_threads(n)


def get_num_threads() -> int:
    """Threads (calling thread included) that native CPU operators use."""
    return _native.get_num_threads()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of contiguous fp32 CPU rows x[..., D] times weight[D] (one native call)."""
    rows = x.reshape(-1, x.shape[-1]).numpy()
    out = np.empty_like(rows)
    _native.rms_norm(rows, weight.numpy(), eps, out)
    return torch.from_numpy(out).view(x.shape)


def token_stats(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen-token statistics of contiguous fp32 CPU logits[R, V] and int64 tokens[R] or [R, W]: (log p float64,
    1-based rank int64), both shaped like tokens, in one native pass per row."""
    logp = np.empty(tuple(tokens.shape), dtype=np.float64)
    rank = np.empty(tuple(tokens.shape), dtype=np.int64)
    _native.token_stats(logits.numpy(), tokens.numpy(), logp, rank)
    return torch.from_numpy(logp), torch.from_numpy(rank)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, span: np.ndarray,
                     scale: float) -> torch.Tensor:
    """One query per row and head: q[B, H, Dh] over k/v_cache[Bc, Hkv, C, Dh] positions < span[b] -> [B, H, Dh]."""
    q_array = q.contiguous().numpy()
    out = np.empty_like(q_array)
    _native.decode_attention(q_array, k_cache.numpy(), v_cache.numpy(), span, scale, out)
    return torch.from_numpy(out)


def rope_cache_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, positions: np.ndarray, heads: int, scale: float) -> torch.Tensor:
    """Decode-step attention from the fused projection qkv[B, (H + 2 Hkv) Dh]: RoPE, cache write at
    positions[b] (in place), attention over positions 0..positions[b] -> [B, H Dh]."""
    q = qkv.reshape(qkv.shape[0], -1).numpy()
    out = np.empty((q.shape[0], heads * k_cache.shape[-1]), dtype=np.float32)
    _native.rope_cache_attention(q, cos.numpy(), sin.numpy(), k_cache.numpy(), v_cache.numpy(), positions, heads,
                                 scale, out)
    return torch.from_numpy(out)


def rope_lookahead_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, positions: np.ndarray, heads: int, k: int, scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lookahead attention of k candidates per row from qkv[B, k, (H + 2 Hkv) Dh] at positions[b]:
    -> (attention [B, k, H Dh], k_new [B, Hkv, k, Dh], v_new [B, Hkv, k, Dh]); the caches are only read."""
    B = positions.shape[0]
    rows = qkv.reshape(B * k, -1).numpy()
    kv_heads, dh = k_cache.shape[1], k_cache.shape[3]
    out = np.empty((B * k, heads * dh), dtype=np.float32)
    k_new = np.empty((B, kv_heads, k, dh), dtype=np.float32)
    v_new = np.empty_like(k_new)
    _native.rope_lookahead_attention(rows, cos.numpy(), sin.numpy(), k_cache.numpy(), v_cache.numpy(), positions,
                                     heads, scale, out, k_new, v_new)
    return torch.from_numpy(out).view(B, k, -1), torch.from_numpy(k_new), torch.from_numpy(v_new)


def _trunk_array(value: torch.Tensor | PanelWeight | None) -> np.ndarray | None:
    if value is None:
        return None
    return value.native() if isinstance(value, PanelWeight) else value.numpy()


class Trunk:
    """The decoder layers on the native core for CPU fp32 weights (csrc/trunk.h).

        trunk = Trunk(cfg, layers, scale)                 # scale: the attention's 1 / sqrt(Dh)
        trunk.set_cache(k_cache, v_cache, cos, sin)      # per layer [Bc, Hkv, C, Dh]; tables [C, Dh]
        trunk.clear_cache()                              # forget them (a forward then raises ValueError)
        x = trunk.decode(x[B, D], positions int32[B])    # -> new hidden states [B, D]; the cache gets the tokens
        x, pending = trunk.lookahead(x[B, K, D], positions int32[B])
                                                         # -> [B, K, D] and the candidates' K/V (cache untouched)
        trunk.commit(pending, slot int64[B], positions)  # candidate slot[b]'s K/V into position positions[b]
    """

    def __init__(self, cfg: ModelConfig, layers: Sequence[LayerWeights], scale: float) -> None:
        self.cfg = cfg
        weights = [tuple(_trunk_array(getattr(layer, f)) for f in _TRUNK_FIELDS) for layer in layers]
        self._core = _native.Trunk(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   cfg.intermediate_size, cfg.rms_norm_eps, scale, weights)

    def set_cache(self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], cos: torch.Tensor,
                  sin: torch.Tensor) -> None:
        self._core.set_cache([t.numpy() for t in k], [t.numpy() for t in v], cos.numpy(), sin.numpy())

    def clear_cache(self) -> None:
        """Drop the references to the caches (before new ones are allocated)."""
        self._core.clear_cache()

    def decode(self, x: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        out = x.reshape(x.shape[0], -1).numpy().copy()
        self._core.decode(out, positions)
        return torch.from_numpy(out)

    def lookahead(self, x: torch.Tensor, positions: np.ndarray) -> tuple[torch.Tensor, tuple[np.ndarray, np.ndarray]]:
        B, K, D = x.shape
        cfg = self.cfg
        out = x.reshape(B * K, D).numpy().copy()
        k_new = np.empty((cfg.num_layers, B, cfg.num_kv_heads, K, cfg.head_dim), dtype=np.float32)
        v_new = np.empty_like(k_new)
        self._core.lookahead(out, positions, k_new, v_new)
        return torch.from_numpy(out).view(B, K, D), (k_new, v_new)

    def commit(self, pending: tuple[np.ndarray, np.ndarray], slot: torch.Tensor, positions: np.ndarray) -> None:
        self._core.commit(pending[0], pending[1], slot.to(torch.int64).contiguous().numpy(), positions)
