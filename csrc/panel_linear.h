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
// Storage: panels hold float32 values, or 16-bit ones when every weight is exactly a bfloat16 value (its lower
// 16 bits zero, as a float32 loaded from a bfloat16 checkpoint is) or a float16 value (a float16 checkpoint).
// Each 16-bit value is widened back to its float32 exactly before the multiply-add, so the results are those of
// the float32 panels, bit for bit, at half the bytes.
#pragma once

#include <cstdint>

#include "thread_pool.h"

namespace lenvm {

constexpr std::int64_t kPanelRows = 8;

inline std::int64_t panel_count(std::int64_t n) { return (n + kPanelRows - 1) / kPanelRows; }

enum class Storage : std::uint8_t { f32, bf16, f16 };

// Packed weights: float32 panels, or the bfloat16 / float16 bits of weights that are exactly such values.
struct Panels {
    const void* data;
    Storage storage;
};

// panels [panel_count(n), k, 8] from w [n, k], stored as `storage` (a 16-bit storage: panels of std::uint16_t
// bits). Every w value must be exact in that storage (storage_exact), or it is rounded.
void pack_panels(const float* w, std::int64_t n, std::int64_t k, Storage storage, void* panels);
// Whether each of the `count` values is exactly a value of `storage`.
bool storage_exact(const float* w, std::int64_t count, Storage storage);

void panel_linear(const float* x, Panels panels, const float* bias, float* out, std::int64_t m, std::int64_t n,
                  std::int64_t k, ThreadPool& pool);

}  // namespace lenvm
