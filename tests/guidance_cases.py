"""Shared drivers of the guided-selection tests: one request set in the C++ core, the specification
(`select_ref.select_row`) and the `kernels.select` backends, random cases, and the decision-margin check.

Exactness. Every implementation computes in float32, but exp and log1p differ by an ulp or two between numpy (the
specification), glibc (C++), torch and the GPU. So differential tests compare exactly every row whose decision
margin is wider than a float64 error bound (`decision_is_robust`); for the rest they only check that the choice
is valid.
Exact ties (identical inputs) are robust: every implementation sends them to the lower slot.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lenvm_rt import _native
from lenvm_rt.kernels import GuidanceState, select
from lenvm_rt.select_ref import (
    AT_LEAST,
    AT_LEAST_BAND,
    AT_MOST,
    AT_MOST_BAND,
    BAND_ABS,
    BAND_REL,
    EQUAL,
    EQUAL_BAND,
    EQUAL_SOFT,
    TILT,
    RowState,
    candidate_scores,
    select_row,
    soft_slot,
    soft_target,
    soft_tilt,
)

EOS = [2, 7]
CAPACITY = 12
EPS = 2.0**-23  # float32 ulp at 1
GAMMAS = (0.5, 0.9, 0.997)


def uniform(seed: int, t: int) -> float:
    return float(_native.philox_uniform(np.array([seed], np.uint64), np.array([t], np.uint32), stream=1)[0])


def admit_all(settings_by_slot: dict[int, dict], devices: dict[str, str] | None = None):
    """The same requests in a C++ batch, a reference state table and one device state table per `select` backend."""
    batch = _native.GuidanceBatch(CAPACITY, EOS)
    ref = {}
    states = {backend: GuidanceState.create(CAPACITY, device) for backend, device in (devices or {}).items()}
    for slot, s in settings_by_slot.items():
        batch.admit(slot, **s)
        ref[slot] = RowState(s["rule"], s["target"], 0, s["max_new"], s["gamma"], s["beta"], s["seed"], s["greedy"])
        for state in states.values():
            state.admit(slot, **s)
    return batch, ref, states


def select_step(state: GuidanceState, backend: str, rows, ids, logp, z):
    """`kernels.select` on the state's device, outputs as numpy arrays."""
    device = state.rule.device
    eos = torch.tensor(EOS, dtype=torch.int32, device=device)
    args = (torch.from_numpy(a).to(device) for a in (rows, ids, logp, z))
    return tuple(x.cpu().numpy() for x in select(*args, state, eos, backend=backend))


def core_step(batch, rows, ids, logp, z):
    out = np.full(len(rows), 99, np.int32), np.full(len(rows), 99, np.int32), np.full(len(rows), 9, np.uint8)
    batch.step(rows, ids, logp, z, *out)
    return out[0], out[1], out[2].astype(bool)


def assert_band_draws_follow_base_probabilities(rule: str, probs: np.ndarray, offsets: np.ndarray, allowed: np.ndarray,
                                                 seed: int) -> None:
    """Sampled `rule` rows whose candidates sit at l̂ = ρ + offsets draw each allowed candidate by its base
    probability renormalised over the allowed ones, and never another (2000 rows x 10 steps in the C++ core).
    Bound: 5 binomial standard deviations per candidate (a false failure has probability < 1e-5 in all)."""
    from lenvm_rt.value_math import logit_of_length

    gamma, capacity, steps, target = 0.997, 2000, 10, 41
    batch = _native.GuidanceBatch(capacity, EOS)
    for slot in range(capacity):
        batch.admit(slot, rule=rule, target=target, max_new=10_000, gamma=gamma, seed=seed + slot)
    rows = np.arange(capacity, dtype=np.int32)
    ids = np.tile(np.arange(10, 10 + len(probs), dtype=np.int32), (capacity, 1))
    logp = np.tile(np.log(probs).astype(np.float32), (capacity, 1))
    counts = np.zeros(len(probs))
    for t in range(steps):
        rho = target - t - 1
        z = np.array([logit_of_length(rho + o, gamma) for o in offsets], np.float32)
        slot, _, _ = core_step(batch, rows, ids, logp, np.tile(z, (capacity, 1)))
        counts += np.bincount(slot, minlength=len(probs))
    n = capacity * steps
    expected = np.where(allowed, probs, 0.0) / probs[allowed].sum()
    assert np.all(counts[~allowed] == 0), counts
    assert np.all(np.abs(counts / n - expected) <= 5 * np.sqrt(expected * (1 - expected) / n)), counts / n


