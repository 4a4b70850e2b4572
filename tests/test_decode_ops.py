"""Native per-token operators of the decode step against plain torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lenvm_rt import cpu_ops
from lenvm_rt.model import _rotate_half


def test_rms_norm_matches_torch():
    torch.manual_seed(0)
    x, w = torch.randn(5, 3, 96), torch.randn(96)
    ref = torch.nn.functional.rms_norm(x, (96,), eps=1e-5) * w
    assert (cpu_ops.rms_norm(x, w, 1e-5) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("B", "H", "Hkv", "Dh"), [(1, 9, 3, 64), (3, 4, 2, 24), (2, 4, 4, 8)])
def test_decode_attention_matches_torch(B, H, Hkv, Dh):
    torch.manual_seed(1)
    C = 40
    q, k, v = torch.randn(B, H, Dh), torch.randn(B + 1, Hkv, C, Dh), torch.randn(B + 1, Hkv, C, Dh)
    span = np.array([5 + 7 * b for b in range(B)], dtype=np.int32)
    out = cpu_ops.decode_attention(q, k, v, span, 0.3)
    for b in range(B):
        n = int(span[b])
        kk = k[b, :, :n].repeat_interleave(H // Hkv, 0)
        vv = v[b, :, :n].repeat_interleave(H // Hkv, 0)
        ref = torch.softmax(q[b].unsqueeze(1) @ kk.transpose(1, 2) * 0.3, -1) @ vv  # [H, 1, Dh]
        assert (out[b] - ref[:, 0]).abs().max().item() <= 1e-5


def test_rope_cache_attention_writes_the_cache_and_attends():
    torch.manual_seed(2)
    B, H, Hkv, Dh, C = 2, 4, 2, 16, 32
    qkv = torch.randn(B, (H + 2 * Hkv) * Dh)
    angles = torch.rand(C, Dh // 2) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    k, v = torch.randn(B, Hkv, C, Dh), torch.randn(B, Hkv, C, Dh)
    k_ref, v_ref = k.clone(), v.clone()
    positions = np.array([3, 9], dtype=np.int32)
    out = cpu_ops.rope_cache_attention(qkv, cos, sin, k, v, positions, H, 0.25)
    q, kn, vn = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], -1)
    for b, p in enumerate(positions.tolist()):
        qb = q[b].view(H, Dh) * cos[p] + _rotate_half(q[b].view(H, Dh)) * sin[p]
        k_ref[b, :, p] = kn[b].view(Hkv, Dh) * cos[p] + _rotate_half(kn[b].view(Hkv, Dh)) * sin[p]
        v_ref[b, :, p] = vn[b].view(Hkv, Dh)
        kk = k_ref[b, :, : p + 1].repeat_interleave(H // Hkv, 0)
        vv = v_ref[b, :, : p + 1].repeat_interleave(H // Hkv, 0)
        ref = (torch.softmax(qb.unsqueeze(1) @ kk.transpose(1, 2) * 0.25, -1) @ vv)[:, 0].reshape(-1)
        assert (out[b] - ref).abs().max().item() <= 1e-5
    assert (k - k_ref).abs().max().item() <= 1e-6 and torch.equal(v, v_ref)


def test_bad_shapes_are_named_and_nothing_breaks():
    with pytest.raises(ValueError, match="weight"):
        cpu_ops.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="span"):
        cpu_ops.decode_attention(torch.randn(1, 2, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8),
                                 np.array([9], dtype=np.int32), 1.0)
    with pytest.raises(ValueError, match="positions"):
        cpu_ops.rope_cache_attention(torch.randn(1, 32), torch.randn(4, 8), torch.randn(4, 8), torch.randn(1, 1, 4, 8),
                                     torch.randn(1, 1, 4, 8), np.array([4], dtype=np.int32), 2, 1.0)
    assert cpu_ops.rms_norm(torch.ones(1, 4), torch.ones(4), 0.0).sum().item() == pytest.approx(4.0)


def test_rope_lookahead_attention_rejects_bad_shapes_and_an_empty_prefix():
    qkv, table = torch.randn(2, 32), torch.randn(8, 8)
    cache = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="positions"):
        cpu_ops.rope_lookahead_attention(qkv, table, table, cache, cache, np.array([0], dtype=np.int32), 2, 2, 1.0)
    with pytest.raises(ValueError, match="qkv"):
        cpu_ops.rope_lookahead_attention(torch.randn(3, 32), table, table, cache, cache, np.array([3], dtype=np.int32),
                                         2, 2, 1.0)
    attn, k_new, v_new = cpu_ops.rope_lookahead_attention(qkv, table, table, cache, cache,
                                                          np.array([3], dtype=np.int32), 2, 2, 1.0)
    assert attn.shape == (1, 2, 16) and k_new.shape == v_new.shape == (1, 1, 2, 8)
