"""The native chosen-token statistics (csrc/token_stats.h) against a float64 torch log-softmax.

logp must lie within 1e-7 of the float64 value (torch's own float32 log-sum-exp is ~1e-6 off at these sizes) and
the rank must be exact, on both kernels (the AVX2 one in this process, the portable one in a child process with
LENVM_RT_LINEAR_KERNEL=scalar); the decode loop's token_stats gives the same as its torch fallback.
"""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from subproc import run_python

from lenvm_rt import _core, cpu_ops
from lenvm_rt.decode import token_stats


def reference(logits: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(logits).double()
    t = torch.from_numpy(tokens).view(-1, 1)
    chosen = x.gather(1, t)
    return (chosen[:, 0] - torch.logsumexp(x, dim=-1)).numpy(), ((x > chosen).sum(dim=-1) + 1).numpy()


def native(logits: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logp, rank = np.empty(len(tokens)), np.empty(len(tokens), dtype=np.int64)
    _core.token_stats(logits, tokens, logp, rank)
    return logp, rank


def cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for vocab in (1, 7, 8, 16, 23, 513, 1024, 49152, 151936):
        logits = (rng.standard_normal((3, vocab)) * 4).astype(np.float32)
        out.append((f"random V={vocab}", logits, rng.integers(0, vocab, 3)))
    spread = np.linspace(-1e4, 1e4, 4099, dtype=np.float32)[None].repeat(2, 0)  # terms far below e^-87 and 1e4
    out.append(("wide spread", spread, np.array([4098, 2000])))
    ties = np.zeros((2, 64), dtype=np.float32)
    ties[1, :10] = 1.0
    out.append(("ties", ties, np.array([5, 3])))  # rank counts strictly larger entries only: 1 and 1
    banned = (rng.standard_normal((2, 100)) * 3).astype(np.float32)
    banned[:, ::3] = -np.inf  # -inf entries (banned tokens) carry no mass
    out.append(("-inf entries", banned, np.array([1, 4])))
    return [(name, np.ascontiguousarray(x), t.astype(np.int64)) for name, x, t in out]


@pytest.mark.parametrize(("name", "logits", "tokens"), cases(), ids=[c[0] for c in cases()])
def test_matches_float64_log_softmax(name, logits, tokens) -> None:
    logp, rank = native(logits, tokens)
    want_logp, want_rank = reference(logits, tokens)
    np.testing.assert_allclose(logp, want_logp, rtol=0, atol=1e-7)
    assert rank.tolist() == want_rank.tolist()


def several(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """[R, 6] chosen tokens per row: the case's own, four random ones and the row's argmax."""
    rng = np.random.default_rng(1)
    picks = [tokens, *(rng.integers(0, logits.shape[1], len(tokens)) for _ in range(4)), logits.argmax(axis=1)]
    return np.ascontiguousarray(np.stack(picks, axis=1).astype(np.int64))


@pytest.mark.parametrize(("name", "logits", "tokens"), cases(), ids=[c[0] for c in cases()])
def test_several_tokens_per_row_match_one_at_a_time(name, logits, tokens) -> None:
    many = several(logits, tokens)
    logp, rank = np.empty(many.shape), np.empty(many.shape, dtype=np.int64)
    _core.token_stats(logits, many, logp, rank)
    for i in range(many.shape[1]):
        want_logp, want_rank = reference(logits, many[:, i].copy())
        np.testing.assert_allclose(logp[:, i], want_logp, rtol=0, atol=1e-7)
        assert rank[:, i].tolist() == want_rank.tolist()


def test_portable_kernel_matches_too() -> None:
    code = textwrap.dedent("""
        import json, numpy as np
        from lenvm_rt import _core
        rng = np.random.default_rng(1)
        out = []
        for vocab in (5, 49152):
            x = (rng.standard_normal((2, vocab)) * 4).astype(np.float32)
            t = rng.integers(0, vocab, 2).astype(np.int64)
            t = np.stack([t, x.argmax(axis=1), rng.integers(0, vocab, 2)], axis=1).astype(np.int64)  # [2, 3]
            lp, rk = np.empty(t.shape), np.empty(t.shape, dtype=np.int64)
            _core.token_stats(x, t, lp, rk)
            out.append([_core.linear_kernel(), lp.tolist(), rk.tolist()])
        print(json.dumps(out))
    """)
    done = run_python(code, env={**os.environ, "LENVM_RT_LINEAR_KERNEL": "scalar"})
    assert done.returncode == 0, done.stderr
    rng = np.random.default_rng(1)
    for (kernel, logp, rank), vocab in zip(json.loads(done.stdout), (5, 49152)):
        x = (rng.standard_normal((2, vocab)) * 4).astype(np.float32)
        t = rng.integers(0, vocab, 2).astype(np.int64)
        t = np.stack([t, x.argmax(axis=1), rng.integers(0, vocab, 2)], axis=1).astype(np.int64)
        assert kernel == "scalar"
        for i in range(t.shape[1]):
            want_logp, want_rank = reference(x, t[:, i].copy())
            np.testing.assert_allclose(np.array(logp)[:, i], want_logp, rtol=0, atol=1e-9)
            assert np.array(rank)[:, i].tolist() == want_rank.tolist()


def test_nan_and_inf_rows_give_nan_and_leave_other_rows_alone() -> None:
    logits = np.zeros((3, 40), dtype=np.float32)
    logits[0, 7] = np.nan
    logits[1, 39] = np.inf
    logits[2, 3] = 2.0
    logp, rank = native(logits, np.array([0, 0, 3], dtype=np.int64))
    assert np.isnan(logp[0]) and np.isnan(logp[1])
    assert logp[2] == pytest.approx(2.0 - np.log(39 + np.exp(2.0)), abs=1e-7) and rank[2] == 1
    assert rank[1] == 2  # the +inf entry is larger than the chosen 0


@pytest.mark.parametrize(("logits", "tokens", "error", "name"), [
    (np.zeros((2, 5), np.float32), np.array([0, 5]), IndexError, "tokens"),
    (np.zeros((2, 5), np.float32), np.array([-1, 0]), IndexError, "tokens"),
    (np.zeros((2, 5), np.float32), np.array([0]), ValueError, "tokens"),
    (np.zeros(5, np.float32), np.array([0]), ValueError, "logits"),
    (np.zeros((2, 0), np.float32), np.array([0, 0]), ValueError, "logits"),
    (np.zeros((2, 5), np.float32), np.array([[0, 1], [2, 5]]), IndexError, "tokens"),
    (np.zeros((2, 5), np.float32), np.zeros((2, 0)), ValueError, "tokens"),
    (np.zeros((2, 5), np.float32), np.zeros((2, 1, 1)), ValueError, "tokens"),
])
def test_bad_input_is_refused_by_name(logits, tokens, error, name) -> None:
    logp, rank = np.full(tokens.shape, 7.0), np.full(tokens.shape, 7, dtype=np.int64)
    with pytest.raises(error, match=name):
        _core.token_stats(logits, tokens.astype(np.int64), logp, rank)
    assert (logp == 7.0).all() and (rank == 7).all()  # nothing written
    with pytest.raises(ValueError, match="logp"):  # outputs shaped like the tokens
        _core.token_stats(np.zeros((2, 5), np.float32), np.zeros((2, 3), np.int64), np.empty(2),
                          np.empty((2, 3), np.int64))
    with pytest.raises(TypeError):  # no silent conversion of the dtype
        _core.token_stats(np.zeros((1, 5), np.float64), np.zeros(1, np.int64), np.empty(1), np.empty(1, np.int64))
    assert native(np.ones((1, 4), np.float32), np.array([2], dtype=np.int64))[1].tolist() == [1]  # still usable


def test_decode_token_stats_native_and_torch_paths_agree() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3000, generator=g) * 5
    tokens = torch.tensor([0, 17, 2999, 1500])
    fast = token_stats(logits, tokens)
    direct = cpu_ops.token_stats(logits, tokens)
    slow = token_stats(logits.t().contiguous().t(), tokens)  # not contiguous: the torch path
    assert torch.equal(fast[0], direct[0]) and torch.equal(fast[1], direct[1])
    assert fast[0].double().tolist() == pytest.approx(slow[0].double().tolist(), abs=2e-5)
    assert fast[1].tolist() == slow[1].tolist()


def test_decode_host_values_cpu_and_device_paths_agree_also_for_a_token_outside_the_candidates() -> None:
    from lenvm_rt.decode import cpu_candidate_stats, host_values

    g = torch.Generator().manual_seed(5)
    B, K, V, gamma = 3, 4, 500, 0.99
    logits = torch.randn(B, V, generator=g) * 3
    cand = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B)])
    z = torch.randn(B, K, generator=g) * 4
    slot = torch.tensor([2, 0, 3])
    chosen = cand[torch.arange(B), slot]
    forced = chosen.clone()
    forced[1] = next(t for t in range(V) if t not in cand[1].tolist())  # e.g. an EOS forced by the controller
    stats = cpu_candidate_stats(logits, cand)
    for tokens in (chosen, forced):
        ids, logp, rank, remaining = host_values(logits, tokens, slot, z, gamma, stats)
        want = host_values(logits, tokens, slot, z, gamma, None)  # the device path: statistics after the choice
        want_logp, want_rank = reference(logits.numpy(), tokens.numpy())
        assert ids == tokens.tolist() == want[0]
        assert rank == want[2] == want_rank.tolist()
        np.testing.assert_allclose(logp, want_logp, rtol=0, atol=1e-6)
        np.testing.assert_allclose(remaining, want[3], rtol=2e-7)  # Python floats vs torch float32
        closed = [np.logaddexp(0.0, float(z[b, s])) / -np.log(gamma) for b, s in enumerate(slot.tolist())]
        np.testing.assert_allclose(remaining, closed, rtol=1e-6)


def test_chosen_remaining_is_the_closed_form_at_the_chosen_slot_and_zero_after_eos() -> None:
    from lenvm_rt.decode import chosen_remaining

    z = torch.tensor([[0.5, -3.0, 40.0], [2.0, 1.0, -1.0], [-30.0, 0.0, 7.0]])
    gamma = 0.98
    got = chosen_remaining(z, [2, 0, 1], [11, 2, 13], gamma, frozenset({2, 5}))
    assert got[1] == 0.0  # row 1 chose EOS (id 2)
    closed = [np.logaddexp(0.0, z[b, s].item()) / -np.log(gamma) for b, s in ((0, 2), (2, 1))]
    np.testing.assert_allclose([got[0], got[2]], closed, rtol=1e-12)
