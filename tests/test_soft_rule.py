"""The soft Equal-To rule EQUAL_SOFT (`LengthTarget.equal(n, rule="soft")`, the reference's `eq_soft`).

u* = 1 - exp(-ρ·nlg) is the value of a candidate predicting exactly ρ more tokens. When u* lies strictly inside the
filled candidates' range of u, the rule draws from p' ∝ p̃·exp(λ(u - min u)) with λ solved (exactly 20 safeguarded
Newton steps in [-1e5, 1e5]) so that E_p'[u] = u*; otherwise it makes EQUAL's choice (so ρ = 0 ends on EOS).
Checked here: the solver hits the target, u* is the value of l̂ = ρ, the fallback and ρ = 0 cases on every backend,
the draw frequencies against p', C++ == specification == torch reference == Triton (interpreter) on random rows
(greedy and sampled, EOS, empty slots, exact ties), and the API, EOS and CLI plumbing with its bad input.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from guidance_cases import (
    CAPACITY,
    EOS,
    GAMMAS,
    admit_all,
    compare_three_ways,
    core_step,
    quiet_float_errors,  # noqa: F401  (an autouse fixture)
    ref_step,
    select_step,
)
from mask_flags import flags

from lenvm_rt import _core, _native
from lenvm_rt.config import LengthTarget
from lenvm_rt.guidance import EosRule, Guidance
from lenvm_rt.kernels import GuidanceState
from lenvm_rt.select_ref import (
    EQUAL,
    EQUAL_SOFT,
    RULES,
    SOFT_BOUND,
    SOFT_ITERATIONS,
    RowState,
    candidate_scores,
    select_row,
    soft_lambda,
    soft_target,
    soft_tilt,
)
from lenvm_rt.value_math import logit_of_length


def soft_case(rng: np.random.Generator, batch: int, k: int, rho: np.ndarray, gamma: float):
    """Random candidates whose predicted lengths straddle each row's ρ (some rows all above or all below it), with
    EOS candidates, empty slots and exact duplicates of a neighbouring candidate (ties)."""
    ids = rng.integers(0, 40, (batch, k)).astype(np.int32)
    ids[rng.random((batch, k)) < 0.15] = rng.choice(EOS)
    logp = (-rng.exponential(2.0, (batch, k))).astype(np.float32)
    spread = rng.choice([0.3, 1.0, 3.0], (batch, 1)) * np.maximum(0.25 * rho[:, None], 2.0)
    shift = rng.choice([0.0, 0.0, 0.0, 2.5, -2.5], (batch, 1)) * spread  # shifted rows may lie outside the range
    lengths = np.maximum(rho[:, None] + shift + rng.normal(0, 1, (batch, k)) * spread, 0.01)
    z = np.vectorize(lambda x: logit_of_length(x, gamma))(lengths).astype(np.float32)
    for b in range(batch):
        if k > 1 and rng.random() < 0.3:  # an exact tie: slot j repeats slot j - 1
            j = int(rng.integers(1, k))
            ids[b, j], logp[b, j], z[b, j] = ids[b, j - 1], logp[b, j - 1], z[b, j - 1]
    for b, n in enumerate(rng.integers(1, k + 1, batch)):
        ids[b, n:] = -1
    return ids, logp, z


def soft_settings(rng: np.random.Generator, gamma: float) -> dict:
    # γ = 0.5 puts every u within float32 rounding of 1 beyond ~20 tokens: nothing left for the tilt to separate.
    return dict(rule=EQUAL_SOFT, target=int(rng.integers(1, 80 if gamma > 0.5 else 20)),
                max_new=int(rng.integers(1, 200)), gamma=gamma, beta=0.0,
                seed=int(rng.integers(0, 2**64, dtype=np.uint64)), greedy=bool(rng.random() < 0.3))


def tilted(logp: np.ndarray, u: np.ndarray, u_star: float) -> np.ndarray:
    """p' of the specification's solution (float64)."""
    _, _, w = soft_tilt(logp, u, u_star)
    return np.array(w) / sum(w)


# --- the solver and the target --------------------------------------------------------------------------------


def reachable(logp: np.ndarray, u: np.ndarray, u_star: float) -> bool:
    """Whether λ in [-SOFT_BOUND, SOFT_BOUND] can reach u* (the tilted mean at the bracket's ends straddles it)."""
    a, d = logp.astype(np.float64) - logp.max(), u.astype(np.float64) - u.min()

    def mean(lam: float) -> float:
        s = a + lam * d
        w = np.exp(s - s.max())
        return float(w @ d / w.sum())

    return mean(-SOFT_BOUND) < u_star - u.min() < mean(SOFT_BOUND)


def test_solver_hits_the_target_value_in_expectation() -> None:
    rng = np.random.default_rng(2026)
    solved = 0
    for _ in range(1500):
        gamma = float(rng.choice(GAMMAS + (0.98, 0.9998)))
        rho = int(rng.integers(1, 400))
        n = int(rng.integers(2, 65))
        ids = rng.integers(10, 40, n).astype(np.int32)
        ids[rng.random(n) < 0.1] = EOS[0]
        lengths = np.maximum(rho * np.exp(rng.normal(0, rng.choice([0.1, 0.5, 1.5]), n)), 0.01)
        z = np.array([logit_of_length(x, gamma) for x in lengths], np.float32)
        logp = (-rng.exponential(rng.choice([0.5, 2.0, 10.0]), n)).astype(np.float32)
        u, _ = candidate_scores(ids, z, gamma, set(EOS))
        u_star = soft_target(rho, gamma)
        if not u.min() < u_star < u.max() or not reachable(logp, u, u_star):
            continue
        p = tilted(logp, u, u_star)
        assert abs(float(p @ u.astype(np.float64)) - u_star) <= 1e-6, (gamma, rho, lengths, logp)
        solved += 1
    assert solved > 1000, solved


def test_solver_moves_lambda_the_right_way_and_stays_in_its_bracket() -> None:
    a, d = [0.0, -1.0, -2.0], [0.0, 0.3, 0.6]
    base = sum(math.exp(x) * y for x, y in zip(a, d)) / sum(math.exp(x) for x in a)  # the untilted mean
    assert soft_lambda(a, d, base + 0.2) > 0 > soft_lambda(a, d, base - 0.1)
    assert abs(soft_lambda(a, d, base)) < 1e-12
    # A target the bracket cannot reach (the root lies beyond 1e5): λ ends inside [-SOFT_BOUND, SOFT_BOUND].
    far = soft_lambda([0.0, -5e4], [0.0, 1e-6], 1e-6 * (1 - 1e-12))
    assert 0 < far <= SOFT_BOUND and SOFT_ITERATIONS == 20


@pytest.mark.parametrize("gamma", GAMMAS + (0.9998,))
def test_target_value_is_the_value_of_a_candidate_predicting_rho(gamma) -> None:
    for rho in (1, 2, 7, 50, 300, 2000):
        z = np.array([logit_of_length(rho, gamma)], np.float32)
        u, remaining = candidate_scores(np.array([11]), z, gamma, set(EOS))
        assert abs(float(remaining[0]) - rho) <= 1e-4 * rho
        assert abs(float(u[0]) - soft_target(rho, gamma)) <= 1e-6, (rho, float(u[0]), soft_target(rho, gamma))
    assert soft_target(0, gamma) == 0.0


# --- the rule on hand-made inputs, every backend ---------------------------------------------------------------


@pytest.fixture(params=["core", "torch", pytest.param("triton", marks=pytest.mark.interpret)])
def backend(request) -> tuple[str, str]:
    """(implementation, device): the C++ core, `select_ref` in torch, or the Triton kernel."""
    if request.param == "triton":
        return "triton", request.getfixturevalue("kernel_device")
    return request.param, "cpu"


def choose(backend: tuple[str, str], rule: int, ids, z, logp, *, target: int, gamma: float = 0.9, seed: int = 0,
           greedy: bool = False) -> tuple[int, int, bool]:
    """(slot, token, done) of one request at t = 0 on `backend`."""
    name, device = backend
    settings = dict(rule=rule, target=target, max_new=100, gamma=gamma, beta=0.0, seed=seed, greedy=greedy)
    batch, _, states = admit_all({1: settings}, {name: device} if name != "core" else {})
    args = (np.array([1], np.int32), np.array([ids], np.int32), np.array([logp], np.float32),
            np.array([z], np.float32))
    slot, token, done = select_step(states[name], name, *args) if states else core_step(batch, *args)
    return int(slot[0]), int(token[0]), bool(done[0])


@pytest.mark.parametrize("side", ["all longer", "all shorter"])
def test_target_outside_the_candidates_range_makes_equals_choice(backend, side) -> None:
    gamma, target = 0.9, 21  # ρ = 20
    lengths = (25.0, 31.0, 22.5, 60.0) if side == "all longer" else (3.0, 19.0, 12.0, 1.0)
    z = [logit_of_length(x, gamma) for x in lengths]
    ids, logp = [10, 11, 12, 13], [-0.1, -0.5, -4.0, -1.0]
    closest = 2 if side == "all longer" else 1
    for seed in range(8 if backend[0] != "triton" else 2):
        for greedy in (False, True):
            assert choose(backend, EQUAL_SOFT, ids, z, logp, target=target, seed=seed, greedy=greedy) == (
                closest, ids[closest], False)
    assert choose(backend, EQUAL, ids, z, logp, target=target) == (closest, ids[closest], False)


@pytest.mark.parametrize("greedy", [False, True])
def test_rho_zero_ends_on_the_eos_candidate(backend, greedy) -> None:
    """T = 1 at t = 0: ρ = 0, u* = 0 = u(EOS) <= min u, so the rule makes EQUAL's choice, the EOS candidate."""
    gamma = 0.97
    z = [logit_of_length(x, gamma) for x in (0.5, 3.0)] + [0.0]
    for seed in range(5 if backend[0] != "triton" else 1):
        assert choose(backend, EQUAL_SOFT, [3, 4, EOS[1]], z, [-0.01, -2.0, -9.0], target=1, gamma=gamma,
                      seed=seed, greedy=greedy) == (2, EOS[1], True)


def test_greedy_row_takes_the_argmax_of_the_tilted_distribution(backend) -> None:
    # ρ = 11: l̂ = 2, 9, 14, 40. The base probabilities favour slot 0 and EQUAL takes slot 1 (|9 - 11| = 2); the
    # tilt that lifts the mean value to u* makes a longer candidate the mode.
    gamma = 0.9
    ids, logp = [10, 11, 12, 13], [-0.05, -3.5, -4.0, -6.0]
    z = [logit_of_length(x, gamma) for x in (2.0, 9.0, 14.0, 40.0)]
    s = RowState(EQUAL_SOFT, 12, 0, 100, gamma, 0.0, 0, True)
    u, _ = candidate_scores(np.array(ids), np.array(z, np.float32), gamma, set(EOS))
    lam, score, _ = soft_tilt(np.array(logp, np.float32), u, soft_target(11, gamma))
    expected = int(np.argmax(score))
    assert lam > 0 and expected not in (0, 1)  # the tilt overrides both the base argmax and EQUAL's choice
    assert select_row(np.array(ids, np.int32), np.array(logp, np.float32), np.array(z, np.float32), s, EOS,
                      0.5).slot == expected
    assert choose(backend, EQUAL_SOFT, ids, z, logp, target=12, gamma=gamma, greedy=True) == (expected, ids[expected],
                                                                                           False)


def test_draw_frequencies_match_the_tilted_distribution() -> None:
    gamma, capacity, steps, target = 0.98, 2000, 8, 41
    logp = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])).astype(np.float32)
    offsets = np.array([30.0, 12.0, 4.0, -6.0, -15.0, -30.0])  # l̂ - ρ
    ids = np.arange(10, 16, dtype=np.int32)
    batch = _native.GuidanceBatch(capacity, EOS)
    for slot in range(capacity):
        batch.admit(slot, rule="equal_soft", target=target, max_new=10_000, gamma=gamma, seed=7000 + slot)
    rows = np.arange(capacity, dtype=np.int32)
    counts, expected, variance = np.zeros(len(ids)), np.zeros(len(ids)), np.zeros(len(ids))
    for t in range(steps):
        rho = target - t - 1
        z = np.array([logit_of_length(rho + o, gamma) for o in offsets], np.float32)
        u, _ = candidate_scores(ids, z, gamma, set(EOS))
        p = tilted(logp, u, soft_target(rho, gamma))
        assert abs(float(p @ u.astype(np.float64)) - soft_target(rho, gamma)) <= 1e-6
        assert np.abs(p - np.exp(logp)).max() > 0.1  # the tilt moved the distribution
        slot, _, _ = core_step(batch, rows, np.tile(ids, (capacity, 1)), np.tile(logp, (capacity, 1)),
                               np.tile(z, (capacity, 1)))
        counts += np.bincount(slot, minlength=len(ids))
        expected += capacity * p
        variance += capacity * p * (1 - p)
    # 5 binomial standard deviations per candidate: a false failure has probability < 1e-5 in all.
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(variance)), (counts, expected)


