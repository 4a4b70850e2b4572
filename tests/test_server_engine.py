"""The continuous-batching engine: rows join and leave one running batch, and every request's tokens equal
`Runtime.generate` of the same request alone (plain and guided rows mixed, staggered arrivals), with the same
log-probability and rank of each token under the policy, and the same most probable alternatives."""
from __future__ import annotations

import threading

import pytest
from server_helpers import Collector, tiny_runtime

from lenvm_rt import LengthTarget, Sampling
from lenvm_rt.guidance import Guidance
from lenvm_rt.server.engine import Engine, QueueFull


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return tiny_runtime(tmp_path_factory.mktemp("engine"))


def _requests():
    """(prompt ids, max_new, sampling, length, tilt): plain, sampled, guided by each rule, tilted."""
    return [
        ([5, 17, 42], 9, Sampling(temperature=0, seed=1), None, None),
        ([9, 8, 7, 6, 5, 4], 14, Sampling(temperature=0.9, top_p=0.9, seed=2), None, None),
        ([100, 101], 12, Sampling(temperature=1.0, top_k=15, seed=3), LengthTarget.equal(5), None),
        ([11, 12, 13, 14], 6, Sampling(temperature=0, min_p=0.1, seed=4), LengthTarget.at_most(3), None),
        ([30, 31, 32], 10, Sampling(temperature=1.0, top_k=10, seed=5), LengthTarget.at_least(7), None),
        ([40, 41], 11, Sampling(temperature=0.7, top_k=20, seed=6), None, -2.0),
        ([50], 16, Sampling(temperature=1.0, seed=7), None, None),
        ([60, 61, 62, 63, 64], 8, Sampling(temperature=1.0, top_k=15, seed=8), LengthTarget.equal(3), None),
        ([70, 71, 72], 9, Sampling(temperature=1.0, top_k=12, seed=9), LengthTarget.equal(4, rule="band"), None),
    ]


def test_each_request_equals_runtime_generate_alone(rt):
    tops = [(3 * i) % 7 for i in range(len(_requests()))]  # alternatives asked for: 0 to 6, mixed in one batch
    expected = [rt.generate(p, max_new_tokens=n, sampling=s, length=ln, tilt=t, top_logprobs=top)
                for (p, n, s, ln, t), top in zip(_requests(), tops)]
    engine = Engine(rt, max_batch=4, max_queue=16).start()  # 8 requests through 4 rows: join and leave
    try:
        collectors = []
        for i, (p, n, s, ln, t) in enumerate(_requests()):
            c = Collector()
            engine.submit(p, n, s, Guidance.of(ln, t), c, top_logprobs=tops[i])
            collectors.append(c)
            if i == 2:  # a late arrival joins a batch already running
                collectors[0].done.wait(30)
        for c, gen in zip(collectors, expected):
            tokens, remaining, reason = c.wait()
            assert tokens == gen.token_ids
            assert reason == gen.finish_reason
            assert remaining == pytest.approx(gen.values, rel=1e-5, abs=1e-6)
            assert c.ranks == gen.token_ranks
            assert c.logprobs == pytest.approx(gen.token_logprobs, rel=1e-6, abs=1e-6)
            if gen.top_logprobs:
                assert [[i for i, _ in step] for step in c.tops] == [[i for i, _ in step] for step in gen.top_logprobs]
                assert [lp for step in c.tops for _, lp in step] == pytest.approx(
                    [lp for step in gen.top_logprobs for _, lp in step], rel=1e-6, abs=1e-6)
            else:
                assert c.tops == [None] * len(tokens)
        assert engine.load() == (0, 0)
    finally:
        engine.stop()


def test_plain_runtime_without_value_model(tmp_path):
    rt = tiny_runtime(tmp_path, value=False)
    reqs = [r for r in _requests() if r[3] is None and r[4] is None]
    expected = [rt.generate(p, max_new_tokens=n, sampling=s) for p, n, s, _, _ in reqs]
    engine = Engine(rt, max_batch=2).start()
    try:
        collectors = [Collector() for _ in reqs]
        for c, (p, n, s, _, _) in zip(collectors, reqs):
            engine.submit(p, n, s, None, c)
        assert [c.wait()[0] for c in collectors] == [g.token_ids for g in expected]
        assert all(c.remaining == [] for c in collectors)
        assert [c.ranks for c in collectors] == [g.token_ranks for g in expected]
        for c, g in zip(collectors, expected):
            assert c.logprobs == pytest.approx(g.token_logprobs, rel=1e-6, abs=1e-6)
    finally:
        engine.stop()


def test_submit_refuses_bad_top_logprobs_and_keeps_serving(rt):
    engine = Engine(rt, max_batch=2).start()
    try:
        for bad in (-1, 21, 1.5, True, [2]):
            with pytest.raises(ValueError, match="top_logprobs"):
                engine.submit([5, 6], 3, Sampling(temperature=0, seed=1), None, Collector(), top_logprobs=bad)
        c = Collector()
        engine.submit([5, 6], 3, Sampling(temperature=0, seed=1), None, c, top_logprobs=2)
        tokens, _, reason = c.wait()
        assert tokens == rt.generate([5, 6], max_new_tokens=3, sampling=Sampling(temperature=0)).token_ids
        assert [len(t) for t in c.tops] == [2] * len(tokens) and engine.load() == (0, 0)
    finally:
        engine.stop()


def test_cancel_frees_the_row_and_the_queue_is_bounded(rt):
    engine = Engine(rt, max_batch=1, max_queue=2).start()
    try:
        gate = threading.Event()
        first = Collector()

        def slow(ev):
            first(ev)
            gate.wait(10)  # hold the engine thread inside the first step

        r1 = engine.submit([5, 6], 400, Sampling(temperature=0), None, slow)
        r2c = Collector()
        engine.submit([7, 8], 3, Sampling(temperature=0), None, r2c)
        with pytest.raises(QueueFull):
            engine.submit([9], 3, Sampling(temperature=0), None, Collector())
        r1.cancel()
        gate.set()
        assert first.wait()[2] == "cancelled" and len(first.tokens) < 400
        assert r2c.wait()[2] == "length" and len(r2c.tokens) == 3
        assert engine.load() == (0, 0)
    finally:
        engine.stop()


def test_length_prediction_runs_beside_a_running_batch(rt):
    prompts = [[5, 17, 42], [1, 2, 3, 4]]
    expected = rt.predict_length(prompts)  # before the engine starts: it owns the model while it runs
    tokens = rt.generate(prompts[0], max_new_tokens=30, sampling=Sampling(temperature=0)).token_ids
    engine = Engine(rt, max_batch=2).start()
    try:
        c = Collector()
        engine.submit(prompts[0], 30, Sampling(temperature=0, seed=1), None, c)
        predicted = engine.call(lambda e: e.predict_lengths(prompts)).result(30)
        assert predicted == pytest.approx(expected, rel=1e-4)
        assert c.wait()[0] == tokens
    finally:
        engine.stop()


def test_a_vanishing_temperature_is_served_as_greedy(rt):
    """A temperature whose inverse overflows float32 decodes as temperature 0, guided or not."""
    engine = Engine(rt, max_batch=2, max_queue=4).start()
    try:
        for length in (None, LengthTarget.equal(4)):
            c = Collector()
            engine.submit([7, 8, 9], 6, Sampling(temperature=2e-171, seed=1), Guidance.of(length, None), c)
            tokens, _, _ = c.wait()
            assert tokens == rt.generate([7, 8, 9], max_new_tokens=6, sampling=Sampling(temperature=0),
                                         length=length).token_ids
    finally:
        engine.stop()
