"""Length-guided token selection: the plain-Python reference of the step controller.

This file is the specification that the C++ controller (`_core.GuidanceBatch.step`) and the Triton
kernel (`lenvm_rt.kernels.select`) must reproduce choice for choice on identical inputs.

Shapes: B rows, K candidate slots per row, E EOS ids.

Inputs per step
  cand_ids   int32 [B, K]   candidate token ids, most probable first; -1 marks an empty slot (at
                            least slot 0 of every row is filled)
  cand_logp  float32 [B, K] base log-probabilities (after temperature, full-vocabulary normalised)
  cand_z     float32 [B, K] value-head logits of the state each candidate leads to
  state per row (RowState): rule, target T, generated t, max_new, gamma, beta, seed, greedy

Counting. t is the number of tokens the row has generated so far, EOS included; the candidate being
chosen becomes token t+1. A length target of N response tokens (EOS not counted, as in the text a
user reads and LIFEBench scores) is T = N + 1 generated tokens: N tokens, then EOS.

Per candidate, in float32: u = σ(z) and l̂ = softplus(z) / (-ln γ) (tokens left after it), except
that an EOS candidate has u = 0 and l̂ = 0 exactly (LENVM.md §4.3). ρ = max(T - t - 1, 0) is the
number of tokens the target still wants after this one.

Rules (ties go to the lower slot, i.e. the more probable candidate):
  EQUAL     argmin |l̂ - ρ|                                   (length space, LENVM.md §4.5)
  AT_MOST   argmin u (EOS wins when present); at t + 1 >= T the token is EOS even when no
            candidate is EOS (slot -1, id = eos_ids[0]), so the output never exceeds T
  AT_LEAST  while t + 1 < T: argmax u over non-EOS candidates (longest); afterwards argmin u
  TILT      w = logp + β·u; greedy rows take argmax w; others draw by inverse CDF over
            exp(w - max w) in slot order with uniform(seed, offset=t, stream=1)
  EQUAL_BAND  the tolerance band (quality-preserving Equal To): a filled candidate is in band when
            |l̂ - ρ| <= max(BAND_ABS, BAND_REL·ρ) while ρ > 0, and l̂ = 0 (EOS only) once ρ = 0 (float32,
            l̂ and ρ exactly as EQUAL). Greedy rows take the
            in-band argmax of logp; others draw by inverse CDF over exp(logp - max in-band logp), zero out of
            band, in slot order with the uniform of TILT (the first slot whose running sum exceeds U·total,
            else the last in-band slot). No candidate in band: EQUAL's choice. Stop rules as EQUAL.
  AT_MOST_BAND  the quality-preserving At Most: while t + 1 < T the band is every candidate with l̂ <= ρ (it fits
            the budget; EOS always does), chosen from as EQUAL_BAND chooses; none fits: AT_MOST's choice
            (argmin u). At t + 1 >= T: AT_MOST's forced EOS.
  AT_LEAST_BAND the quality-preserving At Least: while t + 1 < T the band is every non-EOS candidate with
            l̂ >= ρ (it reaches the target); none does: AT_LEAST's choice (argmax u over non-EOS). From the
            target on the band is every candidate: the policy's own choice among them, EOS included.
A row is done when its token is EOS or t + 1 >= max_new.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EQUAL, AT_MOST, AT_LEAST, TILT, EQUAL_BAND, EQUAL_SOFT, AT_MOST_BAND, AT_LEAST_BAND = 1, 2, 3, 4, 5, 6, 7, 8
RULES = {"equal": EQUAL, "at_most": AT_MOST, "at_least": AT_LEAST, "tilt": TILT, "equal_band": EQUAL_BAND,
         "equal_soft": EQUAL_SOFT, "at_most_band": AT_MOST_BAND, "at_least_band": AT_LEAST_BAND}
# EQUAL_BAND's half-width max(BAND_ABS, BAND_REL·ρ) in tokens; the same constants in csrc/guidance.h and
# kernels/select.py. Both are powers of two (or small integers), so the float32 product is exact.
BAND_REL = 0.25
BAND_ABS = 2.0
# EQUAL_SOFT's solver: this many iterations, always (no early exit), with λ kept in [-SOFT_BOUND, SOFT_BOUND]; the
# same constants in csrc/guidance.h and kernels/select.py.
SOFT_ITERATIONS = 20
SOFT_BOUND = 1e5
GUIDANCE_STREAM = 1  # Philox stream of guided draws; stream 0 is plain sampling


@dataclass
class RowState:
    rule: int
    target: int  # T, generated tokens including EOS (unused by TILT)
    generated: int  # t
    max_new: int
    gamma: float
    beta: float
    seed: int
    greedy: bool


@dataclass(frozen=True)
class Choice:
    slot: int  # index into the row's candidates; -1 for a forced EOS
    token: int
    done: bool


def candidate_scores(ids: np.ndarray, z: np.ndarray, gamma: float, eos: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(u, l̂) in float32 for one row's candidates; EOS gets exactly 0 for both."""
    z32 = z.astype(np.float32)
    u = (np.float32(1) / (np.float32(1) + np.exp(-z32))).astype(np.float32)
    softplus = (np.maximum(z32, np.float32(0)) + np.log1p(np.exp(-np.abs(z32)))).astype(np.float32)
    remaining = (softplus / np.float32(-math.log(gamma))).astype(np.float32)
    is_eos = np.array([int(t) in eos for t in ids])
    u[is_eos] = 0.0
    remaining[is_eos] = 0.0
    return u, remaining


