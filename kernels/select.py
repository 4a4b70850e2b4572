"""Length-guided selection on the device: each row's rule over its K scored candidates (LENVM.md §4.5-§4.6).

Math:     the rules of lenvm_rt/select_ref.py (the specification; the C++ core `_core.GuidanceBatch.step` makes the
          same choices). Per candidate, in fp32: u = 1/(1 + exp(-z)), l̂ = softplus(z)/nlg with nlg = fp32(-ln γ);
          EOS candidates get u = l̂ = 0. ρ = max(T - t - 1, 0). Ties go to the lower slot.
            EQUAL     argmin |l̂ - ρ|
            AT_MOST   argmin u; once t + 1 >= T the first EOS candidate, else a forced EOS (slot -1, eos_ids[0])
            AT_LEAST  while t + 1 < T argmax u over non-EOS candidates (slot 0 when all are EOS); then argmin u
            TILT      w = logp + β·u; greedy rows take argmax w; others the first slot whose running sum of
                      exp(w - max w) exceeds U·total, U = Philox uniform(seed, offset=t, stream=1) (as tl.rand)
            EQUAL_BAND in band: |l̂ - ρ| <= max(BAND_ABS, BAND_REL·ρ); greedy rows take the in-band argmax of logp,
                      others the first slot whose running sum of exp(logp - max in-band logp) (0 out of band)
                      exceeds U·total with TILT's U, else the last in-band slot; none in band: EQUAL's choice
            AT_MOST_BAND / AT_LEAST_BAND choose as EQUAL_BAND within their own band: before the target the
                      candidates with l̂ <= ρ (At Most) or the non-EOS ones with l̂ >= ρ (At Least), with AT_MOST's or
                      AT_LEAST's choice when none is in band; at the target AT_MOST_BAND forces EOS as AT_MOST and
                      AT_LEAST_BAND's band is every candidate
            EQUAL_SOFT in fp64 on the fp32 u: u* = 1 - exp(-ρ·nlg); u* <= min u or u* >= max u: EQUAL's choice;
                      else p' ∝ exp(a + λ·d), a = logp - max logp, d = u - min u, λ after exactly SOFT_ITERATIONS
                      safeguarded Newton steps in [-SOFT_BOUND, SOFT_BOUND] (select_ref.soft_lambda); greedy rows
                      take argmax(a + λ·d), others the inverse CDF over the fp64 weights with TILT's U
          done = token is EOS or t + 1 >= max_new; then t += 1 for every row.
Shapes:   B rows, K <= 64 candidate slots, C slots of the state table, E EOS ids.
          rows int32[B] (distinct slots of the table), cand_ids int32[B, K] (-1 = empty; filled slots first, slot 0
          filled), cand_logp fp32[B, K] (finite where filled), cand_z fp32[B, K] (not NaN where filled),
          state: GuidanceState of [C] tensors, eos_ids int32[E]
          -> slot int32[B] (-1 = forced EOS), token int32[B], done bool[B]; state.generated[rows] += 1 in place.
Traffic:  one program per row reads 12·K + 40 bytes and writes 13: launch-bound, no tuning.
Contract: no host sync (only tensor metadata is checked, so duplicate rows, NaN or a missing slot 0 are not detected
          here: the C++ core validates the same arrays, and `GuidanceState.admit` validates the state); rows outside
          [0, C) come back as slot = token = -1, done = True and touch no state. No device query at import. GPU
          launches disable fp fusion and use round-to-nearest division so each fp32 operation rounds like numpy's;
          exp, log and the cumulative sum may still differ from numpy's by an ulp, which can change a choice only
          at a near-tie (a decision margin of a few ulp). EQUAL_SOFT's fp64 sums are reductions here (slot order in
          the specification), so its λ may differ in the last bits too. Every row runs EQUAL_SOFT's 21 passes of K
          fp64 exps whatever its rule (one code path, no divergence): negligible next to the launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._compat import tl, triton
from .value_head import describe, use_triton

K_MAX = 64  # candidates live in one register block per program
EQUAL, AT_MOST, AT_LEAST, TILT, EQUAL_BAND, EQUAL_SOFT, AT_MOST_BAND, AT_LEAST_BAND = 1, 2, 3, 4, 5, 6, 7, 8
BAND_REL, BAND_ABS = 0.25, 2.0  # EQUAL_BAND half-width in tokens: the constants of lenvm_rt/select_ref.py
SOFT_ITERATIONS, SOFT_BOUND = 20, 1e5  # EQUAL_SOFT's solver: the constants of lenvm_rt/select_ref.py (the kernel
                                      # spells them out as literals)
GUIDANCE_STREAM = 1  # Philox stream of guided draws; stream 0 is plain sampling
MAX_ABS_BETA = 1e30  # keeps logp + β·u finite for every finite logp (below half an ulp of the fp32 maximum)
_INT32_MAX = 2**31 - 1
_BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class GuidanceState:
    """Per-slot guidance state on one device; every tensor is [C] and written only by `admit` and `select`."""

    rule: torch.Tensor  # int32: EQUAL ... AT_LEAST_BAND (1-8)
    target: torch.Tensor  # int32: T, generated tokens including EOS (unused by TILT)
    generated: torch.Tensor  # int32: t, advanced by `select`
    max_new: torch.Tensor  # int32
    neg_log_gamma: torch.Tensor  # fp32: fp32(-ln γ), the logarithm taken in double as the reference does
    beta: torch.Tensor  # fp32
    seed: torch.Tensor  # int64: bit pattern of the uint64 seed
    greedy: torch.Tensor  # bool

    @classmethod
    def create(cls, capacity: int, device: torch.device | str) -> GuidanceState:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity: expected a positive int, got {capacity!r}")
        i32, f32 = dict(dtype=torch.int32, device=device), dict(dtype=torch.float32, device=device)
        return cls(torch.zeros(capacity, **i32), torch.zeros(capacity, **i32), torch.zeros(capacity, **i32),
                   torch.zeros(capacity, **i32), torch.zeros(capacity, **f32), torch.zeros(capacity, **f32),
                   torch.zeros(capacity, dtype=torch.int64, device=device),
                   torch.zeros(capacity, dtype=torch.bool, device=device))

    def admit(self, slot: int, *, rule: int, target: int, max_new: int, gamma: float, beta: float = 0.0,
              seed: int = 0, greedy: bool = False) -> None:
        """Validate one request's settings on the host (the C++ core's rules) and write them with t = 0."""
        _check_int("slot", slot, 0, self.rule.numel() - 1)
        if isinstance(rule, bool) or not isinstance(rule, int) or not EQUAL <= rule <= AT_LEAST_BAND:
            raise ValueError(f"rule: expected 1 (equal), 2 (at_most), 3 (at_least), 4 (tilt), 5 (equal_band), "
                             f"6 (equal_soft), 7 (at_most_band) or 8 (at_least_band), got {rule!r}")
        _check_int("target", target, 1 if rule != TILT else -(2**31), _INT32_MAX)
        _check_int("max_new", max_new, 1, _INT32_MAX)
        _check_int("seed", seed, 0, 2**64 - 1)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma: expected a number in (0, 1), got {gamma!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not abs(beta) <= MAX_ABS_BETA:
            raise ValueError(f"beta: expected a finite number with |beta| <= 1e30, got {beta!r}")
        if not isinstance(greedy, bool):
            raise ValueError(f"greedy: expected a bool, got {greedy!r}")
        values = (rule, target, 0, max_new, -math.log(gamma), float(beta), seed - 2**64 * (seed >= 2**63), greedy)
        for tensor, value in zip((self.rule, self.target, self.generated, self.max_new, self.neg_log_gamma,
                                  self.beta, self.seed, self.greedy), values):
            tensor[slot] = value  # a host-to-device copy of one scalar: no sync with the device


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: expected an int in [{low}, {high}], got {value!r}")


def _philox_uniform_ref(seed: torch.Tensor, offset: torch.Tensor, stream: int) -> torch.Tensor:
    """fp32 uniform of Philox4x32-10 (key = seed, counter = (offset, stream, 0, 0)), as tl.rand; int64 math."""
    mask = 0xFFFFFFFF

    def mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # 32x32 -> 64 bits in 16-bit halves
        a_lo, a_hi, b_lo, b_hi = a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16
        ll, lh, hl = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo
        mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
        return a_hi * b_hi + (lh >> 16) + (hl >> 16) + (mid >> 16), ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)

    c0 = offset.long() & mask
    c1, c2, c3 = torch.full_like(c0, stream), torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & mask, (seed >> 32) & mask
    for _ in range(10):
        hi_a, lo_a = mulhilo(0xD2511F53, c0)
        hi_b, lo_b = mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    folded = torch.where(c0 >= 2**31, mask - c0, c0)  # int32 x < 0 -> -x - 1, as uint_to_uniform_float
    return folded.float() * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _cumsum_fp32(p: torch.Tensor) -> torch.Tensor:
    """Running sums along dim 1 added one by one in fp32, as numpy's cumsum (torch's CPU cumsum adds in double)."""
    cdf = [p[:, 0]]
    for j in range(1, p.shape[1]):
        cdf.append(cdf[-1] + p[:, j])
    return torch.stack(cdf, dim=1)


def _soft_ref(valid: torch.Tensor, logp: torch.Tensor, u: torch.Tensor, rho: torch.Tensor, nlg: torch.Tensor,
              greedy: torch.Tensor, draw: torch.Tensor, slot_equal: torch.Tensor) -> torch.Tensor:
    """EQUAL_SOFT's slot per row (select_ref.soft_tilt / soft_lambda / soft_slot), vectorised, in float64."""
    inf = float("inf")
    u64 = u.double()
    u_min = torch.where(valid, u64, inf).amin(dim=1)
    u_max = torch.where(valid, u64, -inf).amax(dim=1)
    u_star = 1.0 - torch.exp(-rho.double() * nlg.double())
    inside = (u_min < u_star) & (u_star < u_max)
    logp64 = logp.double()
    a = torch.where(valid, logp64 - torch.where(valid, logp64, -inf).amax(dim=1, keepdim=True), -inf)
    d = torch.where(valid, u64 - u_min[:, None], 0.0)
    g = u_star - u_min
    lam = torch.zeros_like(g)
    lo, hi = lam - SOFT_BOUND, lam + SOFT_BOUND
    for _ in range(SOFT_ITERATIONS):
        score = a + lam[:, None] * d
        w = torch.exp(score - score.amax(dim=1, keepdim=True))
        s0, s1, s2 = w.sum(dim=1), (w * d).sum(dim=1), (w * d * d).sum(dim=1)
        m = s1 / s0
        v = s2 / s0 - m * m
        f = m - g
        hi = torch.where(f > 0, lam, hi)
        lo = torch.where(f < 0, lam, lo)
        step = lam - f / torch.where(v > 0, v, 1.0)
        lam = torch.where((v > 0) & (lo <= step) & (step <= hi), step, 0.5 * (lo + hi))
    score = a + lam[:, None] * d
    cdf = _cumsum_fp32(torch.exp(score - score.amax(dim=1, keepdim=True)))  # sequential sums, here in float64
    r = draw.double() * cdf[:, -1]
    sample = torch.minimum(((cdf <= r[:, None]) & valid).sum(dim=1), valid.sum(dim=1) - 1)
    return torch.where(inside, torch.where(greedy, score.argmax(dim=1), sample), slot_equal)


