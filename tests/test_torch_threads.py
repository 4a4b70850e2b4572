"""one_torch_thread: a CPU decode step's torch ops run on one thread, and the count comes back afterwards, also
after an exception, nested, and in each of two threads whose steps overlap; the chooser and the candidate builder
run inside it and give the same bits as outside it."""
from __future__ import annotations

import threading

import pytest
import torch

from lenvm_rt import Sampling
from lenvm_rt import guidance as guidance_module
from lenvm_rt.guidance import CandidateSettings, build_candidates
from lenvm_rt.sampling import TokenChooser
from lenvm_rt.torch_threads import one_torch_thread

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_inside_restored_after(two_threads):
    with one_torch_thread(CPU):
        assert torch.get_num_threads() == 1
        with one_torch_thread(CPU):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"), one_torch_thread(CPU):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with one_torch_thread(torch.device("meta")):  # not the CPU: nothing changes
        assert torch.get_num_threads() == 2


def test_overlapping_steps_of_two_threads_restore_each_count(two_threads):
    inside, leave = threading.Event(), threading.Event()
    seen = []

    def other() -> None:
        torch.set_num_threads(2)
        with one_torch_thread(CPU):
            seen.append(torch.get_num_threads())
            inside.set()
            leave.wait(10)
        seen.append(torch.get_num_threads())

    with one_torch_thread(CPU):  # this thread enters first ...
        t = threading.Thread(target=other)
        t.start()
        assert inside.wait(10)
    assert torch.get_num_threads() == 2  # ... and leaves first, its count back while the other is inside
    leave.set()
    t.join(10)
    assert seen == [1, 2] and torch.get_num_threads() == 2


def test_chooser_and_candidates_run_on_one_thread_with_the_same_bits(two_threads, monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40000, generator=g) * 4  # big enough for torch to go parallel outside
    samplings = [Sampling(temperature=0.8, top_p=0.9, seed=1), Sampling(temperature=1.0, top_k=15, seed=2),
                 Sampling(temperature=1.3, min_p=0.05, seed=3)]
    threads_seen = []
    real_draw, real_candidates = TokenChooser._draw, guidance_module._candidates

    def draw(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return real_draw(*args, **kwargs)

    def candidates(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return real_candidates(*args, **kwargs)

    settings = CandidateSettings.of(samplings, frozenset({2}), CPU)
    ban = torch.tensor([True, False, True])
    drawn = TokenChooser(samplings, CPU)(logits, [0, 5, 9])
    built = build_candidates(logits, settings, ban)
    with_two = (TokenChooser(samplings, CPU)._draw(logits, [0, 5, 9]), guidance_module._candidates(
        logits, settings, ban, None, None))  # the same ops on two threads
    monkeypatch.setattr(TokenChooser, "_draw", draw)
    monkeypatch.setattr(guidance_module, "_candidates", candidates)
    TokenChooser(samplings, CPU)(logits, [0, 5, 9])
    build_candidates(logits, settings, ban)
    assert threads_seen == [1, 1] and torch.get_num_threads() == 2
    assert torch.equal(drawn, with_two[0])
    for a, b in zip(built, with_two[1]):
        assert torch.equal(a, b)
