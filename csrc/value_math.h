// Per-candidate LenVM scores in float32 (LENVM.md §1, §4.3), shared by the guidance controller.
//
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

namespace lenvm {

inline float value_of_logit(float z) { return 1.0f / (1.0f + std::exp(-z)); }

inline float remaining_from_logit(float z, float neg_log_gamma) {
    const float softplus = std::max(z, 0.0f) + std::log1p(std::exp(-std::fabs(z)));
    return softplus / neg_log_gamma;
}

inline float neg_log_gamma(double gamma) { return static_cast<float>(-std::log(gamma)); }

}  // namespace lenvm