# --- the implementations agree ----------------------------------------------------------------------------------


def soft_case_left(rng: np.random.Generator, batch: int, k: int, left: np.ndarray, gamma: float):
    """soft_case around ρ = max(T - t - 1, 0)."""
    return soft_case(rng, batch, k, np.maximum(left - 1, 0).astype(np.float64), gamma)


def test_core_and_torch_reference_match_specification_on_soft_rows() -> None:
    compared, total = compare_three_ways(np.random.default_rng(15), {"torch": "cpu"}, 80, 4, soft_settings,
                                         soft_case_left)
    assert compared >= 0.95 * total, (compared, total)


def test_core_matches_specification_bit_for_bit_on_soft_rows() -> None:
    """The C++ core runs the specification's float64 operations in the same order: no near-tie exemption."""
    rng = np.random.default_rng(16)
    for _ in range(60):
        rows = rng.choice(CAPACITY, 5, replace=False).astype(np.int32)
        gamma = float(rng.choice(GAMMAS))
        batch, ref, _ = admit_all({int(r): soft_settings(rng, gamma) for r in rows})
        for _ in range(3):
            rho = np.array([max(ref[int(r)].target - ref[int(r)].generated - 1, 0) for r in rows], np.float64)
            ids, logp, z = soft_case(rng, len(rows), 10, rho, gamma)
            slots, tokens, _ = core_step(batch, rows, ids, logp, z)
            assert [(c.slot, c.token) for c in ref_step(ref, rows, ids, logp, z)] == list(zip(slots, tokens))
            for r in rows:
                ref[int(r)].generated += 1


