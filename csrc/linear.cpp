// fp32 linear layer (contract in linear.h): out[m, n] = x[m, k] @ w[n, k].T + bias[n].
//
// Structure: linear() cuts the n rows of w into tasks of whole micro-tiles and runs them on the pool. A
// task walks its w rows in groups (kDecodeRows rows when m == 1, kGemmCols rows otherwise) and, for each
// group, every x row in groups of kGemmRows, so each w row comes from memory once and is then reused from
// L1 for all rows of x. Every micro-tile size runs the same per-element sequence (zeroed 8-lane
// accumulator, one fused multiply-add per 8-float chunk of k in increasing order, a zero-padded masked
// chunk for the tail, the fixed lane fold, then bias), which is what makes the result independent of m,
// of tiling and of threading.
#include "linear.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <string>
#include <utility>

#include "cpu_features.h"
#include "errors.h"
#include "simd_avx2.h"

#if LENVM_HAS_X86
#include <immintrin.h>
#endif

namespace lenvm {

namespace {

constexpr std::int64_t kLanes = 8;
constexpr int kDecodeRows = 8;  // w rows per micro-tile when m == 1
constexpr int kGemmRows = 4;    // x rows per micro-tile when m > 1
constexpr int kGemmCols = 3;    // w rows per micro-tile when m > 1
// Task sizing. The cost of one w row is about k * max(m, 4) units: one unit is ~one weight byte streamed
// (m <= 4 is bound by memory bandwidth) or ~one multiply-add (larger m is bound by arithmetic), which take
// similar time on a core. A task is about kTaskCost units, but small matrices are still cut into at least
// kMinTasksPerThread tasks per thread so that the threads finish together. Below kSerialMacs multiply-adds
// the call runs on the calling thread only.
constexpr std::int64_t kTaskCost = 128 * 1024;
constexpr std::int64_t kMinTasksPerThread = 8;
constexpr std::int64_t kSerialMacs = 32 * 1024;

using BlockFn = void (*)(const float* x, const float* w, const float* bias, float* out, std::int64_t m,
                         std::int64_t n, std::int64_t k, std::int64_t row_begin, std::int64_t row_end);

// ---- portable kernel -----------------------------------------------------------------------------------

float fold_lanes(const float (&lanes)[kLanes]) {
    return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

float dot_scalar(const float* x, const float* w, std::int64_t k) {
    float lanes[kLanes] = {};
    std::int64_t kk = 0;
    for (; kk + kLanes <= k; kk += kLanes) {
        for (std::int64_t l = 0; l < kLanes; ++l) lanes[l] += x[kk + l] * w[kk + l];
    }
    for (std::int64_t l = 0; kk + l < k; ++l) lanes[l] += x[kk + l] * w[kk + l];
    return fold_lanes(lanes);
}

void block_scalar(const float* x, const float* w, const float* bias, float* out, std::int64_t m, std::int64_t n,
                  std::int64_t k, std::int64_t row_begin, std::int64_t row_end) {
    for (std::int64_t j = row_begin; j < row_end; ++j) {
        for (std::int64_t i = 0; i < m; ++i) {
            const float dot = dot_scalar(x + i * k, w + j * k, k);
            out[i * n + j] = bias != nullptr ? dot + bias[j] : dot;
        }
    }
}

// ---- AVX2 + FMA kernel ---------------------------------------------------------------------------------

#if LENVM_HAS_X86

// kTailMask + 8 - r holds r all-ones words followed by zeros: the load mask for a tail of r < 8 floats.
constexpr std::int32_t kTailMask[2 * kLanes] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

// out[i * n + j] for i < MR, j < NR from x rows x + i * k and w rows w + j * k. With kPrefetch and a non-null
// `prefetch_w`, the NR rows starting there are prefetched into L1 alongside: the next group of w rows, which
// the hardware prefetcher brings in too late at m > 1, where each group is used for longer. (At m == 1 the
// hardware prefetcher keeps up, and without the prefetch code the w loads fold into the multiply-adds.)
template <int MR, int NR, bool kPrefetch>
LENVM_AVX2_FMA void tile_avx2(const float* x, const float* w, const float* bias, float* out, std::int64_t n,
                              std::int64_t k, const float* prefetch_w) {
    __m256 acc[MR][NR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    }
    const std::int64_t k_main = k - k % kLanes;
    for (std::int64_t kk = 0; kk < k_main; kk += kLanes) {
        __m256 wv[NR];
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * k + kk);
        if (kPrefetch && prefetch_w != nullptr) {
#pragma GCC unroll 16
            for (int j = 0; j < NR; ++j) {
                _mm_prefetch(reinterpret_cast<const char*>(prefetch_w + j * k + kk), _MM_HINT_T0);
            }
        }
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            const __m256 xv = _mm256_loadu_ps(x + i * k + kk);
#pragma GCC unroll 16
            for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (k_main < k) {
        const __m256i mask =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTailMask + kLanes - (k - k_main)));
        __m256 wv[NR];
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j) wv[j] = _mm256_maskload_ps(w + j * k + k_main, mask);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            const __m256 xv = _mm256_maskload_ps(x + i * k + k_main, mask);
#pragma GCC unroll 16
            for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j) {
            const float dot = avx2::fold8(acc[i][j]);
            out[i * n + j] = bias != nullptr ? dot + bias[j] : dot;
        }
    }
}

