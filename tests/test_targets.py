"""Dense value targets of a completion (LENVM.md §1, §3): closed form, EOS, censoring, the γ rule."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lenvm_rt.targets import censor_horizon, dense_targets, p99_gamma


def _closed_form(length: int, gamma: float) -> list[float]:
    """G_i = −(1 − γ^{L−i}) for the states s_0 … s_L, from the definition, one state at a time."""
    return [-(1.0 - gamma ** (length - i)) for i in range(length + 1)]


def _bellman(length: int, gamma: float) -> list[float]:
    """The same returns by the backward recursion G_t = r_t + γ·G_{t+1}, r_t = −(1−γ), G_L = 0 (paper Eq. 3)."""
    g = [0.0] * (length + 1)
    for t in range(length - 1, -1, -1):
        g[t] = -(1.0 - gamma) + gamma * g[t + 1]
    return g


@pytest.mark.parametrize("length,gamma", [(1, 0.9), (7, 0.9), (40, 0.97), (300, 0.997)])
def test_stopped_completion_matches_the_closed_form(length, gamma):
    targets, mask = dense_targets(length, "stop", gamma)
    assert targets.dtype == np.float64 and mask.dtype == np.bool_
    assert targets.shape == (length + 1,) and mask.shape == (length + 1,)
    np.testing.assert_allclose(targets, _closed_form(length, gamma), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(targets, _bellman(length, gamma), rtol=1e-9, atol=1e-12)
    assert targets[-1] == 0.0  # the state after EOS is terminal
    assert np.all(targets[:-1] < 0) and np.all(targets[:-1] > -1)
    assert np.all(np.diff(targets) > 0)  # strictly monotone in the remaining length
    assert mask.all()  # every state of a completion that ended is trained, EOS included (§3 project rule)


def test_hand_made_completion():
    """L = 3 at γ = 0.5: −(1 − 0.5^3), −(1 − 0.5^2), −(1 − 0.5), 0."""
    targets, mask = dense_targets(3, "stop", 0.5)
    assert targets.tolist() == [-0.875, -0.75, -0.5, 0.0]
    assert mask.tolist() == [True, True, True, True]


@pytest.mark.parametrize("gamma", [0.9, 0.97, 0.99])
def test_censor_horizon_is_the_smallest_h_with_gamma_h_below_eps(gamma):
    h = censor_horizon(gamma)
    assert gamma**h <= 0.01 < gamma ** (h - 1)
    h5 = censor_horizon(gamma, eps=0.05)
    assert gamma**h5 <= 0.05 < gamma ** (h5 - 1)


@pytest.mark.parametrize("cap,gamma", [(60, 0.9), (200, 0.97), (10, 0.9)])
def test_cut_completion_is_censored(cap, gamma):
    h = censor_horizon(gamma)
    targets, mask = dense_targets(cap, "length", gamma)
    assert targets.shape == (cap + 1,) and mask.shape == (cap + 1,)
    for i in range(cap + 1):
        if cap - i >= h:
            assert mask[i], i
            assert targets[i] == -1.0, i  # at least H tokens remain: −1 within ε
            # and the true target, whatever the true length L ≥ cap, is within ε of it
            assert abs(-(1.0 - gamma ** (cap - i)) - targets[i]) <= 0.01
        else:
            assert not mask[i], i  # remainder unknown: not trained
    assert int((~mask).sum()) == min(h, cap + 1)  # the last H states are masked
    if cap + 1 > h:
        assert mask[: cap + 1 - h].all() and not mask[cap + 1 - h:].any()
    else:
        assert not mask.any()  # cut before the horizon: nothing trainable


def test_cut_completion_is_never_trained_as_ended():
    """The masked-in states of a cut completion never carry an 'about to stop' target."""
    targets, mask = dense_targets(100, "length", 0.9)
    assert np.all(targets[mask] == -1.0)
    stopped, _ = dense_targets(100, "stop", 0.9)
    assert np.all(stopped[mask] > -1.0)  # as if it had ended, the targets would differ


@pytest.mark.parametrize("length,gamma", [(1, 0.9), (25, 0.9), (100, 0.97)])
def test_as_ended_reproduces_the_reference(length, gamma):
    targets, mask = dense_targets(length, "length", gamma, censoring="as-ended")
    np.testing.assert_allclose(targets, _closed_form(length, gamma), rtol=1e-12, atol=1e-15)
    assert mask.all()
    stop_t, stop_m = dense_targets(length, "stop", gamma, censoring="as-ended")
    np.testing.assert_array_equal(stop_t, targets)
    np.testing.assert_array_equal(stop_m, mask)


@pytest.mark.parametrize("l99", [10, 100, 1533])
def test_p99_gamma_follows_the_rule(l99):
    lengths = [l99] * 50
    gamma = p99_gamma(lengths)
    assert gamma == pytest.approx(0.01 ** (1.0 / l99), rel=1e-12)
    assert 1.0 - gamma**l99 == pytest.approx(0.99, abs=1e-12)


def test_p99_gamma_uses_the_99th_percentile():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=1000).tolist()
    l99 = float(np.quantile(np.asarray(lengths, dtype=np.float64), 0.99))
    assert p99_gamma(lengths) == pytest.approx(0.01 ** (1.0 / l99), rel=1e-12)
    assert p99_gamma(lengths) < p99_gamma(lengths + [10_000] * 50)  # a longer tail raises γ
    # 0.997 gives L_0.99 ≈ 1,533 (LENVM.md §1 table)
    assert math.log(0.01) / math.log(p99_gamma([1533] * 10)) == pytest.approx(1533, rel=1e-9)


@pytest.mark.parametrize("length", [0, -3, 2.5, None, "7"])
def test_bad_length(length):
    with pytest.raises(ValueError):
        dense_targets(length, "stop", 0.9)


@pytest.mark.parametrize("reason", ["eos", "", None, "STOP", "abort"])
def test_unknown_finish_reason(reason):
    with pytest.raises(ValueError, match="finish_reason"):
        dense_targets(5, reason, 0.9)


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.5, 1.5, True, "0.9", float("nan")])
def test_gamma_outside_the_open_unit_interval(gamma):
    with pytest.raises(ValueError, match="gamma"):
        dense_targets(5, "stop", gamma)
    with pytest.raises(ValueError, match="gamma"):
        censor_horizon(gamma)


def test_unknown_censoring_mode():
    with pytest.raises(ValueError, match="censoring"):
        dense_targets(5, "length", 0.9, censoring="drop")


def test_p99_gamma_bad_input():
    with pytest.raises(ValueError):
        p99_gamma([])
    with pytest.raises(ValueError):
        p99_gamma([1, 1, 1])  # a 1-token 99th percentile cannot set a horizon


def test_choose_gamma_is_the_p99_rule_without_censoring():
    from types import SimpleNamespace

    from lenvm_rt.targets import choose_gamma

    rows = [SimpleNamespace(length=n, finish_reason="stop") for n in range(1, 201)]
    assert choose_gamma(rows) == p99_gamma([r.length for r in rows])


def test_choose_gamma_keeps_cut_completions_trainable():
    from types import SimpleNamespace

    from lenvm_rt.targets import choose_gamma

    rows = [SimpleNamespace(length=n, finish_reason="stop") for n in range(10, 90)]
    rows += [SimpleNamespace(length=512, finish_reason="length") for _ in range(20)]  # 20% cut at 512
    gamma = choose_gamma(rows)
    assert gamma == pytest.approx(0.01 ** (1 / 256), rel=1e-12)
    assert censor_horizon(gamma) in (256, 257)  # ceil of a float that is 256 up to rounding
    targets, mask = dense_targets(512, "length", gamma)
    assert mask.sum() >= 256 and (targets[mask] == -1.0).all()
    with pytest.raises(ValueError, match="no completions"):
        choose_gamma([])