def ref_step(ref, rows, ids, logp, z):
    choices = []
    for b, slot in enumerate(rows):
        s = ref[int(slot)]
        choices.append(select_row(ids[b], logp[b], z[b], s, EOS, uniform(s.seed, s.generated)))
    return choices


def soft_decision_is_robust(ids, logp, z, s: RowState, u_draw: float) -> bool:
    """EQUAL_SOFT: the inside/outside test is clear of its edges, and the choice survives few-ulp perturbations of
    the float32 u (which move the solved λ) and keeps a margin of 1e-9 (relative) over float64 rounding.

    Exact everywhere, so never perturbed: u = 0 (EOS, z = -inf or below the float32 exp range), u = 1 (z >= 16.7:
    exp(-z) is below half an ulp of 1), u* = 0 (ρ = 0) and u* = 1 (exp(-ρ·nlg) < 2^-56). Identical candidates are
    perturbed identically.
    """
    n = int((ids >= 0).sum())
    ids, logp, z = ids[:n], logp[:n], z[:n]
    u, _ = candidate_scores(ids, z, s.gamma, set(EOS))
    u64 = u.astype(np.float64)
    rho = max(s.target - s.generated - 1, 0)
    u_star = soft_target(rho, s.gamma)
    tol = np.where((u64 == 0) | ((u64 == 1) & (z >= 16.7)), 0.0, 16 * EPS * u64)
    tol_star = 0.0 if rho == 0 or -rho * math.log(s.gamma) > 56 * math.log(2) else 4e-16
    for j in (int(np.argmin(u64)), int(np.argmax(u64))):
        if tol[j] + tol_star > 0 and abs(u64[j] - u_star) <= tol[j] + tol_star + 1e-15:
            return False  # u* on the edge of the candidates' range: inside/outside may flip
    tilt = soft_tilt(logp, u, u_star)
    if tilt is None:
        return decision_is_robust(ids, logp, z, dataclasses.replace(s, rule=EQUAL), u_draw)
    _, score, w = tilt
    chosen = soft_slot(score, w, s.greedy, u_draw)
    keys = list(zip(ids.tolist(), z.tolist(), logp.tolist()))
    if s.greedy:
        best = score[chosen]
        if any(keys[j] != keys[chosen] and abs(score[j] - best) <= 1e-9 * (1 + abs(best)) for j in range(n)):
            return False
    else:
        cdf = np.cumsum(w)
        if np.any(np.abs(cdf - u_draw * cdf[-1]) <= 1e-9 * cdf[-1]):
            return False
    rng = np.random.default_rng(n)
    distinct = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    for trial in range(8):
        signs = np.full(len(distinct), [1.0, -1.0][trial]) if trial < 2 else rng.choice([-1.0, 1.0], len(distinct))
        moved_u = u64 + np.array([signs[distinct[key]] for key in keys]) * tol
        moved = soft_tilt(logp, moved_u, u_star + (trial % 3 - 1) * tol_star)
        if moved is None or soft_slot(moved[1], moved[2], s.greedy, u_draw) != chosen:
            return False
    return True


def band_draw_is_robust(in_band: np.ndarray, logp: np.ndarray, greedy: bool, u_draw: float) -> bool:
    """The band rules' choice among the in-band candidates survives float error (logp float64, exact inputs)."""
    if greedy:
        return True  # argmax of exact logp inputs: identical everywhere
    n = len(logp)
    d = np.where(in_band, logp - logp[in_band].max(), 0.0)  # log p relative to the in-band maximum
    p = np.where(in_band, np.exp(d), 0.0)
    err_p = np.where(in_band, p * 16 * EPS * (1 + np.abs(d)) + 1e-37, 0.0)
    cdf, err_cdf = np.cumsum(p), np.cumsum(err_p) + n * EPS * np.cumsum(p)
    r = u_draw * cdf[-1]
    gap = np.abs(cdf - r) > err_cdf + u_draw * err_cdf[-1] + EPS * r
    return bool(np.all(gap | ~in_band))