using TileFn = void (*)(const float* x, const float* w, const float* bias, float* out, std::int64_t n,
                        std::int64_t k, const float* prefetch_w);

template <int MR, bool kPrefetch, std::size_t... J>
constexpr std::array<TileFn, sizeof...(J)> tile_row(std::index_sequence<J...>) {
    return {{&tile_avx2<MR, static_cast<int>(J) + 1, kPrefetch>...}};
}

template <std::size_t... I>
constexpr std::array<std::array<TileFn, kGemmCols>, sizeof...(I)> gemm_tiles(std::index_sequence<I...>) {
    return {{tile_row<static_cast<int>(I) + 1, true>(std::make_index_sequence<kGemmCols>{})...}};
}

// kDecodeTiles[c - 1]: 1 x row, c w rows.  kGemmTiles[r - 1][c - 1]: r x rows, c w rows.
constexpr std::array<TileFn, kDecodeRows> kDecodeTiles =
    tile_row<1, false>(std::make_index_sequence<kDecodeRows>{});
constexpr std::array<std::array<TileFn, kGemmCols>, kGemmRows> kGemmTiles =
    gemm_tiles(std::make_index_sequence<kGemmRows>{});

void block_avx2(const float* x, const float* w, const float* bias, float* out, std::int64_t m, std::int64_t n,
                std::int64_t k, std::int64_t row_begin, std::int64_t row_end) {
    const auto bias_at = [bias](std::int64_t j) { return bias != nullptr ? bias + j : nullptr; };
    if (m == 1) {
        for (std::int64_t j = row_begin; j < row_end; j += kDecodeRows) {
            const auto cols = static_cast<std::size_t>(std::min<std::int64_t>(kDecodeRows, row_end - j));
            kDecodeTiles[cols - 1](x, w + j * k, bias_at(j), out + j, n, k, nullptr);
        }
        return;
    }
    for (std::int64_t j = row_begin; j < row_end; j += kGemmCols) {
        const auto cols = static_cast<std::size_t>(std::min<std::int64_t>(kGemmCols, row_end - j));
        const float* next_group = j + 2 * kGemmCols <= row_end ? w + (j + kGemmCols) * k : nullptr;
        for (std::int64_t i = 0; i < m; i += kGemmRows) {
            const auto rows = static_cast<std::size_t>(std::min<std::int64_t>(kGemmRows, m - i));
            kGemmTiles[rows - 1][cols - 1](x + i * k, w + j * k, bias_at(j), out + i * n + j, n, k,
                                           i == 0 ? next_group : nullptr);
        }
    }
}

#endif  // LENVM_HAS_X86

// ---- dispatch ------------------------------------------------------------------------------------------

struct Kernel {
    BlockFn block;
    const char* name;
    std::int64_t tile_rows_m1;  // w rows per micro-tile when m == 1 (tasks are multiples of it)
    std::int64_t tile_rows;     // w rows per micro-tile when m > 1
};

Kernel select_kernel() {
    const char* env = std::getenv("LENVM_RT_LINEAR_KERNEL");
    const std::string choice = env != nullptr ? env : "";
    check(choice.empty() || choice == "auto" || choice == "scalar", "LENVM_RT_LINEAR_KERNEL",
          "'auto' or 'scalar'", "'" + choice + "'");
#if LENVM_HAS_X86
    if (choice != "scalar" && cpu_has_avx2_fma()) return {block_avx2, "avx2_fma", kDecodeRows, kGemmCols};
#endif
    return {block_scalar, "scalar", 1, 1};
}

const Kernel& kernel() {
    static const Kernel selected = select_kernel();
    return selected;
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace

const char* linear_kernel_name() { return kernel().name; }

void linear(const float* x, const float* w, const float* bias, float* out, std::int64_t m, std::int64_t n,
            std::int64_t k, ThreadPool& pool) {
    if (m <= 0 || n <= 0) return;
    const Kernel& kern = kernel();
    const std::int64_t tile = m == 1 ? kern.tile_rows_m1 : kern.tile_rows;
    const std::int64_t threads = pool.num_threads();
    const std::int64_t row_cost = std::max<std::int64_t>(k, 1) * std::max<std::int64_t>(m, 4);
    const std::int64_t rows_for_cost = std::max<std::int64_t>(kTaskCost / row_cost, 1);
    const std::int64_t rows_for_balance = ceil_div(n, threads * kMinTasksPerThread);
    const std::int64_t rows_per_task = ceil_div(std::min(rows_for_cost, rows_for_balance), tile) * tile;
    const std::int64_t n_tasks = ceil_div(n, rows_per_task);
    if (threads == 1 || n_tasks == 1 || m * n * k < kSerialMacs) {
        kern.block(x, w, bias, out, m, n, k, 0, n);
        return;
    }
    pool.run(n_tasks, [&](std::int64_t task) {
        const std::int64_t row_begin = task * rows_per_task;
        kern.block(x, w, bias, out, m, n, k, row_begin, std::min(n, row_begin + rows_per_task));
    });
}

}  // namespace lenvm
