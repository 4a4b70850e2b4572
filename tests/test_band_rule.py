"""The tolerance-band Equal-To rule EQUAL_BAND (`LengthTarget.equal(n, rule="band")`, lenvm_rt/select_ref.py).

A candidate is in band when |l̂ - ρ| <= max(BAND_ABS, BAND_REL·ρ) while ρ > 0, and only EOS is once ρ = 0; the
rule draws among the in-band candidates by base probability (inverse CDF with the row's Philox uniform) and
falls back to EQUAL's argmin when none is in band.
Checked here: membership on many random rows, the one-candidate and empty-band cases, the draw frequencies against
the renormalised base probabilities, C++ == specification == torch reference == Triton (interpreter), and the API
and CLI plumbing with its bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
from guidance_cases import (
    CAPACITY,
    EOS,
    GAMMAS,
    admit_all,
    assert_band_draws_follow_base_probabilities,
    compare_three_ways,
    core_step,
    quiet_float_errors,  # noqa: F401  (an autouse fixture)
    ref_step,
    uniform,
)

from lenvm_rt import _native
from lenvm_rt.config import DEFAULT_EQUAL_RULE, LengthTarget
from lenvm_rt.guidance import Guidance
from lenvm_rt.select_ref import BAND_ABS, BAND_REL, EQUAL, EQUAL_BAND, RULES, RowState, candidate_scores, select_row
from lenvm_rt.value_math import logit_of_length


def band_of(ids: np.ndarray, z: np.ndarray, s: RowState) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """(in_band bool[n], distance float32[n], band) of one row's filled candidates, in the specification's float32."""
    n = int((ids >= 0).sum())
    _, remaining = candidate_scores(ids[:n], z[:n], s.gamma, set(EOS))
    rho = np.float32(max(s.target - s.generated - 1, 0))
    distance = np.abs(remaining - rho)
    band = max(np.float32(BAND_ABS), np.float32(BAND_REL) * rho) if rho > 0 else np.float32(0)
    return distance <= band, distance, band


def band_case(rng: np.random.Generator, batch: int, k: int, targets: np.ndarray, gamma: float):
    """Random candidates whose predicted lengths straddle each row's ρ (t = 0): some rows have nothing in band."""
    ids = rng.integers(0, 40, (batch, k)).astype(np.int32)
    ids[rng.random((batch, k)) < 0.15] = rng.choice(EOS)
    for b, n in enumerate(rng.integers(1, k + 1, batch)):
        ids[b, n:] = -1
    logp = (-rng.exponential(2.0, (batch, k))).astype(np.float32)
    rho = np.maximum(targets - 1, 0)[:, None]
    spread = rng.choice([0.5, 1.5, 4.0], (batch, 1))  # narrow spreads put every candidate in band, wide ones none
    lengths = np.maximum(rho + rng.normal(0, 1, (batch, k)) * spread * np.maximum(BAND_REL * rho, BAND_ABS), 0.01)
    z = np.vectorize(lambda x: logit_of_length(x, gamma))(lengths).astype(np.float32)
    return ids, logp, z


def band_settings(rng: np.random.Generator) -> dict:
    return dict(rule=EQUAL_BAND, target=int(rng.integers(1, 80)), max_new=int(rng.integers(1, 200)),
                gamma=float(rng.choice(GAMMAS)), beta=0.0, seed=int(rng.integers(0, 2**64, dtype=np.uint64)),
                greedy=bool(rng.random() < 0.2))


