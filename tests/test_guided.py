"""Length-guided decoding end to end, with a synthetic value model whose answers are known
(tests/oracle_runtime.py): EOS is always the policy's most probable token, so the rules alone decide when to stop.
"""
from __future__ import annotations

import pytest
import torch
from oracle_runtime import GAMMA, ORACLE, oracle_runtime

import lenvm_rt
from lenvm_rt import LengthTarget, Sampling
from lenvm_rt import decode as decode_module
from lenvm_rt.value_math import logit_of_length, remaining_from_logit


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return oracle_runtime(tmp_path_factory.mktemp("guided"), eos_on_top=True)


GUIDED = Sampling(temperature=1.0, top_k=64, seed=5)


@pytest.mark.parametrize("n", [1, 5, 17, 33])
def test_equal_to_hits_the_exact_target(rt, n):
    out = rt.generate([5, 17, 42], max_new_tokens=80, sampling=GUIDED, length=LengthTarget.equal(n))
    assert out.finish_reason == "stop"
    assert out.num_tokens == n + 1  # n tokens of text, then EOS
    assert out.token_ids[-1] in rt.eos_token_ids and not rt.eos_token_ids & set(out.token_ids[:-1])


@pytest.mark.parametrize("n", [1, 5, 17, 33])
def test_band_rule_ends_exactly_at_the_target_though_eos_is_always_most_probable(rt, n):
    for seed in range(3):
        out = rt.generate([5, 17, 42], max_new_tokens=80, sampling=Sampling(temperature=1.0, top_k=64, seed=seed),
                          length=LengthTarget.equal(n, rule="band"))
        assert out.num_tokens == n + 1 and out.finish_reason == "stop"
        assert not rt.eos_token_ids & set(out.token_ids[:-1])


def test_soft_rule_hits_the_target_value_in_expectation_and_ends_exactly_at_the_target(rt):
    """`rule="soft"` over many seeds: every run is n tokens then EOS (EOS waits for the target, though it is the
    policy's favourite), the runs differ (the rule samples), and the chosen tokens' oracle values u = 1 - γ^r average
    to the targets u* = 1 - γ^ρ of their steps. That mean is what the solved tilt promises: an untilted draw (λ = 0)
    misses it by about 0.15, a tilt of the wrong sign by 0.25, and EQUAL's argmin would make every run the same.
    """
    n, runs = 17, 96
    outs = rt.generate_batch([[5, 17, 42]] * runs, max_new_tokens=3 * n,
                             sampling=[Sampling(temperature=1.0, top_k=64, seed=s) for s in range(runs)],
                             length=[LengthTarget.equal(n, rule="soft")] * runs)
    residuals = []
    for out in outs:
        assert out.num_tokens == n + 1 and out.finish_reason == "stop"
        assert out.token_ids[-1] in rt.eos_token_ids and not rt.eos_token_ids & set(out.token_ids[:-1])
        for t, token in enumerate(out.token_ids[:-1]):  # ρ = T - t - 1 = n - t tokens wanted after token t
            residuals.append((1 - GAMMA ** ORACLE[token].item()) - (1 - GAMMA ** (n - t)))
    residuals = torch.tensor(residuals, dtype=torch.float64)
    assert len({tuple(out.token_ids) for out in outs}) > runs // 2
    # Each residual has mean 0 given its step's candidates; 4 standard errors (about 0.012) bound their average.
    sem = residuals.std() / len(residuals) ** 0.5
    assert abs(residuals.mean()) <= 4 * sem and 0.05 < residuals.std(), (residuals.mean(), sem)


@pytest.mark.parametrize("n", [3, 20])
def test_at_least_never_stops_early(rt, n):
    out = rt.generate([9, 8, 7], max_new_tokens=60, sampling=GUIDED, length=LengthTarget.at_least(n))
    assert not rt.eos_token_ids & set(out.token_ids[:n])
    assert out.num_tokens == n + 1 and out.finish_reason == "stop"  # shortest once met: EOS


def test_at_most_never_exceeds_even_without_an_eos_candidate(rt):
    out = rt.generate([9, 8, 7], max_new_tokens=60, sampling=GUIDED, length=LengthTarget.at_most(12, "strict"))
    assert out.num_tokens <= 13 and out.token_ids[-1] in rt.eos_token_ids


