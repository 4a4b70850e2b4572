"""The band rules of At Most and At Least (AT_MOST_BAND, AT_LEAST_BAND: `LengthTarget.at_most(n, rule="band")`).

Before the target, At Most's band is every candidate predicted to fit the budget (l̂ <= ρ; EOS always fits) and
At Least's every non-EOS candidate predicted to reach it (l̂ >= ρ); the rule follows the policy among them (argmax
logp when greedy, else a draw by base probability) and makes the strict rule's choice when none is in band. At
the target At Most ends (EOS, forced if the filters dropped it) and At Least's band is every candidate.
Checked: membership and fallbacks on random rows, draw frequencies, C++ == specification == torch reference ==
Triton (interpreter), end to end with an oracle value model, and the API / CLI plumbing.
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
    assert_band_draws_follow_base_probabilities,
    compare_three_ways,
    core_step,
    quiet_float_errors,  # noqa: F401  (an autouse fixture)
    ref_step,
    uniform,
)
from mask_flags import flags
from oracle_runtime import EOS as ORACLE_EOS
from oracle_runtime import oracle_runtime

from lenvm_rt import LengthTarget, Sampling
from lenvm_rt.guidance import EosRule, Guidance
from lenvm_rt.select_ref import (
    AT_LEAST,
    AT_LEAST_BAND,
    AT_MOST,
    AT_MOST_BAND,
    RULES,
    RowState,
    candidate_scores,
    select_row,
)
from lenvm_rt.value_math import logit_of_length

STRICT = {AT_MOST_BAND: AT_MOST, AT_LEAST_BAND: AT_LEAST}


def allowed(ids: np.ndarray, z: np.ndarray, s: RowState) -> tuple[np.ndarray, np.ndarray]:
    """(in_band bool[n], l̂ float32[n]) of one row's filled candidates before its target, in the spec's float32."""
    n = int((ids >= 0).sum())
    _, remaining = candidate_scores(ids[:n], z[:n], s.gamma, set(EOS))
    rho = np.float32(s.target - s.generated - 1)
    if s.rule == AT_MOST_BAND:
        return remaining <= rho, remaining
    return ~np.isin(ids[:n], EOS) & (remaining >= rho), remaining


def straddling_case(rng: np.random.Generator, batch: int, k: int, rho: np.ndarray, gamma: float):
    """Random candidates whose predicted lengths lie around each row's ρ: some rows have none in band."""
    ids = rng.integers(0, 40, (batch, k)).astype(np.int32)
    ids[rng.random((batch, k)) < 0.15] = rng.choice(EOS)
    for b, n in enumerate(rng.integers(1, k + 1, batch)):
        ids[b, n:] = -1
    logp = (-rng.exponential(2.0, (batch, k))).astype(np.float32)
    shift = rng.choice([-0.6, 0.0, 0.6], (batch, 1))  # whole rows below, around or above ρ
    lengths = np.maximum(rho[:, None] * (1 + shift + 0.3 * rng.normal(0, 1, (batch, k))), 0.01)
    z = np.vectorize(lambda x: logit_of_length(x, gamma))(lengths).astype(np.float32)
    return ids, logp, z


def bound_settings(rng: np.random.Generator, rule: int | None = None) -> dict:
    return dict(rule=rule or int(rng.choice([AT_MOST_BAND, AT_LEAST_BAND])), target=int(rng.integers(2, 80)),
                max_new=int(rng.integers(1, 200)), gamma=float(rng.choice(GAMMAS)), beta=0.0,
                seed=int(rng.integers(0, 2**64, dtype=np.uint64)), greedy=bool(rng.random() < 0.3))