def decision_is_robust(ids, logp, z, s: RowState, u_draw: float) -> bool:
    """True when a few-ulp error in any float32 score cannot change this row's choice (float64 bounds).

    A score's tolerance is 0 where every implementation computes it exactly (EOS, u = 0 at z = -inf, l̂ = inf at
    z = inf, w = logp at β·u = 0); candidates with identical inputs score identically everywhere.
    """
    if s.rule == EQUAL_SOFT:
        return soft_decision_is_robust(ids, logp, z, s, u_draw)
    n = int((ids >= 0).sum())
    ids, logp, z = ids[:n], logp[:n].astype(np.float64), z[:n].astype(np.float64)
    eos = np.isin(ids, EOS)
    u = np.where(eos, 0.0, 1.0 / (1.0 + np.exp(-z)))
    remaining = np.where(eos, 0.0, np.logaddexp(0.0, z) / -math.log(s.gamma))
    keys = list(zip(eos.tolist(), z.tolist(), (logp if s.rule == TILT else 0 * logp).tolist()))
    t, T = s.generated, s.target

    def separated(score, tol, best) -> bool:
        return all(keys[j] == keys[best] or tol[j] + tol[best] == 0 or abs(score[j] - score[best]) > tol[j] + tol[best]
                   for j in range(n))

    tol_u = np.where(u > 0, 16 * EPS * u + 1e-37, 0.0)  # 1e-37: exp near overflow (z ≈ -88.7) may round to inf
    if s.rule in (EQUAL, EQUAL_BAND):
        rho = max(T - t - 1, 0)
        score = np.abs(remaining - rho)
        tol = np.where((remaining == 0) | np.isinf(score), 0.0, 16 * EPS * remaining + EPS * score)
        if s.rule == EQUAL:
            return separated(score, tol, int(np.argmin(score)))
        band = max(BAND_ABS, BAND_REL * rho)  # exact in float32 too
        if not np.all((tol == 0) | (np.abs(score - band) > tol)):
            return False  # a candidate sits on the band's edge
        in_band = score <= band
        if not in_band.any():
            return separated(score, tol, int(np.argmin(score)))
        return band_draw_is_robust(in_band, logp, s.greedy, u_draw)
    # l̂ against ρ for the At Most / At Least bands: exact at l̂ = 0 (EOS) and l̂ = inf
    tol_r = np.where((remaining == 0) | np.isinf(remaining), 0.0, 16 * EPS * remaining)
    rho = T - t - 1
    clear_of_edge = bool(np.all((tol_r == 0) | (np.abs(remaining - rho) > tol_r)))
    if s.rule in (AT_MOST, AT_MOST_BAND):
        if t + 1 >= T:
            return True
        fallback = separated(u, tol_u, int(np.argmin(u)))
        if s.rule == AT_MOST:
            return fallback
        fits = remaining <= rho
        return clear_of_edge and (band_draw_is_robust(fits, logp, s.greedy, u_draw) if fits.any() else fallback)
    if s.rule in (AT_LEAST, AT_LEAST_BAND):
        if t + 1 >= T and s.rule == AT_LEAST_BAND:
            return band_draw_is_robust(np.ones(n, dtype=bool), logp, s.greedy, u_draw)
        score = u if t + 1 >= T or eos.all() else np.where(eos, -1.0, u)
        fallback = separated(score, tol_u, int(np.argmin(score) if t + 1 >= T else np.argmax(score)))
        if s.rule == AT_LEAST or t + 1 >= T:
            return fallback
        reaches = ~eos & (remaining >= rho)
        return clear_of_edge and (band_draw_is_robust(reaches, logp, s.greedy, u_draw) if reaches.any()
                                  else fallback)
    tilt = float(np.float32(s.beta)) * u
    w = logp + tilt
    tol_w = np.where(tilt == 0, 0.0, 16 * EPS * (np.abs(tilt) + np.abs(w)) + abs(s.beta) * tol_u)
    if s.greedy:
        return separated(w, tol_w, int(np.argmax(w)))
    top = int(np.argmax(w))
    p = np.exp(w - w[top])
    err_p = p * (tol_w + tol_w[top] + 16 * EPS * (1 + np.abs(w - w[top]))) + 1e-37
    cdf, err_cdf = np.cumsum(p), np.cumsum(err_p) + n * EPS * np.cumsum(p)
    r = u_draw * cdf[-1]
    return bool(np.all(np.abs(cdf - r) > err_cdf + u_draw * err_cdf[-1] + EPS * r))


def check_valid(slot: int, token: int, done: bool, ids_row: np.ndarray) -> None:
    n = int((ids_row >= 0).sum())
    assert -1 <= slot < n
    assert token == (EOS[0] if slot < 0 else ids_row[slot])
    if token in EOS:
        assert done




def random_settings(rng: np.random.Generator) -> dict:
    return dict(rule=int(rng.integers(1, 9)), target=int(rng.integers(1, 7)), max_new=int(rng.integers(1, 9)),
                gamma=float(rng.choice(GAMMAS)), beta=float(rng.choice([0.0, rng.normal(0, 5), -1000.0])),
                seed=int(rng.integers(0, 2**64, dtype=np.uint64)), greedy=bool(rng.integers(0, 2)))