def band_slot(logp: np.ndarray, in_band: np.ndarray, greedy: bool, uniform: float) -> int:
    """The band rules' choice among >= 1 in-band candidates: argmax logp (greedy) or an inverse-CDF draw."""
    masked = np.where(in_band, logp, np.float32(-np.inf)).astype(np.float32)
    if greedy:
        return int(np.argmax(masked))
    p = np.where(in_band, np.exp(masked - masked.max()), np.float32(0)).astype(np.float32)
    cdf = np.cumsum(p, dtype=np.float32)
    r = np.float32(uniform) * cdf[-1]
    last = int(np.flatnonzero(in_band)[-1])
    return min(int(np.searchsorted(cdf, r, side="right")), last)


def soft_target(rho: float, gamma: float) -> float:
    """u* of EQUAL_SOFT: the value u = 1 - exp(-l̂·nlg) of a candidate with l̂ = ρ, in float64 (nlg = float32(-ln γ))."""
    nlg = float(np.float32(-math.log(gamma)))
    return 1.0 - math.exp(-float(rho) * nlg)


def _soft_moments(a: list[float], d: list[float], lam: float) -> tuple[list[float], list[float]]:
    """(s_j = a_j + λ·d_j, w_j = exp(s_j - max s)) in float64, one correctly ordered operation at a time."""
    s = [aj + lam * dj for aj, dj in zip(a, d)]
    top = max(s)
    return s, [math.exp(sj - top) for sj in s]


def soft_lambda(a: list[float], d: list[float], g: float) -> float:
    """λ with Σ w·d / Σ w = g for w = exp(a + λ·d) (a = logp - max logp, d = u - umin >= 0, 0 < g < max d).

    Exactly SOFT_ITERATIONS iterations from λ = 0 in the bracket [-SOFT_BOUND, SOFT_BOUND]: evaluate the mean m and
    variance v = Σw·d²/Σw - m² at λ, f = m - g; f > 0 moves the upper end of the bracket to λ, f < 0 the lower end;
    the Newton step λ - f/v (when v > 0) is taken if it lies in the bracket (ends included), else the midpoint.
    Sums run in slot order. The C++ core and the kernels run the same operations in the same order.
    """
    lo, hi, lam = -SOFT_BOUND, SOFT_BOUND, 0.0
    for _ in range(SOFT_ITERATIONS):
        _, w = _soft_moments(a, d, lam)
        s0 = s1 = s2 = 0.0
        for wj, dj in zip(w, d):
            s0 += wj
            s1 += wj * dj
            s2 += wj * dj * dj
        m = s1 / s0
        v = s2 / s0 - m * m
        f = m - g
        if f > 0:
            hi = lam
        elif f < 0:
            lo = lam
        step = lam - f / v if v > 0 else math.nan
        lam = step if lo <= step <= hi else 0.5 * (lo + hi)
    return lam