@pytest.mark.interpret
def test_kernel_matches_core_and_specification_on_soft_rows(kernel_device) -> None:
    compared, total = compare_three_ways(np.random.default_rng(17), {"triton": kernel_device}, 6, 3, soft_settings,
                                         soft_case_left)
    assert compared >= 0.9 * total, (compared, total)


# --- API, EOS and CLI plumbing ----------------------------------------------------------------------------------


def test_api_maps_the_soft_rule() -> None:
    assert RULES["equal_soft"] == EQUAL_SOFT == 6
    assert Guidance.of(LengthTarget.equal(12, rule="soft"), None) == Guidance(EQUAL_SOFT, 13, 0.0)
    assert Guidance.of(LengthTarget.equal(12, rule="strict"), None) == Guidance(EQUAL, 13, 0.0)


def test_soft_rows_see_no_eos_before_their_target() -> None:
    rule = EosRule([Guidance.of(LengthTarget.equal(3, rule="soft"), None)], torch.device("cpu"))  # T = 4
    for step in range(3):
        ban, force = rule.masks(step)
        assert flags(ban, 1) == [True] and flags(force, 1) == [False]
    ban, force = rule.masks(step=3)
    assert flags(ban, 1) == [False] and flags(force, 1) == [True]


@pytest.mark.parametrize("make", [
    lambda: LengthTarget.equal(5, rule="sof"),
    lambda: LengthTarget.equal(5, rule="equal_soft"),
    lambda: LengthTarget("at_most", 5, "soft"),
    lambda: LengthTarget("at_least", 5, "soft"),
])
def test_unknown_or_misplaced_rule_name_is_a_value_error_naming_the_choices(make) -> None:
    with pytest.raises(ValueError, match="length rule"):
        make()
    with pytest.raises(ValueError, match="strict, band, soft"):
        LengthTarget.equal(5, rule="sof")