@pytest.mark.parametrize("rule", [AT_MOST_BAND, AT_LEAST_BAND])
def test_choice_stays_in_band_when_a_candidate_is_inside_else_is_the_strict_choice(rule) -> None:
    rng = np.random.default_rng(rule)
    inside = outside = 0
    for _ in range(120):
        rows = rng.choice(CAPACITY, 8, replace=False).astype(np.int32)
        gamma = float(rng.choice(GAMMAS))
        settings = {int(r): bound_settings(rng, rule) | dict(gamma=gamma) for r in rows}
        batch, ref, _ = admit_all(settings)
        rho = np.array([settings[int(r)]["target"] - 1 for r in rows], np.float64)
        ids, logp, z = straddling_case(rng, len(rows), 12, rho, gamma)
        slots, _, _ = core_step(batch, rows, ids, logp, z)
        for b, choice in enumerate(ref_step(ref, rows, ids, logp, z)):
            s = ref[int(rows[b])]
            in_band, remaining = allowed(ids[b], z[b], s)
            if in_band.any():
                inside += 1
                assert in_band[choice.slot], (ids[b], z[b], remaining)
                # The core may differ from numpy by an ulp of l̂ at the band's edge only.
                edge, slack, core_len = s.target - 1, (s.target - 1) * 1e-5, remaining[slots[b]]
                assert core_len <= edge + slack if rule == AT_MOST_BAND else core_len >= edge - slack
            else:
                outside += 1
                strict = RowState(STRICT[rule], s.target, 0, s.max_new, s.gamma, 0.0, s.seed, s.greedy)
                assert choice == select_row(ids[b], logp[b], z[b], strict, EOS, uniform(s.seed, 0))
                assert choice.slot == slots[b]
    assert inside > 300 and outside > 50, (inside, outside)


@pytest.mark.parametrize("greedy", [False, True])
def test_only_the_fitting_candidate_is_taken_whatever_its_probability(greedy) -> None:
    # ρ = 19 (T = 20, t = 0). At Most: only slot 3 (l̂ = 12, the least probable) fits. At Least: only slot 2 reaches.
    gamma = 0.9
    z = [logit_of_length(x, gamma) for x in (25.0, 30.0, 40.0, 12.0, 60.0)]
    z_least = [logit_of_length(x, gamma) for x in (2.0, 9.0, 40.0, 12.0, 6.0)]
    ids, logp = [10, 11, 12, 13, 14], [-0.1, -1.0, -2.0, -9.0, -3.0]
    for rule, values, expected in ((AT_MOST_BAND, z, 3), (AT_LEAST_BAND, z_least, 2)):
        for seed in range(20):
            settings = dict(rule=rule, target=20, max_new=100, gamma=gamma, beta=0.0, seed=seed, greedy=greedy)
            batch, _, _ = admit_all({3: settings})
            slot, token, done = core_step(batch, np.array([3], np.int32), np.array([ids], np.int32),
                                          np.array([logp], np.float32), np.array([values], np.float32))
            assert (int(slot[0]), int(token[0]), bool(done[0])) == (expected, ids[expected], False)


def test_at_the_target_at_most_ends_and_at_least_follows_the_policy() -> None:
    gamma = 0.97
    ids = np.array([3, 4, EOS[0], -1], np.int32)
    logp = np.array([-2.0, -0.1, -3.0, -np.inf], np.float32)  # slot 1 is the policy's choice
    z = np.array([logit_of_length(x, gamma) for x in (1.0, 50.0, 5.0, 5.0)], np.float32)
    at = dict(target=5, generated=4, max_new=32, gamma=gamma, beta=0.0, seed=0, greedy=True)
    most = select_row(ids, logp, z, RowState(rule=AT_MOST_BAND, **at), EOS, 0.5)
    assert (most.slot, most.token, most.done) == (2, EOS[0], True)
    forced = select_row(ids[[0, 1, 3]], logp[[0, 1, 3]], z[[0, 1, 3]], RowState(rule=AT_MOST_BAND, **at), EOS, 0.5)
    assert (forced.slot, forced.token, forced.done) == (-1, EOS[0], True)
    least = select_row(ids, logp, z, RowState(rule=AT_LEAST_BAND, **at), EOS, 0.5)
    assert (least.slot, least.done) == (1, False)  # the long candidate, as the policy prefers; strict takes EOS
    assert select_row(ids, logp, z, RowState(rule=AT_LEAST, **at), EOS, 0.5).slot == 2


def test_at_most_draws_follow_the_renormalised_base_probabilities_of_the_fitting_candidates() -> None:
    probs = np.array([0.35, 0.2, 0.15, 0.1, 0.1, 0.1])
    offsets = np.array([30.0, 3.0, -4.0, -20.0, 0.5, -1.0])  # l̂ - ρ
    assert_band_draws_follow_base_probabilities("at_most_band", probs, offsets, offsets <= 0, seed=500)


def bound_settings_of(rng: np.random.Generator, gamma: float) -> dict:
    return bound_settings(rng) | dict(gamma=gamma)


def straddling_case_left(rng: np.random.Generator, batch: int, k: int, left: np.ndarray, gamma: float):
    """straddling_case around ρ = max(T - t - 1, 1)."""
    return straddling_case(rng, batch, k, np.maximum(left - 1, 1).astype(np.float64), gamma)


