// fp32 linear layer over panel-packed weights: out = x @ w.T + bias, with w stored in panels of 8 rows.
//
// Layout: pack_panels turns w [n, k] (row-major) into P = ceil(n / 8) panels [P, k, 8]:
// panels[(p k + kk) 8 + l] = w[8 p + l, kk], zero where 8 p + l >= n. A panel is one contiguous stream, so a
// decode step reads the weights in long sequential runs, and a skinny GEMM broadcasts each x value against
// 8 outputs at once (x rows are regrouped in fours inside the call).
//
// Shapes (row-major, contiguous): x [m, k], panels [P, k, 8], bias [n] or nullptr, out [m, n]; any m, n, k >= 0.
// `out` must not overlap the inputs.
//
// Numerical contract: out[i, j] = (sum over kk = 0..k-1 in increasing order of x[i, kk] w[j, kk], one
// accumulator starting at 0) + bias[j]. It depends only on x[i, :], w[j, :], bias[j] and k: never on m, the
// other rows, the thread count or task boundaries, so a row decoded alone and in a batch get the same bits.
// The AVX2 + FMA kernel fuses each multiply-add; the portable one rounds the product and the sum apart. The
// kernel follows linear.h's choice (LENVM_RT_LINEAR_KERNEL).
//
// Storage: panels hold float32 values, or bfloat16 ones when every weight is a bfloat16 value (its lower 16 bits
// zero, as a float32 loaded from a bfloat16 checkpoint is): each 16-bit value is the upper half of the float32
// and is widened back exactly, so the results are those of the float32 panels, bit for bit, at half the bytes.
#pragma once

#include <cstdint>

#include "thread_pool.h"

namespace lenvm {

constexpr std::int64_t kPanelRows = 8;

inline std::int64_t panel_count(std::int64_t n) { return (n + kPanelRows - 1) / kPanelRows; }

// Packed weights: float32 panels (bf16 false) or the bfloat16 halves of bf16-exact float32 weights (bf16 true).
struct Panels {
    const void* data;
    bool bf16;
};

// panels [panel_count(n), k, 8] from w [n, k].
void pack_panels(const float* w, std::int64_t n, std::int64_t k, float* panels);
// The same layout in bfloat16 halves; every w value must be bf16-exact (bf16_exact), or its lower half is lost.
void pack_panels_bf16(const float* w, std::int64_t n, std::int64_t k, std::uint16_t* panels);
// Whether each of the `count` values is a bfloat16 value (lower 16 bits zero).
bool bf16_exact(const float* w, std::int64_t count);

void panel_linear(const float* x, Panels panels, const float* bias, float* out, std::int64_t m, std::int64_t n,
                  std::int64_t k, ThreadPool& pool);

}  // namespace lenvm
