"""EOS reachability: length rules see EOS among their candidates from their target on, At Least never before."""
from __future__ import annotations

import pytest
import torch
from mask_flags import flags

from lenvm_rt import LengthTarget, Sampling
from lenvm_rt.guidance import CandidateSettings, EosRule, Guidance, build_candidates

EOS = 7
V = 32


def _logits(eos_rank: int) -> torch.Tensor:
    """One row whose token t has logit -t, except EOS, which sits at `eos_rank` (0 = most probable)."""
    order = [t for t in range(V) if t != EOS]
    order.insert(eos_rank, EOS)
    logits = torch.empty(1, V)
    for rank, token in enumerate(order):
        logits[0, token] = -float(rank)
    return logits


def _settings(k: int) -> CandidateSettings:
    return CandidateSettings.of([Sampling(top_k=k)], [EOS], torch.device("cpu"))


def test_forced_eos_takes_the_last_slot_with_its_own_log_probability():
    logits = _logits(eos_rank=20)
    ids, logp, filled = build_candidates(logits, _settings(4), None, torch.tensor([True]))
    full = torch.log_softmax(logits, dim=-1)[0]
    assert ids[0].tolist()[:3] == [0, 1, 2] and int(ids[0, 3]) == EOS
    assert bool(filled[0].all()) and float(logp[0, 3]) == float(full[EOS])
    unforced, _, _ = build_candidates(logits, _settings(4), None, torch.tensor([False]))
    assert EOS not in unforced[0].tolist()


def test_forcing_leaves_a_candidate_set_that_already_has_eos_alone():
    logits = _logits(eos_rank=1)
    forced = build_candidates(logits, _settings(4), None, torch.tensor([True]))
    plain = build_candidates(logits, _settings(4), None, None)
    assert all(torch.equal(a, b) for a, b in zip(forced, plain))


def test_eos_rule_per_row_and_step():
    guidances = [Guidance.of(LengthTarget.equal(3, rule="strict"), None), Guidance.of(LengthTarget.at_least(2), None),
                 Guidance.of(None, -5.0), None]
    rule = EosRule(guidances, torch.device("cpu"))  # targets T = N + 1: 4 and 3 generated tokens
    ban, force = rule.masks(step=1)  # drawing the 2nd token
    assert flags(ban, 4) == [False, True, False, False] and flags(force, 4) == [False, False, False, False]
    ban, force = rule.masks(step=2)  # the 3rd: At Least's target is reached, Equal's is one away
    assert flags(ban, 4) == [False, False, False, False] and flags(force, 4) == [False, True, False, False]
    _, force = rule.masks(step=3)
    assert flags(force, 4) == [True, True, False, False]  # tilt and unguided rows are never forced
    assert EosRule([None, Guidance.of(None, 1.0)], torch.device("cpu")).masks(0) == (None, None)


def test_host_step_masks_match_tensor_step_masks_and_skip_only_empty_ones():
    guidances = [Guidance.of(LengthTarget.equal(5, rule="strict"), None), Guidance.of(LengthTarget.at_least(3), None),
                 Guidance.of(LengthTarget.at_most(8, "band"), None), Guidance.of(None, -5.0), None]
    rule = EosRule(guidances, torch.device("cpu"))  # targets T: 6, 4, 9 generated tokens; At Least bans before 4
    for step in range(12):
        ban, force = rule.masks(step)
        tensor_ban, tensor_force = rule.masks(torch.tensor(step))
        assert flags(ban, 5) == tensor_ban.tolist() and flags(force, 5) == tensor_force.tolist(), step
        assert (ban is None) == (step + 1 >= 4) and (force is None) == (step + 1 < 4), step
    for steps in ([0, 1, 0, 5, 9], [2, 9, 3, 0, 0], [3, 3, 3, 3, 3], [7, 8, 2, 1, 1], [9, 9, 9, 9, 9]):  # per row
        ban, force = rule.masks(steps)
        tensor_ban, tensor_force = rule.masks(torch.tensor(steps))
        assert flags(ban, 5) == tensor_ban.tolist() and flags(force, 5) == tensor_force.tolist(), steps
        assert (ban is None) == (min(steps) + 1 >= 4) and (force is None) == (max(steps) + 1 < 4), steps
        ending, tensor_ending = rule.ending(steps), rule.ending(torch.tensor(steps))
        assert (ending is None) == (max(steps) + 1 < 4), steps  # At Least 3 (band): its window starts at T = 4
        if ending is not None:
            assert all(torch.equal(a, b) for a, b in zip(ending, tensor_ending)), steps


def test_band_rows_see_no_eos_before_their_target_and_strict_rows_always_do():
    guidances = [Guidance.of(LengthTarget.equal(3, rule="band"), None),
                 Guidance.of(LengthTarget.equal(3, rule="strict"), None)]
    rule = EosRule(guidances, torch.device("cpu"))  # T = 4 generated tokens for both
    for step in range(3):
        ban, force = rule.masks(step)
        assert flags(ban, 2) == [True, False] and flags(force, 2) == [False, False]
    ban, force = rule.masks(step=3)  # the 4th token: the target, EOS forced in for both
    assert flags(ban, 2) == [False, False] and flags(force, 2) == [True, True]


def test_forced_eos_fills_the_first_empty_slot():
    logits = _logits(eos_rank=20)
    logits[0, 0] = 10.0  # one dominant token: min-p leaves a single filled slot
    settings = CandidateSettings.of([Sampling(top_k=6, min_p=0.5)], [EOS], torch.device("cpu"))
    ids, logp, filled = build_candidates(logits, settings, None, torch.tensor([True]))
    assert filled[0].tolist() == [True, True, False, False, False, False]  # filled slots stay in front
    assert int(ids[0, 1]) == EOS and float(logp[0, 1]) == float(torch.log_softmax(logits, -1)[0, EOS])


@pytest.mark.parametrize("temperatures", [(1.0, 1.0, 1.0), (0.7, 1.0, 1.3)], ids=["unit", "mixed"])
def test_ban_and_temperature_give_the_log_softmax_of_the_masked_scaled_logits(temperatures):
    """The builder scales in place of a [B, V] mask and skips the scaling at temperature 1: same bits as the formula."""
    eos_ids = [3, 11]
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5)) * 3
    logits[:, eos_ids] += 4.0  # EOS among the top candidates unless banned
    samplings = [Sampling(temperature=t, top_k=6) for t in temperatures]
    settings = CandidateSettings.of(samplings, eos_ids, torch.device("cpu"))
    assert settings.unit_temperature == (temperatures == (1.0, 1.0, 1.0))
    for ban in (None, torch.tensor([True, False, True])):
        scaled = logits / torch.tensor(temperatures).view(-1, 1) if settings.unit_temperature else \
            logits * settings.inv_temperature
        if ban is not None:
            scaled = scaled.masked_fill(ban.view(-1, 1) & torch.isin(torch.arange(V), torch.tensor(eos_ids)),
                                        float("-inf"))
        expected_logp, expected_ids = torch.log_softmax(scaled, dim=-1).topk(6, dim=-1)
        ids, logp, filled = build_candidates(logits, settings, ban)
        assert bool(filled.all())
        assert torch.equal(ids, expected_ids) and torch.equal(logp, expected_logp)
        if ban is not None:
            eos = torch.tensor(eos_ids)
            assert not torch.isin(ids[ban], eos).any() and torch.isin(ids[1], eos).any()
