"""Property tests of the LenVM value math: round trips, monotonicity, bounds, closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lenvm_rt.value_math import (
    gamma_from_lengths,
    logit_of_length,
    remaining_from_logit,
    remaining_from_value,
    td_residual,
    value_of_length,
)

gammas = st.floats(min_value=0.9, max_value=0.99995)
lengths = st.floats(min_value=0.5, max_value=20_000)


@given(lengths, gammas)
def test_logit_round_trip_recovers_the_length(length, gamma):
    assert remaining_from_logit(logit_of_length(length, gamma), gamma) == pytest.approx(length, rel=1e-9)


@given(st.floats(min_value=0.0, max_value=2_000), gammas)
def test_value_round_trip_recovers_the_length(length, gamma):
    u = value_of_length(length, gamma)
    if u < 1 - 1e-9:  # closer to 1 a float u no longer resolves the length (why the runtime inverts z)
        assert remaining_from_value(u, gamma) == pytest.approx(length, rel=1e-6, abs=1e-9)


@given(lengths, lengths, gammas)
def test_value_is_monotone_and_bounded(a, b, gamma):
    ua, ub = value_of_length(a, gamma), value_of_length(b, gamma)
    assert 0.0 < ua <= 1.0 and 0.0 < ub <= 1.0
    if a < b:
        assert ua <= ub
        assert logit_of_length(a, gamma) <= logit_of_length(b, gamma)


@given(st.floats(min_value=-60, max_value=60), gammas)
def test_remaining_from_logit_is_stable_and_nonnegative(z, gamma):
    r = remaining_from_logit(z, gamma)
    assert math.isfinite(r) and r >= 0
    assert remaining_from_logit(z + 1.0, gamma) > r


def test_terminal_state_is_zero():
    assert value_of_length(0, 0.997) == 0.0
    assert remaining_from_value(0.0, 0.997) == 0.0
    assert logit_of_length(0, 0.997) == -math.inf


def test_target_value_closed_form():
    # u* = 1 - γ^l: γ = 0.997 and l = 1533 (the p99 horizon) give 0.99.
    assert value_of_length(1533, 0.997) == pytest.approx(0.99, abs=2e-4)
    assert value_of_length(10, 0.5) == pytest.approx(1 - 0.5**10, rel=1e-15)


def test_array_and_tensor_inputs_agree_with_floats():
    ls = [0.0, 1.0, 7.5, 300.0]
    floats = [value_of_length(v, 0.99) for v in ls]
    assert np.allclose(value_of_length(np.array(ls), 0.99), floats, rtol=1e-15)
    assert torch.allclose(value_of_length(torch.tensor(ls, dtype=torch.float64), 0.99),
                          torch.tensor(floats, dtype=torch.float64), rtol=1e-15)
    z = [-3.0, 0.0, 2.5, 40.0]
    ref = [remaining_from_logit(v, 0.99) for v in z]
    assert np.allclose(remaining_from_logit(np.array(z), 0.99), ref, rtol=1e-12)
    assert torch.allclose(remaining_from_logit(torch.tensor(z, dtype=torch.float64), 0.99).double(),
                          torch.tensor(ref, dtype=torch.float64), rtol=1e-6)


@given(st.floats(min_value=6, max_value=1000), st.floats(min_value=0.99, max_value=0.99995))
def test_td_residual_is_zero_for_exact_progress_and_signed(length, gamma):
    # the sign checks need horizons whose values a float still tells apart (γ^l well above 1e-16)
    u_prev, u_next = value_of_length(length, gamma), value_of_length(length - 1, gamma)
    assert td_residual(u_prev, u_next, gamma) == pytest.approx(0.0, abs=1e-12)
    longer = value_of_length(length + 10, gamma)
    assert td_residual(u_prev, longer, gamma) > 0
    assert td_residual(u_prev, value_of_length(max(length - 5, 0), gamma), gamma) < 0


def test_gamma_from_lengths_p99_rule():
    gamma = gamma_from_lengths([1533] * 10)
    assert gamma == pytest.approx(0.01 ** (1 / 1533), rel=1e-12)
    assert value_of_length(1533, gamma) == pytest.approx(0.99, rel=1e-12)
    lengths = np.arange(1, 1001)
    assert gamma_from_lengths(lengths) == pytest.approx(0.01 ** (1 / np.quantile(lengths, 0.99)), rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.5, 2.0, float("nan"), True])
def test_gamma_outside_the_unit_interval_is_refused(gamma):
    with pytest.raises(ValueError, match="gamma must be a number in \\(0, 1\\)"):
        value_of_length(3, gamma)


@pytest.mark.parametrize(("lengths_in", "message"), [([], "at least one"), ([0, 5], ">= 1"),
                                                      ([float("inf")], "finite")])
def test_gamma_from_lengths_bad_input(lengths_in, message):
    with pytest.raises(ValueError, match=message):
        gamma_from_lengths(lengths_in)


def test_negative_length_and_bad_value_are_refused():
    with pytest.raises(ValueError, match="length must be >= 0"):
        value_of_length(-1, 0.99)
    with pytest.raises(ValueError, match="value must lie in"):
        remaining_from_value(1.0, 0.99)


# ---- the C++ mirror ---------------------------------------------------------------------------------
@given(st.lists(st.floats(min_value=0, max_value=20_000), min_size=1, max_size=20), gammas)
def test_cpp_value_and_logit_of_length_agree_with_python(ls, gamma):
    from lenvm_rt import _native

    arr = np.array(ls)
    assert np.allclose(_native.value_of_length(arr, gamma), value_of_length(arr, gamma), rtol=1e-13, atol=0)
    pos = arr[arr > 1e-6]  # below that the horizon underflows to z = -inf in both
    if pos.size:
        assert np.allclose(_native.logit_of_length(pos, gamma), logit_of_length(pos, gamma), rtol=1e-12, atol=1e-12)


@given(st.lists(st.floats(min_value=-80, max_value=80), min_size=1, max_size=20), gammas)
def test_cpp_inverses_and_td_agree_with_python(zs, gamma):
    from lenvm_rt import _native

    z = np.array(zs)
    assert np.allclose(_native.remaining_from_logit(z, gamma), remaining_from_logit(z, gamma), rtol=1e-12)
    u = 1 / (1 + np.exp(-z))
    u = u[u < 1]
    if u.size:
        assert np.allclose(_native.remaining_from_value(u, gamma), remaining_from_value(u, gamma), rtol=1e-12)
        assert np.allclose(_native.td_residual(u, u[::-1], gamma), td_residual(u, u[::-1], gamma), rtol=0, atol=1e-15)


@given(st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=200))
def test_cpp_gamma_from_lengths_agrees_with_python(lengths):
    from lenvm_rt import _native

    assert _native.gamma_from_lengths(lengths) == pytest.approx(gamma_from_lengths(lengths), rel=1e-13)


def test_cpp_value_math_rejects_bad_input():
    from lenvm_rt import _native

    with pytest.raises(ValueError, match="gamma: expected a number in \\(0, 1\\)"):
        _native.value_of_length([1.0], 1.0)
    with pytest.raises(ValueError, match="length: expected >= 0"):
        _native.value_of_length([-1.0], 0.9)
    with pytest.raises(ValueError, match="lengths: expected at least one"):
        _native.gamma_from_lengths([])
    with pytest.raises(ValueError, match="u_next: expected a 1-D array as long as u_prev"):
        _native.td_residual([0.1, 0.2], [0.1], 0.9)
    assert _native.value_of_length([0.0], 0.9)[0] == 0.0  # still usable
