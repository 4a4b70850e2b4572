"""`lenvm_rt.cpu_ops.pack_panels` / `panel_linear`: the layout, the summation-order contract and bad input.

Contract (csrc/panel_linear.h): out[i, j] = (x[i, 0] w[j, 0] + x[i, 1] w[j, 1] + ... in increasing order, one
accumulator from 0) + bias[j], each step a fused multiply-add on the AVX2 kernel and a rounded product then a
rounded sum on the portable one. The tests rebuild that sequence in numpy and ask for the same bits, so a kernel
that sums in any other order (or drops a term, or reads the wrong panel lane) fails.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from linear_cases import make, restore_threads, sequential_sums  # noqa: F401 (an autouse fixture)
from subproc import run_python

from lenvm_rt import _native, cpu_ops
from lenvm_rt.model import CausalLM
from lenvm_rt.weights import load_weights, read_config


def test_packing_layout_and_round_trip() -> None:
    _, w, _ = make(1, 19, 5)
    packed = cpu_ops.pack_panels(w)
    assert packed.panels.shape == (3, 5, 8) and packed.rows == 19 and packed.shape == (19, 5)
    assert packed.numel() == w.numel() and packed.dtype == torch.float32 and packed.element_size() == 4
    for p in range(3):
        for lane in range(8):
            row = 8 * p + lane
            expected = w[row] if row < 19 else torch.zeros(5)
            assert torch.equal(packed.panels[p, :, lane], expected), (p, lane)
    assert torch.equal(packed.unpacked(), w)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("m", "n", "k"), [
    (1, 1, 1), (1, 9, 3), (1, 8, 64), (1, 100, 33), (1, 257, 40),  # one row: tiles of 1-4 panels, padded lanes
    (2, 7, 17), (3, 24, 8), (4, 40, 12), (5, 33, 9), (15, 61, 30), (17, 96, 16), (70, 50, 7),  # row groups
    # 2-16 row groups: tasks of several panel groups that prefetch the next one (last group 1-2 panels short);
    # 17 groups: no prefetch
    (9, 530, 24), (15, 1000, 40), (64, 203, 20), (65, 203, 20),
])
def test_avx2_or_portable_kernel_follows_the_sequential_contract(m: int, n: int, k: int, bias: bool) -> None:
    x, w, b = make(m, n, k, seed=m * 1000 + n)
    out = cpu_ops.panel_linear(x, cpu_ops.pack_panels(w), b)
    fused = _native.linear_kernel() == "avx2_fma"
    assert out.shape == (m, n) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), sequential_sums(x, w, b, fused))


@pytest.mark.parametrize(("m", "n", "k"), [(1, 960, 576), (15, 576, 1536), (64, 100, 576), (300, 40, 96)])
def test_close_to_float64_at_model_sizes(m: int, n: int, k: int) -> None:
    x, w, b = make(m, n, k, seed=7)
    out = cpu_ops.panel_linear(x, cpu_ops.pack_panels(w), b).double()
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    scale = torch.nn.functional.linear(x.double().abs(), w.double().abs(), b.double().abs()).max().item()
    # an ordered fp32 sum of k terms errs by at most ~k eps of the magnitude; random signs keep it far below
    assert (out - ref).abs().max().item() <= 8 * k ** 0.5 * torch.finfo(torch.float32).eps * scale


def test_rows_and_thread_counts_give_the_same_bits() -> None:
    x, w, b = make(23, 130, 72, seed=3)
    packed = cpu_ops.pack_panels(w)
    results = []
    for threads in (1, 2, 3):
        cpu_ops.set_num_threads(threads)
        results.append(cpu_ops.panel_linear(x, packed, b))
    assert all(torch.equal(results[0], r) for r in results[1:])
    for i in range(23):  # alone (the one-row tiles) and inside groups of every size
        assert torch.equal(cpu_ops.panel_linear(x[i:i + 1], packed, b), results[0][i:i + 1]), i
        assert torch.equal(cpu_ops.panel_linear(x[i:], packed, b), results[0][i:]), i


def test_leading_dimensions_and_empty_inputs() -> None:
    x, w, b = make(6, 11, 5)
    packed = cpu_ops.pack_panels(w)
    out = cpu_ops.panel_linear(x.view(2, 3, 5), packed, b)
    assert out.shape == (2, 3, 11) and torch.equal(out.reshape(6, 11), cpu_ops.panel_linear(x, packed, b))
    assert cpu_ops.panel_linear(torch.empty(0, 5), packed, b).shape == (0, 11)
    zero_k = cpu_ops.panel_linear(torch.empty(3, 0), cpu_ops.pack_panels(torch.empty(4, 0)), torch.ones(4))
    assert torch.equal(zero_k, torch.ones(3, 4))


@pytest.mark.parametrize(("call", "pattern"), [
    (lambda x, p, b: cpu_ops.panel_linear(x, p.unpacked(), b), "weight: expected a PanelWeight"),
    (lambda x, p, b: cpu_ops.panel_linear(x.double(), p, b), "x: expected a torch.float32"),
    (lambda x, p, b: cpu_ops.panel_linear(x[:, :4].contiguous(), p, b), r"panels: expected shape \(2, 4, 8\)"),
    (lambda x, p, b: cpu_ops.panel_linear(x, p, b[:-1]), r"bias: expected shape \(11,\)"),
    (lambda x, p, b: cpu_ops.panel_linear(x.t(), p, b), "x: expected a contiguous tensor"),
    (lambda x, p, b: cpu_ops.pack_panels(torch.ones(3)), "weight: expected a 2-D torch.Tensor"),
    (lambda x, p, b: cpu_ops.pack_panels(torch.ones(3, 2, dtype=torch.float64)), "weight: expected a torch.float32"),
])
def test_bad_input_is_named_and_the_kernel_stays_usable(call, pattern) -> None:
    x, w, b = make(5, 11, 5)
    packed = cpu_ops.pack_panels(w)
    before = cpu_ops.panel_linear(x, packed, b)
    with pytest.raises(ValueError, match=pattern):
        call(x, packed, b)
    assert torch.equal(cpu_ops.panel_linear(x, packed, b), before)


def test_bad_arrays_to_the_core_are_named_before_writing() -> None:
    x, panels = np.ones((2, 5), np.float32), np.ones((2, 5, 8), np.float32)
    out = np.full((2, 11), 7.0, np.float32)
    one_panel = np.ones((1, 5, 8), np.float32)
    for args, pattern in [
        ((x, panels, -1, None, out), "n: expected a row count"),
        ((x, panels, 17, None, out), r"panels: expected shape \(3, 5, 8\)"),
        ((x, panels, 11, np.ones(10, np.float32), out), r"bias: expected shape \(11,\)"),
        ((x, panels, 11, None, np.empty((2, 12), np.float32)), r"out: expected shape \(2, 11\)"),
        ((x, one_panel, 8, None, one_panel.reshape(-1)[:16].reshape(2, 8)), "out: expected memory disjoint"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            _native.panel_linear(*args)
    assert (out == 7.0).all()
    read_only = np.empty((2, 11), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writeable array"):
        _native.panel_linear(x, panels, 11, None, read_only)
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 3, 8\)"):
        _native.pack_panels(np.ones((3, 3), np.float32), np.empty((1, 3, 7), np.float32))
    with pytest.raises(TypeError):
        _native.panel_linear(x.astype(np.float64), panels, 11, None, out)


PORTABLE_CHECK = """
    import numpy as np, torch
    from lenvm_rt import _native, cpu_ops
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(9, 37, generator=g), torch.randn(21, 37, generator=g), torch.randn(21, generator=g)
    acc = np.zeros((9, 21), np.float32)
    for kk in range(37):
        product = np.outer(x[:, kk].numpy().astype(np.float64), w[:, kk].numpy().astype(np.float64))
        acc = acc + product.astype(np.float32)
    out = cpu_ops.panel_linear(x, cpu_ops.pack_panels(w), b).numpy()
    print(_native.linear_kernel(), bool(np.array_equal(out, acc + b.numpy())))