def test_every_controller_admits_the_soft_rule_and_rejects_the_next_number() -> None:
    batch = _native.GuidanceBatch(2, EOS)
    batch.admit(0, rule="equal_soft", target=5, max_new=10, gamma=0.9)
    batch.admit(1, rule=EQUAL_SOFT, target=5, max_new=10, gamma=0.9)
    with pytest.raises(ValueError, match="rule: expected one of"):
        _native.GuidanceBatch(1, EOS).admit(0, rule="soft", target=5, max_new=10, gamma=0.9)
    core = _core.GuidanceBatch(1, EOS)
    with pytest.raises(ValueError, match="6 \\(equal_soft\\)"):
        core.admit(0, 9, 5, 10, 0.9, 0.0, 0, False)
    state = GuidanceState.create(2, "cpu")
    state.admit(0, rule=EQUAL_SOFT, target=5, max_new=10, gamma=0.9)
    with pytest.raises(ValueError, match="6 \\(equal_soft\\)"):
        state.admit(1, rule=9, target=5, max_new=10, gamma=0.9)


def test_cli_length_rule_soft_is_passed_through() -> None:
    from lenvm_rt import cli

    parser = cli.build_parser()

    def length(*argv: str):
        return cli._length(parser.parse_args(["generate", "--prompt", "hi", *argv]))

    assert length("--length", "7", "--length-rule", "soft") == LengthTarget.equal(7, rule="soft")
    with pytest.raises(ValueError, match="length rule"):
        length("--length", "7", "--constraint", "at-least", "--length-rule", "soft")
    lifebench = parser.parse_args(["eval", "lifebench", "--model", "m", "--data", "d.jsonl", "--length-rule", "soft"])
    assert lifebench.length_rule == "soft"
    with pytest.raises(SystemExit):  # argparse: an unknown choice
        parser.parse_args(["eval", "lifebench", "--model", "m", "--data", "d.jsonl", "--length-rule", "softer"])