def select_ref(rows: torch.Tensor, cand_ids: torch.Tensor, cand_logp: torch.Tensor, cand_z: torch.Tensor,
               state: GuidanceState, eos_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Readable torch version, vectorised over rows: the test oracle and the CPU path (same contract as `select`)."""
    rule, target, t, max_new = (x[rows.long()] for x in (state.rule, state.target, state.generated, state.max_new))
    nlg, beta, seed, greedy = (x[rows.long()] for x in (state.neg_log_gamma, state.beta, state.seed, state.greedy))
    valid = cand_ids >= 0  # [B, K]; filled slots come first
    n = valid.sum(dim=1)
    is_eos = (cand_ids[:, :, None] == eos_ids[None, None, :]).any(dim=2) & valid
    z = cand_z.float()
    u = torch.where(is_eos, 0.0, 1.0 / (1.0 + torch.exp(-z)))
    softplus = torch.clamp(z, min=0.0) + torch.log1p(torch.exp(-z.abs()))
    remaining = torch.where(is_eos, 0.0, softplus / nlg[:, None])
    rho = torch.clamp(target - t - 1, min=0).float()
    inf = torch.tensor(float("inf"))
    distance = (remaining - rho[:, None]).abs()
    slot_equal = torch.where(valid, distance, inf).argmin(dim=1)  # argmin: first minimum
    limit = torch.where(rho > 0, torch.clamp(rho * BAND_REL, min=BAND_ABS), 0.0)  # at the target: EOS only
    budget_met = t + 1 >= target
    reaches = torch.where(budget_met[:, None], valid, valid & ~is_eos & (remaining >= rho[:, None]))
    in_band = valid & torch.where((rule == AT_MOST_BAND)[:, None], remaining <= rho[:, None],
                                  torch.where((rule == AT_LEAST_BAND)[:, None], reaches, distance <= limit[:, None]))
    has_band = in_band.any(dim=1)
    band_logp = torch.where(in_band, cand_logp.float(), -inf)
    band_top = torch.where(has_band, band_logp.amax(dim=1), 0.0)
    slot_low_u = torch.where(valid, u, inf).argmin(dim=1)
    slot_high_u = torch.where(valid & ~is_eos, u, -1.0).argmax(dim=1)
    positions = torch.arange(cand_ids.shape[1]).expand_as(cand_ids)
    first_eos = torch.where(is_eos, positions, cand_ids.shape[1]).amin(dim=1)
    first_eos = torch.where(first_eos < cand_ids.shape[1], first_eos, -1)
    w = torch.where(valid, cand_logp.float() + beta[:, None] * u, -inf)
    p = torch.exp(w - w.amax(dim=1, keepdim=True))
    cdf, band_cdf = _cumsum_fp32(p), _cumsum_fp32(torch.exp(band_logp - band_top[:, None]))
    draw = _philox_uniform_ref(seed, t, GUIDANCE_STREAM)
    r, band_r = draw * cdf[:, -1], draw * band_cdf[:, -1]
    slot_sample = torch.minimum(((cdf <= r[:, None]) & valid).sum(dim=1), n - 1)
    last_in_band = torch.where(in_band, positions, -1).amax(dim=1)
    slot_band = torch.where(greedy, band_logp.argmax(dim=1),
                            torch.minimum(((band_cdf <= band_r[:, None]) & valid).sum(dim=1), last_in_band))
    fallback = torch.where(rule == AT_MOST_BAND, slot_low_u,
                           torch.where(rule == AT_LEAST_BAND, slot_high_u, slot_equal))
    slot_band = torch.where(has_band, slot_band, fallback)
    slot_soft = _soft_ref(valid, cand_logp.float(), u, rho, nlg, greedy, draw, slot_equal)
    slot = torch.where(rule == EQUAL, slot_equal,
           torch.where(rule == EQUAL_SOFT, slot_soft,
           torch.where((rule == EQUAL_BAND) | (rule == AT_LEAST_BAND), slot_band,
           torch.where(rule == AT_MOST_BAND, torch.where(budget_met, first_eos, slot_band),
           torch.where(rule == AT_MOST, torch.where(budget_met, first_eos, slot_low_u),
           torch.where(rule == AT_LEAST, torch.where(budget_met, slot_low_u, slot_high_u),
           torch.where(greedy, w.argmax(dim=1), slot_sample)))))))
    chosen = slot.clamp(min=0)[:, None]
    token = torch.where(slot >= 0, cand_ids.gather(1, chosen)[:, 0], eos_ids[0])
    done = (slot < 0) | is_eos.gather(1, chosen)[:, 0] | (t + 1 >= max_new)
    state.generated.index_add_(0, rows.long(), torch.ones_like(rows))
    return slot.int(), token.int(), done


@triton.jit
def _log1p(x):
    """log1p without libdevice (the interpreter has none): Goldberg's correction, a few ulp for x >= 0."""
    w = 1.0 + x
    exact = w == 1.0
    return tl.where(exact, x, tl.log(w) * tl.math.div_rn(x, tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _select_kernel(rows_ptr, ids_ptr, logp_ptr, z_ptr, eos_ptr,                                     # inputs
                   rule_ptr, target_ptr, generated_ptr, max_new_ptr, nlg_ptr, beta_ptr, seed_ptr, greedy_ptr,  # state
                   slot_ptr, token_ptr, done_ptr,                                                   # outputs
                   K, C, E,                                                                          # sizes
                   stride_b,                                                                         # strides
                   BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):                                    # meta
    b = tl.program_id(0)
    s = tl.load(rows_ptr + b)
    in_table = (s >= 0) & (s < C)
    s = tl.where(in_table, s, 0)
    rule = tl.load(rule_ptr + s)
    target = tl.load(target_ptr + s)
    t = tl.load(generated_ptr + s)
    max_new = tl.load(max_new_ptr + s)
    nlg = tl.load(nlg_ptr + s)
    beta = tl.load(beta_ptr + s)
    greedy = tl.load(greedy_ptr + s) != 0

    offs = tl.arange(0, BLOCK_K)
    row = b.to(tl.int64) * stride_b
    ids = tl.load(ids_ptr + row + offs, mask=offs < K, other=-1)
    logp = tl.load(logp_ptr + row + offs, mask=offs < K, other=0.0)
    z = tl.load(z_ptr + row + offs, mask=offs < K, other=0.0)
    valid = ids >= 0
    n = tl.sum(valid.to(tl.int32), axis=0)
    e_offs = tl.arange(0, BLOCK_E)
    eos = tl.load(eos_ptr + e_offs, mask=e_offs < E, other=-1)
    matches = (ids[:, None] == eos[None, :]) & (e_offs < E)[None, :]  # [BLOCK_K, BLOCK_E]
    is_eos = (tl.max(matches.to(tl.int32), axis=1) > 0) & valid

    u = tl.where(is_eos, 0.0, tl.math.div_rn(1.0, 1.0 + tl.exp(-z)))
    softplus = tl.maximum(z, 0.0) + _log1p(tl.exp(-tl.abs(z)))
    remaining = tl.where(is_eos, 0.0, tl.math.div_rn(softplus, nlg))
    rho = tl.maximum(target - t - 1, 0).to(tl.float32)
    distance = tl.abs(remaining - rho)
    slot_equal = tl.argmin(tl.where(valid, distance, float("inf")), axis=0)  # first minimum
    limit = tl.where(rho > 0, tl.maximum(rho * 0.25, 2.0), 0.0)  # BAND_REL, BAND_ABS; at the target: EOS only
    budget_met = t + 1 >= target
    reaches = tl.where(budget_met, valid, valid & ~is_eos & (remaining >= rho))  # AT_LEAST_BAND
    in_band = valid & tl.where(rule == 7, remaining <= rho, tl.where(rule == 8, reaches, distance <= limit))
    has_band = tl.max(in_band.to(tl.int32), axis=0) > 0
    band_logp = tl.where(in_band, logp, float("-inf"))
    slot_band_greedy = tl.argmax(band_logp, axis=0)
    band_top = tl.where(has_band, tl.max(band_logp, axis=0), 0.0)
    band_cdf = tl.cumsum(tl.exp(band_logp - band_top), axis=0)
    last_in_band = tl.max(tl.where(in_band, offs, -1), axis=0)
    slot_low_u = tl.argmin(tl.where(valid, u, float("inf")), axis=0)
    slot_high_u = tl.argmax(tl.where(valid & ~is_eos, u, -1.0), axis=0)
    first_eos = tl.min(tl.where(is_eos, offs, BLOCK_K), axis=0)
    first_eos = tl.where(first_eos < BLOCK_K, first_eos, -1)

    w = tl.where(valid, logp + beta * u, float("-inf"))
    slot_greedy = tl.argmax(w, axis=0)
    cdf = tl.cumsum(tl.exp(w - tl.max(w, axis=0)), axis=0)  # non-decreasing: its max is the total
    seed = tl.load(seed_ptr + s).to(tl.uint64, bitcast=True)
    zero = tl.zeros_like(t).to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, t.to(tl.uint32, bitcast=True), zero + 1, zero, zero)  # stream 1 = guidance
    draw = tl.uint_to_uniform_float(bits)
    r = draw * tl.max(cdf, axis=0)
    slot_sample = tl.minimum(tl.sum((valid & (cdf <= r)).to(tl.int32), axis=0), n - 1)
    band_r = draw * tl.max(band_cdf, axis=0)
    slot_band = tl.minimum(tl.sum((valid & (band_cdf <= band_r)).to(tl.int32), axis=0), last_in_band)
    fallback = tl.where(rule == 7, slot_low_u, tl.where(rule == 8, slot_high_u, slot_equal))
    slot_band = tl.where(has_band, tl.where(greedy, slot_band_greedy, slot_band), fallback)

    # EQUAL_SOFT in fp64 (select_ref.soft_lambda): exactly 20 safeguarded Newton steps in [-1e5, 1e5].
    u64 = u.to(tl.float64)
    u_min = tl.min(tl.where(valid, u64, float("inf")), axis=0)
    u_max = tl.max(tl.where(valid, u64, float("-inf")), axis=0)
    u_star = 1.0 - tl.exp(-rho.to(tl.float64) * nlg.to(tl.float64))
    soft_inside = (u_min < u_star) & (u_star < u_max)
    logp64 = logp.to(tl.float64)
    soft_a = tl.where(valid, logp64 - tl.max(tl.where(valid, logp64, float("-inf")), axis=0), float("-inf"))
    soft_d = tl.where(valid, u64 - u_min, 0.0)
    soft_g = u_star - u_min
    lam = soft_g * 0.0
    lo = lam - 1e5
    hi = lam + 1e5
    for _ in range(20):
        score = soft_a + lam * soft_d
        wt = tl.exp(score - tl.max(score, axis=0))
        s0 = tl.sum(wt, axis=0)
        m = tl.sum(wt * soft_d, axis=0) / s0
        v = tl.sum(wt * soft_d * soft_d, axis=0) / s0 - m * m
        f = m - soft_g
        hi = tl.where(f > 0, lam, hi)
        lo = tl.where(f < 0, lam, lo)
        step = lam - f / tl.where(v > 0, v, 1.0)
        lam = tl.where((v > 0) & (lo <= step) & (step <= hi), step, 0.5 * (lo + hi))
    score = soft_a + lam * soft_d
    soft_cdf = tl.cumsum(tl.exp(score - tl.max(score, axis=0)), axis=0)
    soft_r = draw.to(tl.float64) * tl.max(soft_cdf, axis=0)
    slot_soft = tl.minimum(tl.sum((valid & (soft_cdf <= soft_r)).to(tl.int32), axis=0), n - 1)
    slot_soft = tl.where(soft_inside, tl.where(greedy, tl.argmax(score, axis=0), slot_soft), slot_equal)

    slot = tl.where(greedy, slot_greedy, slot_sample)
    slot = tl.where(rule == 3, tl.where(budget_met, slot_low_u, slot_high_u), slot)
    slot = tl.where(rule == 2, tl.where(budget_met, first_eos, slot_low_u), slot)
    slot = tl.where(rule == 1, slot_equal, slot)
    slot = tl.where((rule == 5) | (rule == 8), slot_band, slot)
    slot = tl.where(rule == 7, tl.where(budget_met, first_eos, slot_band), slot)
    slot = tl.where(rule == 6, slot_soft, slot)
    picked = offs == slot
    token = tl.where(slot >= 0, tl.sum(tl.where(picked, ids, 0), axis=0), tl.load(eos_ptr))
    token_is_eos = (slot < 0) | (tl.sum((picked & is_eos).to(tl.int32), axis=0) > 0)
    tl.store(slot_ptr + b, tl.where(in_table, slot, -1))
    tl.store(token_ptr + b, tl.where(in_table, token, -1))
    tl.store(done_ptr + b, token_is_eos | (t + 1 >= max_new) | ~in_table)
    tl.store(generated_ptr + s, t + 1, mask=in_table)


_STATE_DTYPES = {"rule": torch.int32, "target": torch.int32, "generated": torch.int32, "max_new": torch.int32,
                 "neg_log_gamma": torch.float32, "beta": torch.float32, "seed": torch.int64, "greedy": torch.bool}


def _check_args(rows: torch.Tensor, cand_ids: torch.Tensor, cand_logp: torch.Tensor, cand_z: torch.Tensor,
                state: GuidanceState, eos_ids: torch.Tensor) -> None:
    """Metadata checks only (never reads values): ValueError naming the argument."""
    device = cand_ids.device if isinstance(cand_ids, torch.Tensor) else None
    if device is None or cand_ids.dtype != torch.int32 or cand_ids.dim() != 2 or not cand_ids.is_contiguous():
        got = describe(cand_ids) if device is not None else type(cand_ids).__name__
        raise ValueError(f"cand_ids: expected a contiguous int32 tensor [B, K], got {got}")
    batch, k = cand_ids.shape
    if not 1 <= k <= K_MAX:
        raise ValueError(f"cand_ids: expected 1 <= K <= {K_MAX} candidate slots, got {describe(cand_ids)}")
    expected = {"rows": (rows, torch.int32, (batch,)), "cand_logp": (cand_logp, torch.float32, (batch, k)),
                "cand_z": (cand_z, torch.float32, (batch, k)), "eos_ids": (eos_ids, torch.int32, None)}
    if not isinstance(state, GuidanceState):
        raise ValueError(f"state: expected a GuidanceState, got {type(state).__name__}")
    capacity = state.rule.numel()
    for field, dtype in _STATE_DTYPES.items():
        expected[f"state.{field}"] = (getattr(state, field), dtype, (capacity,))
    for name, (t, dtype, shape) in expected.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        shape_ok = t.dim() == 1 and t.numel() >= 1 if shape is None else tuple(t.shape) == shape
        if t.dtype != dtype or not shape_ok or not t.is_contiguous() or t.device != device:
            want = "[E >= 1]" if shape is None else list(shape)
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor {want} on {device}, got {describe(t)}")


def _select_triton(rows: torch.Tensor, cand_ids: torch.Tensor, cand_logp: torch.Tensor, cand_z: torch.Tensor,
                   state: GuidanceState, eos_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, k = cand_ids.shape
    slot = torch.empty(batch, dtype=torch.int32, device=cand_ids.device)
    token = torch.empty_like(slot)
    done = torch.empty(batch, dtype=torch.bool, device=cand_ids.device)
    if batch:
        # enable_fp_fusion=False: `logp + beta * u` must round twice, like numpy and the C++ core.
        _select_kernel[(batch,)](
            rows, cand_ids, cand_logp, cand_z, eos_ids,
            state.rule, state.target, state.generated, state.max_new, state.neg_log_gamma, state.beta, state.seed,
            state.greedy, slot, token, done,
            k, state.rule.numel(), eos_ids.numel(), cand_ids.stride(0),
            BLOCK_K=max(triton.next_power_of_2(k), 2), BLOCK_E=max(triton.next_power_of_2(eos_ids.numel()), 2),
            enable_fp_fusion=False,
        )
    return slot, token, done


def select(rows: torch.Tensor, cand_ids: torch.Tensor, cand_logp: torch.Tensor, cand_z: torch.Tensor,
           state: GuidanceState, eos_ids: torch.Tensor, *, backend: str = "auto",
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Public op: (slot int32[B], token int32[B], done bool[B]) and state.generated[rows] += 1, without a host sync.

    backend: "triton" (CUDA, or the interpreter), "torch" (`select_ref`), or "auto" (Triton where it can run,
    else the reference). All backends take the same arguments and make the same choices.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    _check_args(rows, cand_ids, cand_logp, cand_z, state, eos_ids)
    if use_triton("select", cand_ids.device, backend):
        return _select_triton(rows, cand_ids, cand_logp, cand_z, state, eos_ids)
    return select_ref(rows, cand_ids, cand_logp, cand_z, state, eos_ids)