"""


def test_portable_kernel_rounds_product_and_sum_apart() -> None:
    result = run_python(textwrap.dedent(PORTABLE_CHECK), timeout=120,
                        env={**os.environ, "LENVM_RT_LINEAR_KERNEL": "scalar"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["scalar", "True"]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_cpu_model_holds_its_matrices_once_as_panels(tmp_path, tied: bool) -> None:
    directory = make_checkpoint(tmp_path, "llama", tied=tied)
    cfg = read_config(directory)
    weights = load_weights(directory, cfg, device=torch.device("cpu"), dtype=torch.float32)
    model = CausalLM(cfg, weights)
    for ours, theirs in zip(model.w.layers, weights.layers):
        for name in ("qkv", "o", "gate_up", "down"):
            packed = getattr(ours, name)
            assert isinstance(packed, cpu_ops.PanelWeight) and torch.equal(packed.unpacked(), getattr(theirs, name))
            assert not isinstance(getattr(theirs, name), cpu_ops.PanelWeight)  # the caller's weights are untouched
    assert isinstance(model.w.lm_head, cpu_ops.PanelWeight)
    assert torch.equal(model.w.lm_head.unpacked(), weights.lm_head)
    assert (model.w.embed is model.w.lm_head) == tied  # a tied embedding is the packed head, not a second copy
    ids = torch.tensor([[0, 5, 383], [17, 17, 2]])
    assert torch.equal(model._embed(ids), torch.nn.functional.embedding(ids, weights.embed))
    with pytest.raises(IndexError, match=r"ids: expected row indices in \[0, 384\)" if tied else "out of range"):
        model._embed(torch.tensor([384]))
    x = torch.randn(3, cfg.hidden_size)
    ref = torch.nn.functional.linear(x.double(), weights.lm_head.double())
    assert (model.lm_logits(x).double() - ref).abs().max().item() < 1e-4