def test_band_never_picks_outside_the_band_when_a_candidate_is_inside() -> None:
    rng = np.random.default_rng(11)
    inside = outside = 0
    for _ in range(120):
        rows = rng.choice(CAPACITY, 8, replace=False).astype(np.int32)
        gamma = float(rng.choice(GAMMAS))  # one γ per batch keeps band_case simple
        settings = {int(r): band_settings(rng) | dict(gamma=gamma) for r in rows}
        batch, ref, _ = admit_all(settings)
        targets = np.array([settings[int(r)]["target"] for r in rows])
        ids, logp, z = band_case(rng, len(rows), 12, targets, gamma)
        slots, _, _ = core_step(batch, rows, ids, logp, z)
        for b, choice in enumerate(ref_step(ref, rows, ids, logp, z)):
            in_band, distance, band = band_of(ids[b], z[b], ref[int(rows[b])])
            if in_band.any():
                inside += 1
                assert in_band[choice.slot], (ids[b], z[b], distance, band)
                # The core may differ from numpy by an ulp of l̂ at the band's edge only.
                assert distance[slots[b]] <= band * (1 + 1e-5), (ids[b], z[b], distance, band)
            else:
                outside += 1
                assert choice.slot == int(np.argmin(distance)) == slots[b]
    assert inside > 300 and outside > 50, (inside, outside)  # both branches were exercised


@pytest.mark.parametrize("greedy", [False, True])
def test_single_in_band_candidate_is_chosen_whatever_its_probability(greedy) -> None:
    # ρ = 19 (T = 20, t = 0): band ±4.75. Only slot 3 (l̂ = 21, the least probable) is inside.
    gamma = 0.9
    z = [logit_of_length(x, gamma) for x in (2.0, 9.0, 40.0, 21.0, 60.0)]
    ids, logp = [10, 11, 12, 13, 14], [-0.1, -1.0, -2.0, -9.0, -3.0]
    for seed in range(30):
        settings = dict(rule=EQUAL_BAND, target=20, max_new=100, gamma=gamma, beta=0.0, seed=seed, greedy=greedy)
        batch, _, _ = admit_all({3: settings})
        slot, token, done = core_step(batch, np.array([3], np.int32), np.array([ids], np.int32),
                                      np.array([logp], np.float32), np.array([z], np.float32))
        assert (int(slot[0]), int(token[0]), bool(done[0])) == (3, 13, False)


def test_empty_band_falls_back_to_equal() -> None:
    rng = np.random.default_rng(3)
    gamma = 0.997
    for _ in range(300):
        target = int(rng.integers(10, 400))
        rho = target - 1
        half = max(BAND_ABS, BAND_REL * rho)
        # every candidate at least 1.5 half-widths away, on either side
        lengths = rho + rng.choice([-1, 1], 6) * half * rng.uniform(1.5, 3.0, 6)
        lengths = np.maximum(lengths, 0.01)
        z = np.array([logit_of_length(x, gamma) for x in lengths], np.float32)
        ids = rng.integers(10, 40, 6).astype(np.int32)
        logp = (-rng.exponential(2.0, 6)).astype(np.float32)
        rows = {}
        for rule in (EQUAL, EQUAL_BAND):
            s = RowState(rule, target, 0, 1000, gamma, 0.0, int(rng.integers(0, 2**63)), False)
            assert not band_of(ids, z, s)[0].any()
            rows[rule] = select_row(ids, logp, z, s, EOS, uniform(s.seed, 0))
        assert rows[EQUAL] == rows[EQUAL_BAND]


def test_draw_frequencies_match_renormalised_base_probabilities() -> None:
    probs = np.array([0.35, 0.2, 0.15, 0.1, 0.1, 0.1])
    offsets = np.array([30.0, 3.0, -4.0, -20.0, 0.0, -1.0])  # l̂ - ρ; the band is >= max(2, 0.25·31) = 7.75 wide
    assert_band_draws_follow_base_probabilities("equal_band", probs, offsets, np.abs(offsets) < 7.75, seed=1000)


def band_settings_of(rng: np.random.Generator, gamma: float) -> dict:
    return band_settings(rng) | dict(gamma=gamma)


def test_core_and_torch_reference_match_specification_on_band_rows() -> None:
    compared, total = compare_three_ways(np.random.default_rng(5), {"torch": "cpu"}, 80, 4, band_settings_of, band_case)
    assert compared >= 0.95 * total, (compared, total)


