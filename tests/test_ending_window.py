"""The ending window of the At Most and At Least band rules (lenvm_rt/guidance.py, module docstring).

A band row inside its window ends (its only candidate becomes EOS) as soon as the policy gives EOS a probability of
at least END_P; an At Least band row that reaches the end of its window ends whatever EOS's probability. The
end-to-end tests pin the policy's EOS probability at every step (EOS logit = logsumexp of the others + logit(p)),
so the step where each row ends is known exactly.
"""
from __future__ import annotations

import math

import pytest
import torch
from oracle_runtime import EOS, oracle_runtime
from server_helpers import Collector

from lenvm_rt import LengthTarget, Sampling
from lenvm_rt.guidance import END_P, CandidateSettings, EosRule, Guidance, build_candidates, ending_window
from lenvm_rt.server.engine import Engine

CPU = torch.device("cpu")


def rule_of(*lengths: LengthTarget | None) -> EosRule:
    return EosRule([Guidance.of(length, None) if length is not None else None for length in lengths], CPU)


def test_window_bounds_per_rule() -> None:
    assert ending_window(33) == 8 and ending_window(257) == 64 and ending_window(4) == 2  # max(2, ceil(N / 4))
    rule = rule_of(LengthTarget.at_most(32, "band"), LengthTarget.at_least(32, "band"),
                   LengthTarget.at_most(32, "strict"), LengthTarget.equal(32, "band"), None)
    none = [False] * 5
    masks = {step: rule.ending(step) for step in range(60)}  # None: no row in its window yet
    inside = {step: m[0].tolist() if m is not None else none for step, m in masks.items()}
    must = {step: m[1].tolist() if m is not None else none for step, m in masks.items()}
    assert [s for s, m in masks.items() if m is None] == list(range(24))  # the first window opens at step 24
    # At Most band, T = 33, W = 8: the 25th..32nd tokens (steps 24..31); the 33rd is the rule's own forced EOS
    assert [s for s in inside if inside[s][0]] == list(range(24, 32))
    # At Least band: from the target (33rd token, step 32) for W tokens, then it must end (step 40 on)
    assert [s for s in inside if inside[s][1]] == list(range(32, 40))
    assert [s for s in must if must[s][1]] == list(range(40, 60))
    for col in (0, 2, 3, 4):
        assert not any(must[s][col] for s in must)
    for col in (2, 3, 4):
        assert not any(inside[s][col] for s in inside)
    # per-row steps (the server's rows start at different times) give the same answer row by row
    steps = torch.tensor([24, 40, 24, 24, 24])
    assert rule.ending(steps)[0].tolist() == [True, False, False, False, False]
    assert rule.ending(steps)[1].tolist() == [False, True, False, False, False]
    assert rule_of(LengthTarget.at_most(32, "strict"), None).ending(3) is None


def logits_with_eos(others: torch.Tensor, eos_ids: list[int], eos_probs: list[float]) -> torch.Tensor:
    """A [V] logit row whose softmax gives each EOS id its probability in `eos_probs`, the rest as `others`."""
    row = others.clone()
    row[eos_ids] = float("-inf")
    mass = torch.logsumexp(row, dim=0)
    rest = 1.0 - sum(eos_probs)
    for eos, p in zip(eos_ids, eos_probs):
        row[eos] = mass + math.log(p / rest)
    return row


def test_candidates_collapse_to_the_likeliest_eos_inside_the_window_only() -> None:
    V, eos_ids = 64, [2, 5]
    others = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2
    probs = [[0.6 * END_P, 0.6 * END_P],  # each below END_P, together above: ends on id 2 (ties: first)
             [0.3 * END_P, 0.4 * END_P],  # together below: unchanged
             [1e-9, 2e-9],                # must end: ends on id 5, the likelier
             [0.2, 0.1]]                  # outside the window: unchanged
    logits = torch.stack([logits_with_eos(others, eos_ids, p) for p in probs])
    cfg = CandidateSettings.of([Sampling(temperature=0, top_k=8)] * 4, eos_ids, CPU)
    in_window = torch.tensor([True, True, False, False])
    must_end = torch.tensor([False, False, True, False])
    plain = build_candidates(logits, cfg, None, None)
    ids, logp, filled = build_candidates(logits, cfg, None, None, (in_window, must_end))
    full = torch.log_softmax(logits, dim=-1)
    for row, eos in ((0, 2), (2, 5)):
        assert ids[row].tolist() == [eos] * 8 and filled[row].tolist() == [True] + [False] * 7
        assert logp[row, 0] == full[row, eos] and torch.isinf(logp[row, 1:]).all()
    for row in (1, 3):
        assert torch.equal(ids[row], plain[0][row]) and torch.equal(logp[row], plain[1][row])
        assert torch.equal(filled[row], plain[2][row])