def random_candidates(rng: np.random.Generator, batch: int, k: int):
    ids = rng.integers(0, 40, (batch, k)).astype(np.int32)
    ids[rng.random((batch, k)) < 0.25] = rng.choice(EOS)
    for b, n in enumerate(rng.integers(1, k + 1, batch)):
        ids[b, n:] = -1
    logp = (-rng.exponential(2.0, (batch, k))).astype(np.float32)
    z = (rng.normal(0.0, 1.0, (batch, k)) * rng.choice([1.0, 4.0, 12.0], (batch, 1))).astype(np.float32)
    return ids, logp, z


def run_differential(rng: np.random.Generator, steps: int, max_b: int, max_k: int, devices: dict[str, str]) -> tuple:
    batch_size, k = int(rng.integers(1, max_b + 1)), int(rng.integers(1, max_k + 1))
    rows = rng.choice(CAPACITY, batch_size, replace=False).astype(np.int32)
    batch, ref, states = admit_all({int(s): random_settings(rng) for s in rows}, devices)
    compared = total = 0
    for _ in range(steps):
        ids, logp, z = random_candidates(rng, batch_size, k)
        outputs = [core_step(batch, rows, ids, logp, z)]
        outputs += [select_step(state, backend, rows, ids, logp, z) for backend, state in states.items()]
        for b, choice in enumerate(ref_step(ref, rows, ids, logp, z)):
            s = ref[int(rows[b])]
            total += 1
            robust = decision_is_robust(ids[b], logp[b], z[b], s, uniform(s.seed, s.generated))
            compared += robust
            for slot, token, done in outputs:
                check_valid(int(slot[b]), int(token[b]), bool(done[b]), ids[b])
                if robust:
                    assert (int(slot[b]), int(token[b]), bool(done[b])) == (choice.slot, choice.token, choice.done), (
                        f"row {b}: {s}, ids {ids[b]}, logp {logp[b]}, z {z[b]}")
            s.generated += 1
        for slot, s in ref.items():
            assert batch.generated(slot) == s.generated
            assert all(int(state.generated[slot]) == s.generated for state in states.values())
    return compared, total


def compare_three_ways(rng: np.random.Generator, devices: dict[str, str], rounds: int, steps: int,
                       settings: Callable[[np.random.Generator, float], dict],
                       case: Callable[[np.random.Generator, int, int, np.ndarray, float], tuple]) -> tuple[int, int]:
    """Rounds of 1-5 rows of one γ, `settings(rng, γ)` per row, `steps` steps of `case(rng, B, K, T - t, γ)`
    candidates: the C++ core and each `select` backend in `devices` make the specification's choice on every
    row whose decision is robust, and a valid one on the rest. Returns (rows compared exactly, rows)."""
    compared = total = 0
    for _ in range(rounds):
        rows = rng.choice(CAPACITY, int(rng.integers(1, 6)), replace=False).astype(np.int32)
        gamma = float(rng.choice(GAMMAS))
        batch, ref, states = admit_all({int(r): settings(rng, gamma) for r in rows}, devices)
        for _ in range(steps):
            left = np.array([ref[int(r)].target - ref[int(r)].generated for r in rows])
            ids, logp, z = case(rng, len(rows), int(rng.integers(1, 13)), left, gamma)
            outputs = [core_step(batch, rows, ids, logp, z)]
            outputs += [select_step(state, backend, rows, ids, logp, z) for backend, state in states.items()]
            for b, choice in enumerate(ref_step(ref, rows, ids, logp, z)):
                s = ref[int(rows[b])]
                robust = decision_is_robust(ids[b], logp[b], z[b], s, uniform(s.seed, s.generated))
                total += 1
                compared += robust
                for slot, token, done in outputs:
                    check_valid(int(slot[b]), int(token[b]), bool(done[b]), ids[b])
                    if robust:
                        got = (int(slot[b]), int(token[b]), bool(done[b]))
                        assert got == (choice.slot, choice.token, choice.done), (s, ids[b], logp[b], z[b])
                s.generated += 1
    return compared, total


@pytest.fixture(autouse=True)
def quiet_float_errors():
    """The specification's np.exp overflows (to the intended inf) for z < -88; so does the interpreted kernel.

    Autouse in every test module that imports it."""
    with np.errstate(over="ignore", under="ignore"):
        yield