def test_tilt_towards_minus_infinity_takes_the_minimum_value_candidate(rt):
    out = rt.generate([9, 8, 7], max_new_tokens=20, sampling=GUIDED, tilt=-1e4)
    assert out.num_tokens == 1 and out.token_ids[0] in rt.eos_token_ids  # u(EOS) = 0 is the minimum
    longer = rt.generate([9, 8, 7], max_new_tokens=20, sampling=GUIDED, tilt=1e4)
    assert longer.num_tokens == 20 and not rt.eos_token_ids & set(longer.token_ids)  # maximum u: never EOS


def test_values_report_the_oracle_remaining_length(rt):
    out = rt.generate([5, 17, 42], max_new_tokens=30, sampling=GUIDED, length=LengthTarget.equal(9))
    expected = [remaining_from_logit(logit_of_length(ORACLE[t].item(), GAMMA), GAMMA) for t in out.token_ids[:-1]]
    assert out.values[:-1] == pytest.approx(expected, rel=1e-4)
    assert out.values[-1] == 0.0 and len(out.values) == out.num_tokens


def test_mixed_batch_equals_each_row_alone(rt):
    prompts = [[5, 17, 42], [9, 8, 7, 6], [100, 101], [11, 12, 13]]
    lengths = [LengthTarget.equal(6), None, LengthTarget.at_least(4), None]
    tilts = [None, None, None, -3.0]
    samplings = [GUIDED, Sampling(temperature=0.9, top_p=0.9, seed=1), GUIDED, Sampling(seed=2, top_k=20)]
    batch = rt.generate_batch(prompts, max_new_tokens=12, sampling=samplings, length=lengths, tilt=tilts)
    for b in range(4):
        alone = rt.generate(prompts[b], max_new_tokens=12, sampling=samplings[b], length=lengths[b], tilt=tilts[b])
        assert batch[b].token_ids == alone.token_ids, f"row {b}"


def test_unguided_row_keeps_its_plain_tokens(rt):
    s = Sampling(temperature=0.8, top_p=0.95, seed=9)
    valued = rt.generate([5, 6, 7], max_new_tokens=10, sampling=s)
    policy_only = lenvm_rt.load(rt.directory, device="cpu")
    policy_only.model.logits = rt.model.logits
    assert valued.token_ids == policy_only.generate([5, 6, 7], max_new_tokens=10, sampling=s).token_ids
    assert len(valued.values) == valued.num_tokens


def test_stream_carries_the_live_prediction(rt):
    events = list(rt.stream([5, 17, 42], max_new_tokens=30, sampling=GUIDED, length=LengthTarget.equal(7)))
    assert len(events) == 8 and events[-1].finish_reason == "stop"
    assert all(e.remaining is not None for e in events) and events[-1].remaining == 0.0


def test_guidance_needs_a_value_model(rt):
    plain = lenvm_rt.load(rt.directory, device="cpu")
    with pytest.raises(ValueError, match="needs a value model"):
        plain.generate([5, 6], max_new_tokens=4, length=LengthTarget.equal(3))
    with pytest.raises(ValueError, match="either length=... or tilt="):
        rt.generate([5, 6], max_new_tokens=4, length=LengthTarget.equal(3), tilt=-1.0)
    with pytest.raises(ValueError, match="tilt must be a finite number"):
        rt.generate([5, 6], max_new_tokens=4, tilt=float("nan"))
    assert rt.generate([5, 6], max_new_tokens=4, length=LengthTarget.equal(2), sampling=GUIDED).finish_reason == "stop"


