"""`value_head` and `fused_heads`: Triton kernels (compiled on CUDA, interpreted on CPU) against the torch references.

Tolerance rule (STYLE.md §3): kernel error against the fp32 reference (`*_ref(upcast=True)`) must be at most twice
the error of the same-dtype torch reference (`*_ref(upcast=False)`) plus a small atol. fp32 inputs run tl.dot with
input_precision="ieee", so fp32 keeps the tight 1e-5 atol instead of a TF32-sized one. Top-k ids are compared as
sets after dropping ids whose fp32 logit is within TIE_TOL of the k-th largest.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn as nn
from subproc import run_python

from lenvm_rt.kernels import FusedHeads, fused_heads, value_head
from lenvm_rt.kernels.fused_heads import fused_heads_ref
from lenvm_rt.kernels.value_head import rms_norm_ref, value_head_ref

ATOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = list(ATOL)
EPS = 1e-6
TIE_TOL = 1e-3  # fp32 logits closer than this to the k-th largest may legitimately swap in or out of the top-k

# (R, D) and (R, D, V, k): odd sizes on purpose; V is never a multiple of the 128-wide vocabulary tile, D = 96 takes
# two 64-wide K steps; k = 33 of V = 40 reaches deep into negative logits.
VALUE_SHAPES = [(1, 32), (3, 48), (7, 96), (5, 37)]
HEAD_SHAPES = [(1, 32, 100, 1), (3, 48, 257, 5), (7, 96, 1000, 15), (4, 33, 40, 33)]


class Inputs(NamedTuple):
    h: torch.Tensor  # [R, D]
    norm_weight: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]
    w1: torch.Tensor  # [D, D]
    b1: torch.Tensor  # [D]
    w2: torch.Tensor  # [1, D], the checkpoint layout
    b2: torch.Tensor  # [1]

    @property
    def value_args(self) -> tuple[torch.Tensor, ...]:
        return self.h, self.norm_weight, self.w1, self.b1, self.w2, self.b2


def make_inputs(R: int, D: int, V: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> Inputs:
    """Random weights at scales that give logits ~ N(0, 4) and value logits z of order 1."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float, shift: float = 0.0) -> torch.Tensor:
        return (shift + scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

    return Inputs(h=randn(R, D, scale=3.0), norm_weight=randn(D, scale=0.1, shift=1.0),
                  lm_head=randn(V, D, scale=2 / D**0.5), w1=randn(D, D, scale=D**-0.5), b1=randn(D, scale=0.1),
                  w2=randn(1, D, scale=D**-0.5), b2=randn(1, scale=0.1))


def _fail(name: str, out: torch.Tensor, ref: torch.Tensor, err: torch.Tensor, limit: str) -> None:
    bad = int((~torch.isfinite(out.double())).sum())
    idx = tuple(int(i) for i in np.unravel_index(int(torch.nan_to_num(err, nan=float("inf")).argmax()), err.shape))
    pytest.fail(f"{name}: worst error {err.max().item():.3g} at index {idx} (got {out[idx].item():.8g}, "
                f"reference {ref[idx].item():.8g}) exceeds {limit}; {bad} NaN/inf value(s) in the output")


def assert_within_2x(name: str, out: torch.Tensor, ref32: torch.Tensor, same: torch.Tensor, atol: float) -> None:
    """|out - ref32| <= 2 * max|same - ref32| + atol everywhere, with the worst index and NaN/inf count on failure."""
    assert out.shape == ref32.shape and out.dtype == ref32.dtype, f"{name}: {out.shape} {out.dtype} vs {ref32.shape}"
    if not out.numel():
        return
    err = (out.double() - ref32.double()).abs()
    base = (same.double() - ref32.double()).abs().max().item()
    if not err.max().item() <= 2 * base + atol:  # `not <=` also catches NaN
        _fail(name, out, ref32, err, f"2 x torch error {base:.3g} + atol {atol:g}")


def assert_close_rel(name: str, out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float = 0.0) -> None:
    """|out - ref| <= rtol * |ref| + atol everywhere, with the worst index and NaN/inf count on failure."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{name}: {out.shape} {out.dtype} vs {ref.shape}"
    if not out.numel():
        return
    err = (out.double() - ref.double()).abs() - rtol * ref.double().abs()
    if not err.max().item() <= atol:
        _fail(name, out, ref, err, f"rtol {rtol:g} * |reference| + atol {atol:g}")


def assert_topk_ids_match(ids: torch.Tensor, logits32: torch.Tensor, k: int) -> None:
    """Per row, the kernel's ids equal the reference top-k as sets once near-ties with the k-th logit are dropped."""
    want = torch.topk(logits32, k, dim=-1)
    for row in range(ids.shape[0]):
        kth = want.values[row, -1].item()
        near = set(torch.nonzero((logits32[row] - kth).abs() <= TIE_TOL).flatten().tolist())
        got_ids, want_ids = set(ids[row].tolist()) - near, set(want.indices[row].tolist()) - near
        assert got_ids == want_ids, (f"row {row}: ids only in kernel {sorted(got_ids - want_ids)}, only in reference "
                                     f"{sorted(want_ids - got_ids)} (k-th logit {kth:.6g}, {len(near)} near-ties)")


def assert_invariants(out: FusedHeads, R: int, D: int, V: int, k: int, dtype: torch.dtype) -> None:
    assert out.normed.shape == (R, D) and out.normed.dtype == dtype
    assert out.topk_ids.shape == (R, k) and out.topk_ids.dtype == torch.int64
    for t in (out.topk_logits, out.lse, out.z, out.u):
        assert t.dtype == torch.float32
    assert out.topk_logits.shape == (R, k) and out.lse.shape == out.z.shape == out.u.shape == (R,)
    assert ((out.topk_ids >= 0) & (out.topk_ids < V)).all(), f"ids out of [0, {V}): {out.topk_ids}"
    assert all(len(set(row)) == k for row in out.topk_ids.tolist()), f"repeated ids: {out.topk_ids}"
    assert (out.topk_logits[:, :-1] >= out.topk_logits[:, 1:]).all(), f"not sorted: {out.topk_logits}"
    assert (out.lse >= out.topk_logits[:, 0]).all(), f"lse {out.lse} below the max logit {out.topk_logits[:, 0]}"
    assert ((out.u > 0) & (out.u < 1)).all(), f"u outside (0, 1): {out.u}"
    assert_close_rel("u vs sigmoid(z)", out.u, torch.sigmoid(out.z), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- references (always run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_head_ref_matches_plain_linear_silu_linear(dtype):
    R, D = 5, 24
    x = make_inputs(R, D, 1, dtype)
    h32 = x.h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype) * x.norm_weight
    head = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, 1))
    with torch.no_grad():
        head[0].weight.copy_(x.w1.float())
        head[0].bias.copy_(x.b1.float())
        head[2].weight.copy_(x.w2.float())
        head[2].bias.copy_(x.b2.float())
        want = head(normed.float()).squeeze(-1)
    z, u = value_head_ref(*x.value_args, eps=EPS)
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u, torch.sigmoid(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rms_norm_ref(x.h, x.norm_weight, eps=EPS), normed, rtol=0, atol=0)