@pytest.fixture(scope="module")
def rt_eos_at(tmp_path_factory):
    """Runtimes whose policy gives EOS (id 2) probability p at every step (its other EOS id 1e-12)."""
    made = {}

    def make(p: float):
        if p not in made:
            rt = oracle_runtime(tmp_path_factory.mktemp("ending"), eos_on_top=False)
            policy_logits = rt.model.logits

            def pinned(x: torch.Tensor) -> torch.Tensor:
                logits = policy_logits(x).float()
                ids = [EOS] + sorted(rt.eos_token_ids - {EOS})  # the checkpoint's other EOS id: p = 1e-12
                return torch.stack([logits_with_eos(row, ids, [p] + [1e-12] * (len(ids) - 1)) for row in logits])

            rt.model.logits = pinned
            made[p] = rt
        return made[p]

    return make


PROMPTS = [[5, 17, 42], [9, 8, 7, 6], [100, 101]]
LIKELY, UNLIKELY = 10 * END_P, END_P / 10  # neither reaches the top-k of the tiny policy's near-uniform logits


@pytest.mark.parametrize("sampling", [Sampling(temperature=0, top_k=8), Sampling(temperature=1.0, top_k=8, seed=3)])
def test_band_rows_end_where_the_window_and_the_policy_say(rt_eos_at, sampling) -> None:
    n = 24  # T = 25, W = 6
    w = ending_window(n + 1)

    def counts(p: float, length: LengthTarget) -> list[int]:
        gens = rt_eos_at(p).generate_batch(PROMPTS, max_new_tokens=3 * n, sampling=sampling, length=length)
        assert all(g.finish_reason == "stop" and g.token_ids[-1] in rt_eos_at(p).eos_token_ids for g in gens)
        return [g.num_tokens for g in gens]

    # At Most band: EOS likely enough ends at the window's first token; otherwise the limit's forced EOS
    assert counts(LIKELY, LengthTarget.at_most(n, "band")) == [n + 1 - w] * 3
    assert counts(UNLIKELY, LengthTarget.at_most(n, "band")) == [n + 1] * 3
    # At Least band: EOS likely ends at the target; otherwise the end of the window ends it
    assert counts(LIKELY, LengthTarget.at_least(n, "band")) == [n + 1] * 3
    assert counts(UNLIKELY, LengthTarget.at_least(n, "band")) == [n + 1 + w] * 3
    # the strict At Most rule has no window: likely or not, EOS (outside the candidates) comes at the limit
    assert counts(LIKELY, LengthTarget.at_most(n, "strict")) == [n + 1] * 3


def test_the_server_engine_ends_band_rows_in_their_window_too(rt_eos_at) -> None:
    """The engine's rows start at different steps; each ends where Runtime.generate of it alone ends."""
    rt, n = rt_eos_at(LIKELY), 24
    w = ending_window(n + 1)
    requests = [([5, 17, 42], LengthTarget.at_most(n, "band")), ([9, 8, 7, 6], LengthTarget.at_least(n, "band")),
                ([100, 101], LengthTarget.at_most(n, "strict"))]
    greedy = Sampling(temperature=0, top_k=8)
    engine = Engine(rt, max_batch=2, max_queue=8).start()  # the third request joins when a row leaves
    try:
        collectors = []
        for prompt, length in requests:
            collectors.append(Collector())
            engine.submit(prompt, 3 * n, greedy, Guidance.of(length, None), collectors[-1])
        counts = [len(c.wait()[0]) for c in collectors]
    finally:
        engine.stop()
    assert counts == [n + 1 - w, n + 1, n + 1]
