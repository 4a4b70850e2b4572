"""Compact decoder for Llama / Qwen2 / Qwen3 checkpoints with a static, preallocated KV cache.

Shapes: B rows, S sequence, D hidden, V vocab, H query heads, Hkv key/value heads, G = H / Hkv,
Dh head dim, C cache capacity (tokens per row).

    model = CausalLM(cfg, weights)
    model.allocate(batch=B, capacity=C)            # the only place KV memory is allocated
    x = model.prefill(ids[B, S], lengths)          # right-padded prompts -> last hidden x[B, D]
    x = model.decode_step(ids[B], positions)       # one token per row at its own position -> x[B, D]
    logits = model.logits(x)                       # final RMSNorm + LM head -> [B, V] fp32
    x = model.lookahead(cand[B, K], positions)     # K sibling candidates per row -> x[B, K, D]
    model.commit(slot[B], positions)               # keep the chosen candidate's K/V in the cache

Hidden states leave the trunk *before* the final RMSNorm, so that the heads (LM head, value head)
can fuse the norm into their own kernels; `normed(x)` applies it.

Row b owns cache slot b; its tokens sit at cache positions 0..len_b-1 and its RoPE position equals
the cache position, so rows of different lengths decode together with a per-row key mask. Prefill
of right-padded prompts needs only the causal mask: a real token never sees the pads after it, and
the pads' cache entries are overwritten by the row's later tokens before anyone attends to them.
The lookahead places every candidate of row b at the same position p_b; each attends to the row's
cached prefix (positions < p_b) and to itself only (tree mask), so its output equals a causal decode
of that token alone. The candidates' K/V are held until `commit` copies the chosen one into the
cache, so the chosen token is never recomputed.
All math mirrors transformers' modules (RMSNorm in fp32, rotate-half RoPE, SiLU-gated MLP).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_ops
from .config import ModelConfig, RopeConfig
from .weights import LayerWeights, ModelWeights

_MATRICES = ("qkv", "o", "gate_up", "down")


def right_padded(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[int]]:
    """Token id lists -> (ids[B, S] int64 padded with 0 on the right, lengths): prefill's input."""
    lengths = [len(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    return ids, lengths


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [Dh/2] in fp32, with linear or llama3 scaling applied."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def panel_packer(device: torch.device, dtype: torch.dtype, storage: str = "auto"
                 ) -> Callable[[torch.Tensor], cpu_ops.PanelWeight] | None:
    """How a model on (device, dtype) keeps its matrices: CPU fp32 packs them in panels (cpu_ops.pack_panels with
    `storage`), other models keep the tensors (None). load_weights(pack=...) applies it matrix by matrix."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    return functools.partial(cpu_ops.pack_panels, storage=storage)


def _packed(weights: ModelWeights, storage: str) -> ModelWeights:
    """CPU fp32: every layer matrix and the LM head as panels (cpu_ops.PanelWeight), which the native kernels
    stream faster than the plain layout; a tied embedding becomes the packed head, read row by row. Nothing is
    kept twice: the returned weights share no unpacked matrix with the argument (matrices that come packed, from
    load_weights(pack=panel_packer(...)), are kept as they are). `storage` as cpu_ops.pack_panels: "auto" keeps
    the matrices of a bfloat16 or float16 checkpoint in 16 bits (half the bytes, the same results)."""
    def pack(matrix: torch.Tensor | cpu_ops.PanelWeight) -> cpu_ops.PanelWeight:
        return matrix if isinstance(matrix, cpu_ops.PanelWeight) else cpu_ops.pack_panels(matrix, storage)

    layers = [replace(layer, **{name: pack(getattr(layer, name)) for name in _MATRICES}) for layer in weights.layers]
    if not weights.lm_head.numel():  # a separate LenVM backbone never runs an LM head
        return replace(weights, layers=layers)
    head = pack(weights.lm_head)
    embed = head if weights.lm_head is weights.embed else weights.embed
    return replace(weights, layers=layers, lm_head=head, embed=embed)


class CausalLM:
    """Inference-only decoder over ModelWeights; call under torch.inference_mode()."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, *, panel_storage: str = "auto") -> None:
        """panel_storage: how a CPU fp32 model stores its packed matrices ("auto", "float32", "bfloat16",
        "float16"; see cpu_ops.pack_panels); the results do not depend on it."""
        self.cfg = cfg
        self.device = weights.final_norm.device
        self.dtype = weights.final_norm.dtype
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self._native_linear = self.device.type == "cpu" and self.dtype == torch.float32
        if self._native_linear:
            weights = _packed(weights, panel_storage)
        self.w = weights
        self.k_cache: list[torch.Tensor] = []  # per layer [Bcap, Hkv, C, Dh]
        self.v_cache: list[torch.Tensor] = []
        self.capacity = 0
        self.batch_capacity = 0
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer candidate (k, v) [B, Hkv, K, Dh]
        # CPU fp32: decode steps and lookaheads run every layer in one native call
        self._trunk = cpu_ops.Trunk(cfg, weights.layers, self.scale) if self._native_linear else None
        self._pending_native: tuple[np.ndarray, np.ndarray] | None = None  # the native lookahead's K/V

    # ---- memory -------------------------------------------------------------------------------
    def allocate(self, *, batch: int, capacity: int) -> None:
        """Make room for `batch` rows of `capacity` tokens; reuses the cache when it is big enough."""
        if batch <= self.batch_capacity and capacity <= self.capacity:
            return
        batch, capacity = max(batch, self.batch_capacity), max(capacity, self.capacity)
        cfg = self.cfg
        shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        if self._trunk is not None:
            self._trunk.clear_cache()
        self.k_cache, self.v_cache = [], []  # free the old cache before allocating the new one
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(cfg.num_layers)]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(cfg.num_layers)]
        freqs = torch.outer(torch.arange(capacity, dtype=torch.float32), rope_inv_freq(cfg.rope, cfg.head_dim))
        angles = torch.cat((freqs, freqs), dim=-1)  # [C, Dh]
        self._cos = angles.cos().to(self.device, self.dtype)
        self._sin = angles.sin().to(self.device, self.dtype)
        self.batch_capacity, self.capacity = batch, capacity
        if self._trunk is not None:
            self._trunk.set_cache(self.k_cache, self.v_cache, self._cos, self._sin)

    # ---- forward pieces -------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, weight: torch.Tensor | cpu_ops.PanelWeight,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T + bias. A CPU fp32 model holds its matrices packed in panels (cpu_ops.PanelWeight), whose
        native kernel reads each weight once for all rows of x and gives every row the same bits whatever the
        batch; other devices and dtypes use torch."""
        if isinstance(weight, cpu_ops.PanelWeight):
            return cpu_ops.panel_linear(x.contiguous(), weight, bias)
        return F.linear(x, weight, bias)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._native_linear and x.is_contiguous():  # one native call instead of ~6 torch ops
            return cpu_ops.rms_norm(x, weight, self.cfg.rms_norm_eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.cfg.rms_norm_eps).to(x.dtype) * weight

    def _qkv(self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x[B, S, D] -> q[B, H, S, Dh], k, v[B, Hkv, S, Dh], RoPE applied to q and k."""
        cfg = self.cfg
        B, S, _ = x.shape
        qkv = self._linear(self._norm(x, layer.input_norm), layer.qkv, layer.qkv_bias)
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(B, S, cfg.num_heads, cfg.head_dim)
        k = k.view(B, S, cfg.num_kv_heads, cfg.head_dim)
        if layer.q_norm is not None:
            q = self._norm(q, layer.q_norm)
            k = self._norm(k, layer.k_norm)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H|Hkv, S, Dh]
        v = v.view(B, S, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _mlp_residual(self, layer: LayerWeights, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + self._linear(attn, layer.o, layer.o_bias)
        gate, up = self._linear(self._norm(x, layer.post_norm), layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
        return x + self._linear(F.silu(gate) * up, layer.down, layer.down_bias)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows ids[...] -> [..., D] in the model's dtype (an embedding kept in 16 bits is widened)."""
        if isinstance(self.w.embed, cpu_ops.PanelWeight):
            return self.w.embed.rows_at(ids)
        return F.embedding(ids, self.w.embed).to(self.dtype)

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm: last hidden states [..., D] -> the tensor the LM head consumes."""
        return self._norm(x, self.w.final_norm)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden states [..., D] (before the final norm) -> fp32 logits [..., V]."""
        return self.lm_logits(self.normed(x))

    def lm_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [..., D] -> fp32 logits [..., V]."""
        return self._linear(normed, self.w.lm_head).float()

    # ---- prefill ----------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, lengths: list[int], *, all_positions: bool = False,
                slots: list[int] | None = None) -> torch.Tensor:
        """Run right-padded prompts ids[B, S] into cache slots 0..B-1 (or `slots`) from position 0.

        Returns last hidden states (before the final norm) at each row's last prompt token, x[B, D],
        or at every position, x[B, S, D], when all_positions is set. With `slots`, the other rows of
        the cache are left as they are (a continuous batch refills finished rows this way).
        """
        B, S = ids.shape
        cfg = self.cfg
        cos, sin = self._cos[:S], self._sin[:S]  # [S, Dh], broadcast over [B, H, S, Dh]
        rows = slice(0, B) if slots is None else torch.tensor(slots, device=ids.device)
        x = self._embed(ids)  # [B, S, D]
        for i, layer in enumerate(self.w.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.k_cache[i][rows, :, :S] = k
            self.v_cache[i][rows, :, :S] = v
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            x = self._mlp_residual(layer, x, attn.transpose(1, 2).reshape(B, S, cfg.num_heads * cfg.head_dim))
        if all_positions:
            return x
        last = torch.tensor([n - 1 for n in lengths], device=ids.device)
        return x[torch.arange(B, device=ids.device), last]  # [B, D]

    # ---- decode -----------------------------------------------------------------------------
    def decode_step(self, ids: torch.Tensor, positions: list[int],
                    pos_tensor: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row: ids[B] at cache positions `positions` (host ints) -> x[B, D].

        pos_tensor, when given, is `positions` already on the device as int64 (saves a copy per step).
        """
        cfg = self.cfg
        B = ids.shape[0]
        x = self._embed(ids.view(B, 1))  # [B, 1, D]
        if self._trunk is not None:
            return self._trunk.decode(x, np.array(positions, dtype=np.int32))
        G = cfg.num_heads // cfg.num_kv_heads
        first = positions[0]
        span = max(positions) + 1  # keys attended this step: cache positions 0..span-1
        cos, sin, same = self._rope_at(positions, pos_tensor)
        mask = None
        if not same:
            pos = pos_tensor if pos_tensor is not None else torch.tensor(positions, device=self.device)
            mask = self._key_mask(pos, span, through=True)
            rows = torch.arange(B, device=self.device)
        for i, layer in enumerate(self.w.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # q[B, H, 1, Dh], k/v[B, Hkv, 1, Dh]
            kc, vc = self.k_cache[i], self.v_cache[i]
            if same:
                kc[:B, :, first] = k[:, :, 0]
                vc[:B, :, first] = v[:, :, 0]
            else:
                kc[rows, :, pos] = k[:, :, 0]
                vc[rows, :, pos] = v[:, :, 0]
            # Grouped-query attention without repeating K/V: the G query heads of a KV head form a
            # [G, Dh] block that multiplies the shared [span, Dh] keys.
            qg = q.view(B, cfg.num_kv_heads, G, cfg.head_dim)
            scores = torch.matmul(qg, kc[:B, :, :span].transpose(-1, -2)).float() * self.scale  # [B, Hkv, G, span]
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1).to(self.dtype)
            attn = torch.matmul(probs, vc[:B, :, :span])  # [B, Hkv, G, Dh]
            x = self._mlp_residual(layer, x, attn.view(B, 1, cfg.num_heads * cfg.head_dim))
        return x.view(B, -1)

    def _key_mask(self, pos: torch.Tensor, span: int, *, through: bool) -> torch.Tensor:
        """Additive mask [B, 1, 1, span]: row b sees keys up to pos[b] (through) or before it."""
        keys = torch.arange(span, device=self.device).view(1, span)
        keep = keys <= pos.view(-1, 1) if through else keys < pos.view(-1, 1)  # [B, span]
        mask = torch.zeros(pos.shape[0], 1, 1, span, device=self.device, dtype=torch.float32)
        return mask.masked_fill_(~keep.view(pos.shape[0], 1, 1, span), float("-inf"))

    # ---- lookahead --------------------------------------------------------------------------
    def _rope_at(self, positions: list[int], pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """cos/sin for one position per row: [Dh] when all rows share it, else [B, 1, 1, Dh]."""
        first = positions[0]
        if all(p == first for p in positions):
            return self._cos[first], self._sin[first], True
        pos = pos if pos is not None else torch.tensor(positions, device=self.device)
        B = len(positions)
        return self._cos[pos].view(B, 1, 1, -1), self._sin[pos].view(B, 1, 1, -1), False

    def lookahead(self, cand: torch.Tensor, positions: list[int],
                  pos_tensor: torch.Tensor | None = None) -> torch.Tensor:
        """Candidates cand[B, K] all at position positions[b] of their row -> last hidden x[B, K, D].

        Each candidate sees the row's cached prefix (positions < p_b) and itself; siblings never see
        each other. The cache is not modified: `commit` stores the chosen candidate's K/V.
        """
        cfg = self.cfg
        B, K = cand.shape
        x = self._embed(cand)  # [B, K, D]
        self._pending, self._pending_native = [], None
        if self._trunk is not None:
            x, self._pending_native = self._trunk.lookahead(x, np.array(positions, dtype=np.int32))
            return x
        G, Hkv, Dh = cfg.num_heads // cfg.num_kv_heads, cfg.num_kv_heads, cfg.head_dim
        span = max(positions)  # prefix keys: cache positions 0..span-1
        cos, sin, same = self._rope_at(positions, pos_tensor)
        mask = None
        if not same:
            pos = pos_tensor if pos_tensor is not None else torch.tensor(positions, device=self.device)
            mask = self._key_mask(pos, span, through=False)
        for i, layer in enumerate(self.w.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # q[B, H, K, Dh], k/v[B, Hkv, K, Dh]
            self._pending.append((k, v))
            qg = q.reshape(B, Hkv, G * K, Dh)  # query (g, j) of KV head h: row g*K + j
            prefix = torch.matmul(qg, self.k_cache[i][:B, :, :span].transpose(-1, -2)).float()  # [B, Hkv, G*K, span]
            if mask is not None:
                prefix = prefix + mask
            own = (q.reshape(B, Hkv, G, K, Dh) * k.reshape(B, Hkv, 1, K, Dh)).sum(-1).float()  # [B, Hkv, G, K]
            scores = torch.cat((prefix, own.reshape(B, Hkv, G * K, 1)), dim=-1) * self.scale
            probs = torch.softmax(scores, dim=-1).to(self.dtype)
            attn = torch.matmul(probs[..., :span], self.v_cache[i][:B, :, :span])  # [B, Hkv, G*K, Dh]
            own_v = probs[..., span:].reshape(B, Hkv, G, K, 1) * v.reshape(B, Hkv, 1, K, Dh)
            attn = attn.view(B, Hkv, G, K, Dh) + own_v
            attn = attn.permute(0, 3, 1, 2, 4).reshape(B, K, cfg.num_heads * Dh)  # head h = kv * G + g
            x = self._mlp_residual(layer, x, attn)
        return x

    def commit(self, slot: torch.Tensor, positions: list[int], pos_tensor: torch.Tensor | None = None) -> None:
        """Store candidate slot[b] of the last lookahead at cache position positions[b] of row b."""
        if self._pending_native is not None:
            self._trunk.commit(self._pending_native, slot, np.array(positions, dtype=np.int32))
            self._pending_native = None
            return
        if not self._pending:
            raise RuntimeError("commit() without a preceding lookahead()")
        B = slot.shape[0]
        rows = torch.arange(B, device=self.device)
        pos = pos_tensor if pos_tensor is not None else torch.tensor(positions, device=self.device)
        for i, (k, v) in enumerate(self._pending):
            self.k_cache[i][rows, :, pos] = k[rows, :, slot]
            self.v_cache[i][rows, :, pos] = v[rows, :, slot]
        self._pending = []