def test_fused_heads_ref_matches_plain_full_logits():
    R, D, V, k = 4, 24, 300, 7
    x = make_inputs(R, D, V, torch.float32)
    out = fused_heads_ref(*x, eps=EPS, k=k)
    logits = out.normed @ x.lm_head.T  # [R, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    order = torch.argsort(logits, dim=-1, descending=True)[:, :k]
    torch.testing.assert_close(out.lse, (logits - log_probs).mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.topk_logits, logits.gather(1, order), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.topk_ids, order)
    z, u = value_head_ref(*x.value_args, eps=EPS)
    assert torch.equal(out.z, z) and torch.equal(out.u, u)


def test_summary_weight_and_bias_accept_vector_or_checkpoint_layout():
    x = make_inputs(3, 16, 1, torch.float32)
    h, nw, w1, b1, w2, b2 = x.value_args
    z_row, _ = value_head(h, nw, w1, b1, w2, b2, eps=EPS, backend="torch")
    z_vec, _ = value_head(h, nw, w1, b1, w2.reshape(-1), b2.reshape(()), eps=EPS, backend="torch")
    assert torch.equal(z_row, z_vec)


def test_auto_runs_reference_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = make_inputs(3, 16, 50, torch.bfloat16)
    z, u = value_head(*x.value_args, eps=EPS)
    z_ref, u_ref = value_head_ref(*x.value_args, eps=EPS)
    assert torch.equal(z, z_ref) and torch.equal(u, u_ref)
    out = fused_heads(*x, eps=EPS, k=4)
    ref = fused_heads_ref(*x, eps=EPS, k=4)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_triton_backend_without_gpu_or_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = make_inputs(2, 16, 50, torch.float32)
    with pytest.raises(ValueError, match=r"value_head: backend='triton' cannot run on cpu.*TRITON_INTERPRET=1"):
        value_head(*x.value_args, eps=EPS, backend="triton")
    with pytest.raises(ValueError, match=r"fused_heads: backend='triton' cannot run on cpu"):
        fused_heads(*x, eps=EPS, k=3, backend="triton")


