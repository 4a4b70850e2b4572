"""The trunk's SwiGLU (`_core.swiglu`, csrc/trunk.cpp) against its formula rebuilt in numpy, bit for bit.

out = (x sigmoid(x)) up with sigmoid from e = exp(-|x|) by decode_ops.h's exp_nonpositive (round to nearest k,
two-part ln 2, degree-6 Taylor, exponent bits). numpy rounds every float32 operation on its own, as the portable
build does (no contraction); the AVX2 build computes 8 lanes at a time and must give the same bits, so a change of
operation order, a fused multiply-add or another exp in either build fails here.
"""
from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
from subproc import run_python

from lenvm_rt import _core, _native

F32 = np.float32


def formula(gate_up: np.ndarray) -> np.ndarray:
    n = gate_up.shape[1] // 2
    x, up = gate_up[:, :n], gate_up[:, n:]
    t = np.where(x < 0, x, -x)
    t = np.where(t < F32(-87.0), F32(-87.0), t)
    k = (t * F32(1.44269504088896341) + F32(12582912.0)) - F32(12582912.0)
    f = (t - k * F32(0.693359375)) + k * F32(2.12194440e-4)
    p = F32(1.0 / 720.0)
    for c in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * f + F32(c)
    scale = ((k.astype(np.int32) + 127) << 23).view(F32)
    e = p * scale
    sigmoid = np.where(x < 0, e, F32(1.0)) / (F32(1.0) + e)
    return (x * sigmoid) * up


def inputs(rows: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(rows * 100 + n)
    gate_up = (rng.standard_normal((rows, 2 * n)) * 4).astype(F32)
    edges = np.array([0.0, -0.0, 1e-30, -1e-30, 87.0, -87.0, 87.5, -90.0, 200.0, -200.0, 3.0e38, -3.0e38], F32)
    flat = gate_up[:, :n].reshape(-1)
    flat[: min(flat.size, edges.size)] = edges[: flat.size]
    return gate_up


@pytest.mark.parametrize(("rows", "n"), [(1, 1), (1, 7), (1, 8), (2, 13), (15, 1536), (3, 40)])
def test_swiglu_gives_the_formula_bits(rows: int, n: int) -> None:
    gate_up = inputs(rows, n)
    out = np.empty((rows, n), F32)
    _core.swiglu(gate_up, out)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = formula(gate_up)
    np.testing.assert_array_equal(out.view(np.int32), expected.view(np.int32))


def test_swiglu_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="gate_up: expected a 2-D array"):
        _core.swiglu(np.ones((2, 3), F32), np.empty((2, 1), F32))
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 2\)"):
        _core.swiglu(np.ones((2, 4), F32), np.empty((2, 3), F32))


PORTABLE = """
    import numpy as np
    from lenvm_rt import _core, _native
    gate_up = np.random.default_rng(3).standard_normal((5, 2 * 29)).astype(np.float32) * 4
    out = np.empty((5, 29), np.float32)
    _core.swiglu(gate_up, out)
    np.save({path!r}, out)
    print(_native.linear_kernel())
"""


def test_both_kernel_families_give_the_same_bits(tmp_path) -> None:
    path = str(tmp_path / "portable.npy")
    result = run_python(textwrap.dedent(PORTABLE.format(path=path)), timeout=120,
                        env={**os.environ, "LENVM_RT_LINEAR_KERNEL": "scalar"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["scalar"]
    gate_up = np.random.default_rng(3).standard_normal((5, 2 * 29)).astype(F32) * 4
    ours = np.empty((5, 29), F32)
    _core.swiglu(gate_up, ours)
    np.testing.assert_array_equal(np.load(path).view(np.int32), ours.view(np.int32))
    assert _native.linear_kernel() in ("avx2_fma", "scalar")