@pytest.mark.parametrize(("make", "message"), [
    (lambda: LengthTarget.equal(0), "positive int"),
    (lambda: LengthTarget.at_most(-3), "positive int"),
    (lambda: LengthTarget("exactly", 5), "must be one of"),
])
def test_bad_length_targets(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.interpret
@pytest.mark.parametrize("kind", ["kernel", "reference"])
def test_every_selector_makes_the_same_choices(rt, kind, kernel_device, monkeypatch):
    """The C++ controller (default on CPU), the Triton select kernel and the Python reference."""
    import lenvm_rt.decode as decode_module
    from lenvm_rt.selector import KernelSelector, ReferenceSelector

    prompts = [[5, 17, 42], [9, 8, 7, 6], [100, 101]]
    lengths = [LengthTarget.equal(6), LengthTarget.at_most(5), None]
    tilts = [None, None, -2.0]
    samplings = [GUIDED, Sampling(temperature=0.8, top_k=10, seed=4), Sampling(temperature=1.0, top_k=12, seed=6)]
    native = rt.generate_batch(prompts, max_new_tokens=10, sampling=samplings, length=lengths, tilt=tilts)

    def other(guidances, samplings_, seeds, max_new, gamma, eos, device):
        if kind == "kernel":
            return KernelSelector(guidances, samplings_, seeds, max_new, gamma, eos, torch.device(kernel_device))
        return ReferenceSelector(guidances, samplings_, seeds, max_new, gamma, eos)

    monkeypatch.setattr(decode_module, "make_selector", other)
    again = rt.generate_batch(prompts, max_new_tokens=10, sampling=samplings, length=lengths, tilt=tilts)
    assert [g.token_ids for g in again] == [g.token_ids for g in native]


def test_lookahead_skips_the_slots_the_filters_emptied(rt, monkeypatch):
    prompts = [[5, 17, 42], [9, 8, 7, 6], [100, 101]]
    narrow = Sampling(temperature=1.0, top_k=64, min_p=0.05, seed=3)
    favoured = torch.zeros(384)
    favoured[10:20] = torch.linspace(8.0, 4.0, 10)  # a few clearly more probable tokens for min-p to keep
    logits = rt.model.logits
    monkeypatch.setattr(rt.model, "logits", lambda x: logits(x) + favoured)
    kwargs = dict(max_new_tokens=10, sampling=[narrow, GUIDED, narrow],
                  length=[LengthTarget.equal(7), None, LengthTarget.at_least(5)])
    widths: list[int] = []
    lookahead = rt.value.trunk.lookahead

    def recording(cand, *args):
        widths.append(cand.shape[1])
        return lookahead(cand, *args)

    monkeypatch.setattr(rt.value.trunk, "lookahead", recording)
    trimmed = rt.generate_batch(prompts, **kwargs)
    assert widths and 1 < max(widths) < 64  # min-p keeps a few of the 64 slots; the unguided row needs 1
    monkeypatch.setattr(decode_module, "live_width", lambda filled, unguided: filled.shape[1])
    widths.clear()
    full = rt.generate_batch(prompts, **kwargs)
    assert set(widths) == {64}
    assert [o.token_ids for o in trimmed] == [o.token_ids for o in full]


def test_guided_rows_carry_the_policy_log_probabilities_of_their_tokens(rt):
    from lenvm_rt.quality import quality_of_steps, text_quality

    prompt = [5, 17, 42]
    for length in (LengthTarget.equal(9, rule="band"), LengthTarget.at_least(6)):
        out = rt.generate(prompt, max_new_tokens=30, sampling=GUIDED, length=length)
        steps = quality_of_steps(out.token_ids, out.token_logprobs, out.token_ranks, rt.eos_token_ids)
        forward = text_quality(rt.model, prompt, out.token_ids, rt.eos_token_ids)
        assert steps.nll == pytest.approx(forward.nll, abs=1e-4) and steps.mean_rank == forward.mean_rank
        assert steps.nll > 1.0  # EOS is banned or passed over: the chosen tokens are far from the policy's top one


@pytest.mark.parametrize("temperature", [2e-171, 1e-30, 9.9e-6])
def test_a_vanishing_temperature_decodes_greedily_guided_or_not(rt, temperature):
    """1 / temperature overflows float32 here; such rows must equal temperature 0, not fill with NaN."""
    lengths = [LengthTarget.equal(6), None, None]
    tilts = [None, None, -2.0]
    tiny = [Sampling(temperature=temperature, min_p=0.1, seed=3)] * 3
    zero = [Sampling(temperature=0, min_p=0.1, seed=3)] * 3
    prompts = [[5, 17, 42], [9, 8, 7], [100, 101]]
    got = rt.generate_batch(prompts, max_new_tokens=10, sampling=tiny, length=lengths, tilt=tilts)
    want = rt.generate_batch(prompts, max_new_tokens=10, sampling=zero, length=lengths, tilt=tilts)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
