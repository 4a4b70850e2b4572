// fp32 linear layer for batch-1 decoding and skinny GEMMs: out = x @ w.T + bias.
//
// Shapes (row-major, contiguous): x [m, k], w [n, k], bias [n] or nullptr, out [m, n]; any m, n, k >= 0.
// `out` must not overlap the inputs. Work is split over blocks of w rows on `pool`; each w row is read
// once per call for all m rows of x.
//
// Numerical contract: out[i, j] is a function of x[i, :], w[j, :], bias[j] and k only. It does not depend
// on m, on the other rows of x, on the thread count or on block boundaries, because every output element
// is accumulated in one fixed order: 8 lane sums over k in chunks of 8 (the last chunk zero-padded), folded
// as ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)), then bias added. So batched decoding is bit-identical to
// one-by-one decoding. The kernel (AVX2+FMA or portable scalar) is chosen once per process; the two
// kernels round differently (fused vs separate multiply-add), so results are reproducible per kernel.
//
// Kernel choice: AVX2+FMA when the CPU and OS support it, else scalar. The environment variable
// LENVM_RT_LINEAR_KERNEL = "scalar" forces the scalar kernel ("" or "auto": automatic choice; other values
// raise std::invalid_argument on first use).
#pragma once

#include <cstdint>

#include "thread_pool.h"

namespace lenvm {

void linear(const float* x, const float* w, const float* bias, float* out, std::int64_t m, std::int64_t n,
            std::int64_t k, ThreadPool& pool);

// Name of the kernel linear() uses in this process: "avx2_fma" or "scalar".
const char* linear_kernel_name();

}  // namespace lenvm