def test_kernels_import_and_fall_back_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lenvm_rt.kernels import HAS_TRITON, fused_heads, value_head\n"
        "assert not HAS_TRITON\n"
        "h, w = torch.randn(2, 8), torch.randn(8, 8)\n"
        "args = (h, torch.ones(8), w, torch.zeros(8), torch.randn(8), torch.zeros(1))\n"
        "z, u = value_head(*args, eps=1e-6)\n"
        "out = fused_heads(h, torch.ones(8), torch.randn(20, 8), *args[2:], eps=1e-6, k=3)\n"
        "assert z.shape == (2,) and out.topk_ids.shape == (2, 3)\n"
        "try:\n"
        "    value_head(*args, eps=1e-6, backend='triton')\n"
        "except ValueError as e:\n"
        "    assert 'HAS_TRITON=False' in str(e)\n"
        "else:\n"
        "    raise AssertionError('backend=triton ran without triton')\n"
    )
    result = run_python(code, timeout=120)
    assert result.returncode == 0, result.stderr


def _bad(name: str, x: Inputs) -> dict:
    """Arguments of fused_heads with `name` replaced by a wrong-shaped tensor."""
    D = x.h.shape[1]
    wrong = {
        "h": x.h[0],  # 1-D
        "norm_weight": x.norm_weight[:-1],
        "lm_head": x.lm_head[:, :-1],
        "w1": x.w1[:, :-1],
        "b1": x.b1.reshape(1, D),
        "w2": x.w2.reshape(D, 1),
        "b2": torch.zeros(2, dtype=x.b2.dtype),
    }
    return {**x._asdict(), name: wrong[name]}


@pytest.mark.parametrize("name", list(Inputs._fields))
def test_wrong_shape_raises_value_error_naming_the_argument(name):
    x = make_inputs(3, 16, 50, torch.float32)
    args = _bad(name, x)
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        fused_heads(**args, eps=EPS, k=3)
    if name != "lm_head":
        args.pop("lm_head")
        with pytest.raises(ValueError, match=rf"^{name}: expected"):
            value_head(**args, eps=EPS)


@pytest.mark.parametrize("name", ["norm_weight", "lm_head", "w1", "b1", "w2", "b2"])
def test_mismatched_dtype_or_device_raises(name):
    x = make_inputs(3, 16, 50, torch.bfloat16)
    original = getattr(x, name)
    for other in (original.float(), torch.empty_like(original, device="meta")):
        with pytest.raises(ValueError, match=rf"^{name}: expected torch.bfloat16 on cpu like h"):
            fused_heads(**{**x._asdict(), name: other}, eps=EPS, k=3)


def test_unsupported_or_strided_inputs_raise():
    x = make_inputs(3, 16, 50, torch.float32)
    with pytest.raises(ValueError, match=r"^h: expected a \[R, D\] float32/bfloat16/float16"):
        value_head(x.h.double(), *x.value_args[1:], eps=EPS)
    with pytest.raises(ValueError, match=r"^h: expected a dense last dimension"):
        value_head(torch.randn(3, 32)[:, ::2], *x.value_args[1:], eps=EPS)
    with pytest.raises(ValueError, match=r"^norm_weight: expected a contiguous tensor"):
        value_head(x.h, torch.randn(32)[::2], *x.value_args[2:], eps=EPS)
    with pytest.raises(ValueError, match=r"^h: expected a torch.Tensor"):
        value_head(x.h.tolist(), *x.value_args[1:], eps=EPS)