def test_core_and_torch_reference_match_specification() -> None:
    compared, total = compare_three_ways(np.random.default_rng(9), {"torch": "cpu"}, 80, 4, bound_settings_of,
                                         straddling_case_left)
    assert compared >= 0.95 * total, (compared, total)


@pytest.mark.interpret
def test_kernel_matches_core_and_specification(kernel_device) -> None:
    compared, total = compare_three_ways(np.random.default_rng(10), {"triton": kernel_device}, 6, 3, bound_settings_of,
                                         straddling_case_left)
    assert compared >= 0.9 * total, (compared, total)


def test_api_and_cli_map_the_band_rule_of_each_constraint() -> None:
    from lenvm_rt import cli

    assert RULES["at_most_band"] == AT_MOST_BAND and RULES["at_least_band"] == AT_LEAST_BAND
    assert Guidance.of(LengthTarget.at_most(12, "band"), None) == Guidance(AT_MOST_BAND, 13, 0.0)
    assert Guidance.of(LengthTarget.at_least(12, rule="band"), None) == Guidance(AT_LEAST_BAND, 13, 0.0)
    assert Guidance.of(LengthTarget.at_most(12), None) == Guidance(AT_MOST_BAND, 13, 0.0)  # the default
    assert Guidance.of(LengthTarget.at_least(12), None) == Guidance(AT_LEAST_BAND, 13, 0.0)  # the default: band
    for make in (lambda: LengthTarget.at_most(5, "soft"), lambda: LengthTarget.at_least(5, "soft")):
        with pytest.raises(ValueError, match="'soft' applies to the equal constraint only"):
            make()

    def length(*argv: str):
        return cli._length(cli.build_parser().parse_args(["generate", "--prompt", "hi", *argv]))

    for flag, make in (("at-most", LengthTarget.at_most), ("at-least", LengthTarget.at_least)):
        assert length("--length", "7", "--constraint", flag, "--length-rule", "band") == make(7, "band")
    with pytest.raises(ValueError, match="length rule"):
        length("--length", "7", "--constraint", "at-most", "--length-rule", "soft")


def test_at_least_band_rows_see_no_eos_before_their_target() -> None:
    rule = EosRule([Guidance.of(LengthTarget.at_least(3, "band"), None),
                    Guidance.of(LengthTarget.at_most(3, "band"), None)], torch.device("cpu"))  # T = 4
    ban, force = rule.masks(step=1)
    assert flags(ban, 2) == [True, False] and flags(force, 2) == [False, False]
    ban, force = rule.masks(step=3)
    assert flags(ban, 2) == [False, False] and flags(force, 2) == [True, True]


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return oracle_runtime(tmp_path_factory.mktemp("bound_band"), eos_on_top=False)


PROMPTS = [[5, 17, 42], [9, 8, 7, 6], [100, 101]]


def test_greedy_rows_within_budget_decode_as_the_policy_and_strict_rows_do_not(rt) -> None:
    """Every oracle length is <= 40 < ρ while the budget is 60: the band is every candidate, so greedy At Most
    (band) is plain greedy decoding; the strict rule takes the shortest candidate instead."""
    greedy = Sampling(temperature=0, top_k=15)
    plain = rt.generate_batch(PROMPTS, max_new_tokens=12, sampling=greedy)
    band = rt.generate_batch(PROMPTS, max_new_tokens=12, sampling=greedy, length=LengthTarget.at_most(60, "band"))
    strict = rt.generate_batch(PROMPTS, max_new_tokens=12, sampling=greedy, length=LengthTarget.at_most(60, "strict"))
    assert [g.token_ids for g in band] == [g.token_ids for g in plain]
    assert [g.token_ids for g in strict] != [g.token_ids for g in plain]


@pytest.mark.parametrize("seed", range(4))
def test_sampled_band_rows_keep_their_bounds(rt, seed) -> None:
    s = Sampling(temperature=1.0, top_k=20, seed=seed)
    for g in rt.generate_batch(PROMPTS, max_new_tokens=30, sampling=s, length=LengthTarget.at_most(6, "band")):
        assert g.num_tokens <= 7 and g.finish_reason == "stop"  # at most 6 tokens, then EOS
    for g in rt.generate_batch(PROMPTS, max_new_tokens=30, sampling=s, length=LengthTarget.at_least(9, "band")):
        assert g.num_tokens >= 10 or g.finish_reason == "length"  # at least 9 tokens before any EOS
        assert ORACLE_EOS not in g.token_ids[:9]