def soft_tilt(logp: np.ndarray, u: np.ndarray, u_star: float) -> tuple[float, list[float], list[float]] | None:
    """EQUAL_SOFT's tilt of one row's filled candidates: (λ, s, w) with p' = w / Σw, or None when u* is outside
    (umin, umax) and the rule makes EQUAL's choice. logp and u are the float32 inputs, widened to float64."""
    u64 = [float(x) for x in u]
    umin, umax = min(u64), max(u64)
    if not umin < u_star < umax:
        return None
    top = max(float(x) for x in logp)
    a = [float(x) - top for x in logp]
    d = [x - umin for x in u64]
    lam = soft_lambda(a, d, u_star - umin)
    s, w = _soft_moments(a, d, lam)
    return lam, s, w


def soft_slot(s: list[float], w: list[float], greedy: bool, uniform: float) -> int:
    """EQUAL_SOFT's choice from the final tilt: argmax s (greedy) or the inverse CDF over w in float64."""
    if greedy:
        return int(np.argmax(np.array(s)))
    total = 0.0
    for wj in w:
        total += wj
    r = float(np.float32(uniform)) * total
    cdf = 0.0
    for j, wj in enumerate(w):
        cdf += wj
        if cdf > r:
            return j
    return len(w) - 1


def select_row(ids: np.ndarray, logp: np.ndarray, z: np.ndarray, s: RowState, eos_ids: list[int],
               uniform: float) -> Choice:
    """One row's choice; `uniform` is Philox(seed, t, stream=1), used only by sampled TILT, band and EQUAL_SOFT
    rows."""
    valid = ids >= 0
    n = int(valid.sum())
    ids, logp, z = ids[:n], logp[:n].astype(np.float32), z[:n]
    eos = set(eos_ids)
    u, remaining = candidate_scores(ids, z, s.gamma, eos)
    t, T = s.generated, s.target
    if s.rule in (EQUAL, EQUAL_BAND, EQUAL_SOFT):
        rho = np.float32(max(T - t - 1, 0))
        distance = np.abs(remaining - rho).astype(np.float32)
        slot = int(np.argmin(distance))
        limit = max(np.float32(BAND_ABS), np.float32(BAND_REL) * rho) if rho > 0 else np.float32(0)
        in_band = distance <= limit
        if s.rule == EQUAL_BAND and in_band.any():
            slot = band_slot(logp, in_band, s.greedy, uniform)
        if s.rule == EQUAL_SOFT:
            tilt = soft_tilt(logp, u, soft_target(float(rho), s.gamma))
            if tilt is not None:
                slot = soft_slot(tilt[1], tilt[2], s.greedy, uniform)
    elif s.rule in (AT_MOST, AT_MOST_BAND):
        if t + 1 >= T:
            eos_slots = [j for j in range(n) if int(ids[j]) in eos]
            slot = eos_slots[0] if eos_slots else -1
        else:
            slot = int(np.argmin(u))
            fits = remaining <= np.float32(T - t - 1)
            if s.rule == AT_MOST_BAND and fits.any():
                slot = band_slot(logp, fits, s.greedy, uniform)
    elif s.rule in (AT_LEAST, AT_LEAST_BAND):
        non_eos = np.array([int(x) not in eos for x in ids])
        if t + 1 < T:
            masked = np.where(non_eos, u, np.float32(-1)) if non_eos.any() else u
            slot = int(np.argmax(masked))
            reaches = non_eos & (remaining >= np.float32(T - t - 1))
            if s.rule == AT_LEAST_BAND and reaches.any():
                slot = band_slot(logp, reaches, s.greedy, uniform)
        elif s.rule == AT_LEAST_BAND:
            slot = band_slot(logp, np.ones(n, dtype=bool), s.greedy, uniform)
        else:
            slot = int(np.argmin(u))
    elif s.rule == TILT:
        w = (logp + np.float32(s.beta) * u).astype(np.float32)
        if s.greedy:
            slot = int(np.argmax(w))
        else:
            p = np.exp(w - w.max()).astype(np.float32)
            cdf = np.cumsum(p, dtype=np.float32)
            r = np.float32(uniform) * cdf[-1]
            slot = min(int(np.searchsorted(cdf, r, side="right")), n - 1)
    else:
        raise ValueError(f"unknown rule {s.rule}")
    token = int(ids[slot]) if slot >= 0 else eos_ids[0]
    done = token in eos or t + 1 >= s.max_new
    return Choice(slot=slot, token=token, done=done)
