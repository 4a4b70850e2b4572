"""Guided selection: the C++ core (`_native.GuidanceBatch.step`), the Triton kernel `kernels.select` (interpreter on
CPU) and its torch reference `select_ref` make the choices of the specification `lenvm_rt.select_ref.select_row`:
differential tests on seeded and generated batches, the rules on hand-made inputs, and seeded draws that do not
depend on the batch. Near-tie rows are compared for validity only (see tests/guidance_cases.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from guidance_cases import (
    CAPACITY,
    EOS,
    GAMMAS,
    admit_all,
    check_valid,
    core_step,
    decision_is_robust,
    quiet_float_errors,  # noqa: F401  (an autouse fixture)
    random_candidates,
    random_settings,
    ref_step,
    run_differential,
    select_step,
    uniform,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lenvm_rt import _native
from lenvm_rt.kernels.select import _philox_uniform_ref
from lenvm_rt.select_ref import AT_LEAST, AT_MOST, EQUAL, TILT, candidate_scores
from lenvm_rt.value_math import logit_of_length

# --- (a) differential tests -------------------------------------------------------------------------------------


def test_core_and_torch_reference_match_specification_on_seeded_batches() -> None:
    rng = np.random.default_rng(20240611)
    compared = total = 0
    for _ in range(150):
        c, t = run_differential(rng, steps=4, max_b=8, max_k=16, devices={"torch": "cpu"})
        compared, total = compared + c, total + t
    assert compared >= 0.97 * total, f"only {compared} of {total} rows had a decision margin wide enough to compare"


@pytest.mark.interpret
def test_kernel_matches_specification_on_seeded_batches(kernel_device) -> None:
    rng = np.random.default_rng(7)
    compared = total = 0
    for _ in range(6):
        c, t = run_differential(rng, steps=3, max_b=4, max_k=16, devices={"triton": kernel_device})
        compared, total = compared + c, total + t
    assert compared >= 0.9 * total


z_values = st.one_of(st.floats(-40, 40, width=32), st.sampled_from([-np.inf, np.inf, 0.0, 1e4, -1e4, -100.0]))


@st.composite
def cases(draw, max_b: int = 5, max_k: int = 12):
    batch_size, k, steps = draw(st.integers(1, max_b)), draw(st.integers(1, max_k)), draw(st.integers(1, 3))
    rows = np.array(draw(st.permutations(range(CAPACITY)))[:batch_size], np.int32)
    rule_settings = st.fixed_dictionaries(dict(
        rule=st.integers(1, 8), target=st.integers(1, 5), max_new=st.integers(1, 6), gamma=st.sampled_from(GAMMAS),
        beta=st.one_of(st.sampled_from([0.0, -1e4]), st.floats(-50, 50)), seed=st.integers(0, 2**64 - 1),
        greedy=st.booleans()))
    per_slot = {int(s): draw(rule_settings) for s in rows}
    step_arrays = []
    for _ in range(steps):
        n = draw(st.lists(st.integers(1, k), min_size=batch_size, max_size=batch_size))
        ids = draw(hnp.arrays(np.int32, (batch_size, k), elements=st.integers(0, 9)))
        for b in range(batch_size):
            ids[b, n[b]:] = -1
        logp = draw(hnp.arrays(np.float32, (batch_size, k), elements=st.floats(-30, 0, width=32)))
        z = draw(hnp.arrays(np.float32, (batch_size, k), elements=z_values))
        step_arrays.append((ids, logp, z))
    return rows, per_slot, step_arrays


def replay(rows, per_slot, step_arrays, devices: dict[str, str]) -> None:
    batch, ref, states = admit_all(per_slot, devices)
    for ids, logp, z in step_arrays:
        outputs = [core_step(batch, rows, ids, logp, z)]
        outputs += [select_step(state, backend, rows, ids, logp, z) for backend, state in states.items()]
        for b, choice in enumerate(ref_step(ref, rows, ids, logp, z)):
            s = ref[int(rows[b])]
            robust = decision_is_robust(ids[b], logp[b], z[b], s, uniform(s.seed, s.generated))
            event("row compared exactly" if robust else "row near a tie: validity only")
            for slot, token, done in outputs:
                check_valid(int(slot[b]), int(token[b]), bool(done[b]), ids[b])
                if robust:
                    assert (int(slot[b]), int(token[b]), bool(done[b])) == (choice.slot, choice.token, choice.done)
            s.generated += 1
    assert all(batch.generated(slot) == s.generated for slot, s in ref.items())


@given(cases())
@settings(max_examples=150, deadline=None)
def test_core_and_torch_reference_match_specification_on_generated_batches(case) -> None:
    replay(*case, devices={"torch": "cpu"})


@pytest.mark.interpret
@given(case=cases(max_b=3, max_k=8))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_kernel_matches_reference_on_generated_batches(case, kernel_device) -> None:
    replay(*case, devices={"triton": kernel_device})


def test_torch_philox_matches_native() -> None:
    rng = np.random.default_rng(3)
    seeds, offsets = rng.integers(0, 2**64, 500, dtype=np.uint64), rng.integers(0, 2**32, 500, dtype=np.uint32)
    expected = _native.philox_uniform(seeds, offsets, stream=1)
    got = _philox_uniform_ref(torch.from_numpy(seeds.view(np.int64)), torch.from_numpy(offsets.view(np.int32)), 1)
    assert np.array_equal(got.numpy(), expected)


# --- (b) the rules on hand-made inputs --------------------------------------------------------------------------


@pytest.fixture(params=["core", "torch", pytest.param("triton", marks=pytest.mark.interpret)])
def backend(request) -> tuple[str, str]:
    """(implementation, device) of the rule tests: the C++ core, `select_ref` in torch, or the Triton kernel."""
    if request.param == "triton":
        return "triton", request.getfixturevalue("kernel_device")
    return request.param, "cpu"


def one_row(backend: tuple[str, str], rule: int, ids, z, logp=None, *, target: int = 5, max_new: int = 100,
            gamma: float = 0.9, beta: float = 0.0, seed: int = 0, greedy: bool = False, steps: int = 1):
    """Choices (slot, token, done) of one request in slot 1 over `steps` steps on the same candidates."""
    name, device = backend
    settings = dict(rule=rule, target=target, max_new=max_new, gamma=gamma, beta=beta, seed=seed, greedy=greedy)
    batch, _, states = admit_all({1: settings}, {name: device} if name != "core" else {})
    rows, ids = np.array([1], np.int32), np.array([ids], np.int32)
    logp = np.zeros_like(ids, np.float32) if logp is None else np.array([logp], np.float32)
    z = np.array([z], np.float32)
    choices = []
    for _ in range(steps):
        slot, token, done = select_step(states[name], name, rows, ids, logp, z) if states else core_step(
            batch, rows, ids, logp, z)
        choices.append((int(slot[0]), int(token[0]), bool(done[0])))
    return choices



def test_equal_picks_candidate_whose_remaining_length_is_closest_to_target(backend) -> None:
    # t = 0, T = 8: ρ = 7 tokens wanted after this one; l̂ = 2, 6.6, 7.5, 30.
    z = [logit_of_length(x, 0.9) for x in (2.0, 6.6, 7.5, 30.0)]
    assert one_row(backend, EQUAL, [10, 11, 12, 13], z, target=8) == [(1, 11, False)]
    assert one_row(backend, EQUAL, [10, 11, 12, 13], z, target=9) == [(2, 12, False)]  # ρ = 8: 7.5 beats 6.6


def test_eos_candidate_scores_exactly_zero(backend) -> None:
    u, remaining = candidate_scores(np.array([5, 2]), np.array([-30.0, 30.0], np.float32), 0.9, set(EOS))
    assert u[1] == 0.0 and remaining[1] == 0.0 and 0 < u[0] and 0 < remaining[0]
    # A non-EOS candidate with l̂ ≈ 1e-12 still loses to EOS at ρ = 0 and under AT_MOST, even from a lower slot.
    assert one_row(backend, EQUAL, [5, 2], [-30.0, 30.0], target=1) == [(1, 2, True)]
    assert one_row(backend, AT_MOST, [5, 7], [-30.0, 30.0], target=9) == [(1, 7, True)]


def test_at_most_forces_eos_at_target_without_an_eos_candidate(backend) -> None:
    choices = one_row(backend, AT_MOST, [10, 11], [3.0, 1.0], target=3, steps=3)
    assert choices == [(1, 11, False), (1, 11, False), (-1, EOS[0], True)]
    assert one_row(backend, AT_MOST, [10, 7, 2], [3.0, 1.0, 0.0], target=1) == [(1, 7, True)]  # first EOS candidate


def test_at_least_never_picks_eos_before_the_target(backend) -> None:
    # EOS is the most probable candidate and the other one's u is exactly 0 (z = -inf), a tie with EOS.
    choices = one_row(backend, AT_LEAST, [2, 10], [0.0, -np.inf], target=3, steps=3)
    assert choices == [(1, 10, False), (1, 10, False), (0, 2, True)]  # then argmin u: the tie goes to slot 0
    assert one_row(backend, AT_LEAST, [2, 7], [1.0, 2.0], target=3) == [(0, 2, True)]  # nothing but EOS: slot 0
    rng = np.random.default_rng(5)
    for _ in range(200 if backend[0] != "triton" else 10):  # interpreted programs are slow
        ids, logp, z = random_candidates(rng, 1, 8)
        if np.isin(ids[0][ids[0] >= 0], EOS).all():
            continue
        (slot, token, _), = one_row(backend, AT_LEAST, ids[0], z[0], logp[0], target=2)
        assert token not in EOS


def test_tilt_with_strongly_negative_beta_picks_the_minimum_value_candidate(backend) -> None:
    z = [1.5, -2.0, 0.5, 3.0]  # u spaced by > 0.05: β·Δu < -500, so every other weight underflows to 0
    logp = [-0.1, -6.0, -1.0, -3.0]
    for seed in range(20 if backend[0] != "triton" else 3):
        assert one_row(backend, TILT, [10, 11, 12, 13], z, logp, beta=-1e4, seed=seed, steps=3) == [(1, 11, False)] * 3


def test_tilt_with_zero_beta_reproduces_the_base_distribution() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    capacity, steps = 1000, 20
    batch = _native.GuidanceBatch(capacity, EOS)
    for slot in range(capacity):
        batch.admit(slot, rule="tilt", target=1, max_new=10_000, gamma=0.9, beta=0.0, seed=slot)
    rows = np.arange(capacity, dtype=np.int32)
    ids = np.tile(np.array([10, 11, 12, 13], np.int32), (capacity, 1))
    logp = np.tile(np.log(probs).astype(np.float32), (capacity, 1))
    z = np.random.default_rng(0).normal(0, 3, ids.shape).astype(np.float32)  # irrelevant at β = 0
    counts = np.zeros(4)
    for _ in range(steps):
        slot, _, _ = core_step(batch, rows, ids, logp, z)
        counts += np.bincount(slot, minlength=4)
    n = capacity * steps
    # Bound: 5 binomial standard deviations per candidate (a false failure has probability < 1e-5 in all).
    assert np.all(np.abs(counts / n - probs) <= 5 * np.sqrt(probs * (1 - probs) / n)), counts / n


def test_greedy_tilt_takes_the_argmax_of_the_tilted_log_probability(backend) -> None:
    # w = logp + β·u: β = 4 lifts slot 2 (u ≈ 0.95) above slot 0 (u ≈ 0.05).
    candidates = ([10, 11, 12], [-3.0, 0.0, 3.0], [-0.5, -1.0, -2.0])
    assert one_row(backend, TILT, *candidates, beta=4.0, greedy=True) == [(2, 12, False)]
    assert one_row(backend, TILT, *candidates, beta=0.0, greedy=True) == [(0, 10, False)]


def test_row_is_done_at_max_new_and_keeps_advancing_until_retired() -> None:
    batch = _native.GuidanceBatch(2, EOS)
    batch.admit(0, rule="equal", target=50, max_new=2, gamma=0.9)
    args = (np.array([0], np.int32), np.array([[10]], np.int32), np.zeros((1, 1), np.float32),
            np.ones((1, 1), np.float32))
    assert [bool(core_step(batch, *args)[2][0]) for _ in range(3)] == [False, True, True]
    assert batch.generated(0) == 3
    batch.retire(0)
    assert batch.active_count() == 0 and not batch.is_active(0)


def test_empty_batch_step_is_a_no_op() -> None:
    batch, _, _ = admit_all({0: random_settings(np.random.default_rng(1))})
    empty = np.zeros(0, np.int32)
    core_step(batch, empty, np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))
    assert batch.generated(0) == 0


# --- (e) seeded draws -------------------------------------------------------------------------------------------


def tilt_draws(request_slot: int, position: int, others: list[int], backend: tuple[str, str], steps: int = 8) -> list:
    """The choices of one seeded TILT request placed at `position` of a batch among `others`."""
    rng = np.random.default_rng(99)  # the request's candidates: the same in every placement
    other_rng = np.random.default_rng(request_slot * 31 + position)  # the other rows: different per placement
    request = dict(rule=TILT, target=1, max_new=1000, gamma=0.9, beta=-2.0, seed=2**63 + 5, greedy=False)
    per_slot = {s: random_settings(other_rng) for s in others} | {request_slot: request}
    name, device = backend
    batch, _, states = admit_all(per_slot, {name: device} if name != "core" else {})
    rows = np.array(others[:position] + [request_slot] + others[position:], np.int32)
    choices = []
    for _ in range(steps):
        ids, logp, z = random_candidates(other_rng, len(rows), 10)
        ids[position], logp[position], z[position] = random_candidates(rng, 1, 10)
        slot, token, _ = select_step(states[name], name, rows, ids, logp, z) if states else core_step(
            batch, rows, ids, logp, z)
        choices.append((int(slot[position]), int(token[position])))
    return choices


def test_seeded_tilt_draws_do_not_depend_on_batch_or_slot(backend) -> None:
    steps = 8 if backend[0] != "triton" else 3
    alone = tilt_draws(0, 0, [], ("core", "cpu"), steps)
    assert len(set(alone)) > 1, "the draws never vary: the test would not notice a wrong counter"
    assert tilt_draws(0, 0, [], backend, steps) == alone
    assert tilt_draws(7, 2, [1, 3, 9, 4], backend, steps) == alone
    assert tilt_draws(11, 1, [0, 5], backend, steps) == alone