@pytest.mark.interpret
def test_kernel_matches_core_and_specification_on_band_rows(kernel_device) -> None:
    compared, total = compare_three_ways(np.random.default_rng(6), {"triton": kernel_device}, 6, 3, band_settings_of,
                                         band_case)
    assert compared >= 0.9 * total, (compared, total)


def test_api_maps_band_rule_and_the_default_rule() -> None:
    assert RULES["equal_band"] == EQUAL_BAND and RULES["equal"] == EQUAL
    strict = LengthTarget.equal(12, rule="strict")
    assert strict.rule == "strict" and Guidance.of(strict, None) == Guidance(EQUAL, 13, 0.0)
    assert Guidance.of(LengthTarget.equal(12, rule="band"), None) == Guidance(EQUAL_BAND, 13, 0.0)
    assert LengthTarget.equal(12).rule == DEFAULT_EQUAL_RULE == "band"  # chosen by measurement (README)
    assert LengthTarget.equal(12) == LengthTarget("equal", 12, None) == LengthTarget.equal(12, rule="band")
    assert Guidance.of(LengthTarget.at_most(12), None).rule == RULES["at_most_band"]  # measured (README)
    assert Guidance.of(LengthTarget.at_least(12), None).rule == RULES["at_least_band"]
    assert LengthTarget.at_most(12).rule == "band" and LengthTarget.at_least(3).rule == "band"


@pytest.mark.parametrize("make", [
    lambda: LengthTarget.equal(5, rule="fuzzy"),
    lambda: LengthTarget.equal(5, rule=""),
    lambda: LengthTarget("at_most", 5, "soft"),
    lambda: LengthTarget("at_least", 5, "loose"),
])
def test_unknown_or_misplaced_rule_name_is_a_value_error(make) -> None:
    with pytest.raises(ValueError, match="length rule"):
        make()


def test_native_facade_rejects_unknown_rule_name() -> None:
    batch = _native.GuidanceBatch(2, EOS)
    with pytest.raises(ValueError, match="rule: expected one of"):
        batch.admit(0, rule="band", target=5, max_new=10, gamma=0.9)
    batch.admit(0, rule="equal_band", target=5, max_new=10, gamma=0.9)
    assert batch.is_active(0)


def test_cli_length_rule_is_passed_through() -> None:
    from lenvm_rt import cli

    def length(*argv: str):
        return cli._length(cli.build_parser().parse_args(["generate", "--prompt", "hi", *argv]))

    assert length("--length", "7") == LengthTarget.equal(7) == LengthTarget.equal(7, rule=DEFAULT_EQUAL_RULE)
    assert length("--length", "7", "--length-rule", "strict") == LengthTarget.equal(7, rule="strict")
    assert length("--length", "7", "--length-rule", "band") == LengthTarget.equal(7, rule="band")
    with pytest.raises(ValueError, match="--length-rule needs --length"):
        length("--length-rule", "band")
    with pytest.raises(ValueError, match="length rule"):
        length("--length", "7", "--constraint", "at-most", "--length-rule", "soft")
    with pytest.raises(SystemExit):  # argparse: an unknown choice
        length("--length", "7", "--length-rule", "loose")


def test_at_the_target_only_eos_is_in_band():
    """ρ = 0: a token predicting 1.5 more tokens would be inside a ±2 band, but the row must end now."""
    gamma = 0.97
    s = RowState(rule=EQUAL_BAND, target=5, generated=4, max_new=32, gamma=gamma, beta=0.0, seed=0, greedy=True)
    ids = np.array([3, EOS[0], -1], dtype=np.int32)
    logp = np.array([-0.1, -3.0, -np.inf], dtype=np.float32)
    z = np.array([logit_of_length(1.5, gamma), 0.0, 0.0], dtype=np.float32)
    choice = select_row(ids, logp, z, s, list(EOS), 0.5)
    assert choice.token == EOS[0] and choice.done
