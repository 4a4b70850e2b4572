// The LenVM value head on the CPU in fp32, one call for a batch of hidden states:
//
//   z[r] = b2 + sum_j w2[j] silu((w1 rms_norm(x[r]) + b1)[j])
//
// Shapes: x [R, D] (the trunk's last hidden states, before its final norm), norm [D], w1 [H, D], b1 [H], w2 [H].
// The norm and the silu are decode_ops.h's, the product is lenvm::linear (so a row's z never depends on R or the
// thread count); the sum over j runs in double in increasing j and is rounded once. Shapes are checked by the
// caller (csrc/bindings.cpp).
#pragma once

#include <cstdint>

#include "thread_pool.h"

namespace lenvm {

void value_head(const float* x, const float* norm, float eps, const float* w1, const float* b1, const float* w2,
                float b2, float* z, std::int64_t rows, std::int64_t d, std::int64_t hidden, ThreadPool& pool);

}  // namespace lenvm