@pytest.mark.parametrize("k", [0, -1, 51, 65, True, 2.0])
def test_k_outside_one_to_min_64_v_raises(k):
    x = make_inputs(2, 16, 50, torch.float32)
    with pytest.raises(ValueError, match=r"^k: expected an int in \[1, min\(64, V = 50\)\]"):
        fused_heads(*x, eps=EPS, k=k)


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf"), None, True])
def test_bad_eps_raises(eps):
    x = make_inputs(2, 16, 50, torch.float32)
    with pytest.raises(ValueError, match=r"^eps: expected a positive finite float"):
        value_head(*x.value_args, eps=eps)


def test_unknown_backend_raises():
    x = make_inputs(2, 16, 50, torch.float32)
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        fused_heads(*x, eps=EPS, k=3, backend="cuda")


# ---------------------------------------------------------------- kernels (interpreter on CPU)


@pytest.mark.interpret
@pytest.mark.parametrize("R,D", VALUE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_head_matches_fp32_reference(R, D, dtype, kernel_device):
    x = make_inputs(R, D, 1, dtype, kernel_device)
    z, u = value_head(*x.value_args, eps=EPS, backend="triton")
    z32, u32 = value_head_ref(*x.value_args, eps=EPS, upcast=True)
    z_same, u_same = value_head_ref(*x.value_args, eps=EPS, upcast=False)
    assert_within_2x("z", z, z32, z_same, ATOL[dtype])
    assert_within_2x("u", u, u32, u_same, ATOL[dtype])


def _check_fused_heads(x: Inputs, k: int, dtype: torch.dtype) -> FusedHeads:
    out = fused_heads(*x, eps=EPS, k=k, backend="triton")
    ref32 = fused_heads_ref(*x, eps=EPS, k=k, upcast=True)
    same = fused_heads_ref(*x, eps=EPS, k=k, upcast=False)
    atol = ATOL[dtype]
    # The norm is the same model-dtype computation on both sides; only rstd's summation order differs.
    assert_close_rel("normed", out.normed, ref32.normed, rtol=torch.finfo(dtype).eps, atol=1e-6)
    logits32 = ref32.normed.float() @ x.lm_head.float().T  # [R, V], the oracle's logits
    assert_topk_ids_match(out.topk_ids.cpu(), logits32.cpu(), k)
    assert_within_2x("topk_logits", out.topk_logits, ref32.topk_logits, same.topk_logits, atol)
    assert_close_rel("topk_logits vs logits at topk_ids", out.topk_logits, logits32.gather(1, out.topk_ids),
                     rtol=0, atol=atol)
    for name in ("lse", "z", "u"):
        assert_within_2x(name, getattr(out, name), getattr(ref32, name), getattr(same, name), atol)
    return out


@pytest.mark.interpret
@pytest.mark.parametrize("R,D,V,k", HEAD_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_heads_matches_fp32_reference(R, D, V, k, dtype, kernel_device):
    _check_fused_heads(make_inputs(R, D, V, dtype, kernel_device), k, dtype)


@pytest.mark.interpret
def test_fused_heads_merges_several_vocab_programs(kernel_device):
    # V = 2100 spans three 1024-id vocab programs; the last holds 52 ids, fewer than KP = 64 keys.
    _check_fused_heads(make_inputs(2, 37, 2100, torch.bfloat16, kernel_device, seed=1), 64, torch.bfloat16)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_heads_outputs_satisfy_invariants(dtype, kernel_device):
    R, D, V, k = 5, 48, 300, 9
    out = fused_heads(*make_inputs(R, D, V, dtype, kernel_device, seed=2), eps=EPS, k=k, backend="triton")
    assert_invariants(out, R, D, V, k, dtype)


@pytest.mark.interpret
def test_equal_logits_rank_smaller_id_first(kernel_device):
    x = make_inputs(3, 32, 300, torch.float16, kernel_device)
    lm_head = torch.zeros_like(x.lm_head)
    lm_head[:, 0] = 1  # every logit of a row is exactly normed[row, 0], whatever the summation order
    out = fused_heads(x.h, x.norm_weight, lm_head, *x[3:], eps=EPS, k=6, backend="triton")
    assert out.topk_ids.tolist() == [list(range(6))] * 3


@pytest.mark.interpret
def test_fused_heads_value_matches_value_head(kernel_device):
    x = make_inputs(6, 96, 200, torch.bfloat16, kernel_device, seed=3)
    out = fused_heads(*x, eps=EPS, k=4, backend="triton")
    z, u = value_head(*x.value_args, eps=EPS, backend="triton")
    assert_close_rel("fused z vs value_head z", out.z, z, rtol=1e-6, atol=1e-6)  # W1 split differently: sum order
    assert_close_rel("fused u vs value_head u", out.u, u, rtol=1e-6, atol=1e-6)


@pytest.mark.interpret
def test_kernels_read_strided_rows(kernel_device):
    R, D, V, k = 3, 40, 130, 5
    x = make_inputs(R, D, V, torch.float16, kernel_device, seed=4)
    pad = torch.zeros(R + V + D, 24, dtype=torch.float16, device=kernel_device)
    h = torch.cat([x.h, pad[:R]], dim=1)[:, :D]  # row stride 64
    lm_head = torch.cat([x.lm_head, pad[:V]], dim=1)[:, :D]
    w1 = torch.cat([x.w1, pad[:D]], dim=1)[:, :D]
    strided = Inputs(h, x.norm_weight, lm_head, w1, x.b1, x.w2, x.b2)
    assert not h.is_contiguous() and not lm_head.is_contiguous() and not w1.is_contiguous()
    out = fused_heads(*strided, eps=EPS, k=k, backend="triton")
    want = fused_heads(*x, eps=EPS, k=k, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(out, want))
    assert all(torch.equal(a, b) for a, b in zip(value_head(*strided.value_args, eps=EPS, backend="triton"),
                                                  value_head(*x.value_args, eps=EPS, backend="triton")))


@pytest.mark.interpret
def test_empty_batch_returns_empty_outputs(kernel_device):
    x = make_inputs(0, 32, 100, torch.bfloat16, kernel_device)
    z, u = value_head(*x.value_args, eps=EPS, backend="triton")
    out = fused_heads(*x, eps=EPS, k=5, backend="triton")
    assert z.shape == u.shape == out.lse.shape == (0,) and out.topk_ids.shape == (0, 5) and out.normed.shape == (0, 32)


# ---------------------------------------------------------------- realistic sizes (GPU only)


@pytest.fixture
def cuda_device(kernel_device: str) -> str:
    if kernel_device != "cuda":
        pytest.skip("realistic sizes need compiled Triton on a CUDA device")
    return kernel_device


@pytest.mark.gpu
@pytest.mark.parametrize("R", [1, 16, 37])
def test_fused_heads_matches_reference_at_qwen_sizes(R, cuda_device):
    # Qwen2.5-1.5B: D = 1536, V = 151936 (149 vocab programs, bf16 lm_head of 467 MB).
    _check_fused_heads(make_inputs(R, 1536, 151936, torch.bfloat16, cuda_device, seed=5), 64, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("R", [1, 120, 1000])
def test_value_head_matches_reference_at_qwen_sizes(R, cuda_device):
    x = make_inputs(R, 1536, 1, torch.bfloat16, cuda_device, seed=6)
    z, u = value_head(*x.value_args, eps=EPS, backend="triton")
    z32, u32 = value_head_ref(*x.value_args, eps=EPS, upcast=True)
    z_same, u_same = value_head_ref(*x.value_args, eps=EPS, upcast=False)
    assert_within_2x("z", z, z32, z_same, ATOL[torch.bfloat16])
    assert_within_2x("u", u, u32, u_same, ATOL[torch.bfloat16])


@pytest.mark.gpu
def test_heads_replay_in_a_cuda_graph(cuda_device):
    # Capture fails on any host sync; replay must reproduce the eager results bit for bit.
    x = make_inputs(8, 896, 32000, torch.bfloat16, cuda_device, seed=7)
    eager = fused_heads(*x, eps=EPS, k=16, backend="triton")  # compiles and autotunes before capture
    eager_z, _ = value_head(*x.value_args, eps=EPS, backend="triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_heads(*x, eps=EPS, k=16, backend="triton")
        captured_z, _ = value_head(*x.value_args, eps=EPS, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, eager)) and torch.equal(captured_z, eager_z)
