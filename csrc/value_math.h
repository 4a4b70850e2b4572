// LenVM value math (LENVM.md §1, §6), the C++ mirror of lenvm_rt/value_math.py.
//
// Per-candidate scores in float32, shared by the guidance controller:
//   value_of_logit(z)                  u = σ(z) = 1 / (1 + exp(-z))                      in [0, 1]
//   remaining_from_logit(z, nlg)       l̂ = softplus(z) / nlg, softplus(z) = max(z, 0) + log1p(exp(-|z|))
//   neg_log_gamma(gamma)               nlg = float32(-ln γ), the logarithm taken in double
//
// Every operation is a separately rounded float32 operation written exactly like lenvm_rt/select_ref.py
// (numpy float32): the file that includes this header is compiled with -ffp-contract=off, so no multiply-add
// is fused. z = ±inf is fine (u = 1 or 0, l̂ = inf or 0); NaN in gives NaN out. Callers apply the EOS rule
// (u = l̂ = 0) themselves.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "errors.h"

namespace lenvm {

inline float value_of_logit(float z) { return 1.0f / (1.0f + std::exp(-z)); }

inline float remaining_from_logit(float z, float neg_log_gamma) {
    const float softplus = std::max(z, 0.0f) + std::log1p(std::exp(-std::fabs(z)));
    return softplus / neg_log_gamma;
}

inline float neg_log_gamma(double gamma) { return static_cast<float>(-std::log(gamma)); }

// Double-precision value math, same formulas as value_math.py; γ must lie in (0, 1) and lengths be >= 0
// (check_gamma / check_length throw std::invalid_argument otherwise):
//   value_of_length(l, γ)       u = 1 - γ^l = -expm1(l·ln γ)
//   logit_of_length(l, γ)       z = a + ln(1 - e^-a), a = -l·ln γ  (-inf at l = 0; never overflows)
//   remaining_from_logit(z, γ)  l̂ = softplus(z) / (-ln γ)
//   remaining_from_value(u, γ)  l̂ = ln(1 - u) / ln γ, u in [0, 1)
//   td_residual(u0, u1, γ)      δ = γ·u1 - u0 + (1 - γ)
//   gamma_from_lengths(L, q, m) γ = (1 - m)^(1 / L_q), L_q the q-quantile (linear interpolation, as numpy)
namespace math64 {

inline void check_gamma(double gamma) {
    check(gamma > 0.0 && gamma < 1.0, "gamma", "a number in (0, 1)", gamma);
}

inline void check_length(double length) { check(length >= 0.0, "length", ">= 0", length); }

inline double value_of_length(double length, double gamma) {
    return -std::expm1(length * std::log(gamma));
}

inline double logit_of_length(double length, double gamma) {
    if (length == 0.0) return -std::numeric_limits<double>::infinity();
    const double a = -length * std::log(gamma);
    return a + std::log(-std::expm1(-a));
}

inline double remaining_from_logit(double z, double gamma) {
    const double softplus = std::max(z, 0.0) + std::log1p(std::exp(-std::fabs(z)));
    return softplus / -std::log(gamma);
}

inline double remaining_from_value(double u, double gamma) { return std::log1p(-u) / std::log(gamma); }

inline double td_residual(double u_prev, double u_next, double gamma) { return gamma * u_next - u_prev + (1.0 - gamma); }

inline double gamma_from_lengths(std::vector<double> lengths, double quantile, double mass) {
    check(!lengths.empty(), "lengths", "at least one length", "none");
    for (double l : lengths) check(std::isfinite(l) && l >= 1.0, "lengths", "finite values >= 1", l);
    check(quantile > 0.0 && quantile <= 1.0, "quantile", "a number in (0, 1]", quantile);
    check(mass > 0.0 && mass < 1.0, "mass", "a number in (0, 1)", mass);
    std::sort(lengths.begin(), lengths.end());
    const double pos = quantile * static_cast<double>(lengths.size() - 1);
    const auto lo = static_cast<std::size_t>(std::floor(pos));
    const std::size_t hi = std::min(lo + 1, lengths.size() - 1);
    const double l_q = lengths[lo] + (pos - static_cast<double>(lo)) * (lengths[hi] - lengths[lo]);
    return std::pow(1.0 - mass, 1.0 / l_q);
}

}  // namespace math64

}  // namespace lenvm
