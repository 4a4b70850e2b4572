// Linear layer over panel-packed weights (contract in panel_linear.h).
//
// Structure: panel_linear() cuts the panels into tasks of whole tiles and runs them on the pool. With one x row a
// tile is kDecodePanels panels (32 outputs); with more, x is first regrouped as
// [ceil(m / 4), k, 4] so that a tile of up to 4 rows by kGemmPanels panels broadcasts its 4 x values from one
// 16-byte run, and each panel group stays in cache while every row group passes. Every tile size runs the same
// per-element sequence (zeroed accumulator, one multiply-add per kk in increasing order, then bias).
//
// Prefetch: with 2..kMaxPrefetchGroups row groups, the weights are fetched from memory once per panel group and
// then reused from cache, so without help the first row-group pass over a group waits on memory. The AVX2
// tiles therefore ask for the next panel group (one contiguous block) into L2 while computing the current one,
// one prefetch per kk, the block split evenly over the row groups. Tasks then span several panel groups so there
// is a next group to fetch. One row group (decode, m <= 4) streams at the memory's pace and is left to the
// hardware prefetcher (software prefetch measured slower there), as are long row-group lists where compute
// dominates.
//
// Storage: every function below is a template over the stored weight type W: float, Bf16 (the upper half of a
// float32, widened by a 16-bit shift) or F16 (IEEE half precision, widened by F16C's conversion or its exact
// software twin), so every storage runs the same multiply-add sequence on the same float32 values.
#include "panel_linear.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cpu_features.h"
#include "linear.h"

#if LENVM_HAS_X86
#include <immintrin.h>
#endif

namespace lenvm {

namespace {

constexpr int kRowGroup = 4;      // x rows per group (and per tile) when m > 1
constexpr int kGemmPanels = 3;    // panels per tile when m > 1
constexpr int kDecodePanels = 4;  // panels per tile when m == 1
// Task sizing as in linear.cpp: ~kTaskCost units (a weight byte streamed or a multiply-add), at least
// kMinTasksPerThread tasks per thread, and no pool below kSerialMacs multiply-adds.
constexpr std::int64_t kTaskCost = 128 * 1024;
constexpr std::int64_t kMinTasksPerThread = 8;
constexpr std::int64_t kSerialMacs = 32 * 1024;
// Row groups between which the next panel group is prefetched, and panel groups per task when it is.
constexpr std::int64_t kMaxPrefetchGroups = 16;
constexpr std::int64_t kGroupsPerPrefetchTask = 8;

// Writes tile results: acc holds rows x (panels 8) sums; only columns < n are stored.
void store_tile(const float* acc, int rows, int panels, const float* bias, float* out, std::int64_t n,
                std::int64_t col0) {
    const std::int64_t cols = std::min<std::int64_t>(panels * kPanelRows, n - col0);
    for (int i = 0; i < rows; ++i) {
        for (std::int64_t c = 0; c < cols; ++c) {
            const float sum = acc[i * panels * kPanelRows + c];
            out[i * n + col0 + c] = bias != nullptr ? sum + bias[col0 + c] : sum;
        }
    }
}

// The 16-bit storages: a bfloat16 value (the upper half of its float32) and an IEEE half-precision value.
struct Bf16 {
    std::uint16_t bits;
};
struct F16 {
    std::uint16_t bits;
};
static_assert(sizeof(Bf16) == 2 && sizeof(F16) == 2, "16-bit storages");

inline float from_bits(std::uint32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
}

inline std::uint32_t to_bits(float value) {
    std::uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    return bits;
}

// The float32 a stored weight stands for.
inline float widen(float w) { return w; }
inline float widen(Bf16 w) { return from_bits(std::uint32_t{w.bits} << 16); }
inline float widen(F16 w) {
    const std::uint32_t sign = std::uint32_t{w.bits & 0x8000u} << 16, exponent = (w.bits >> 10) & 0x1Fu,
                        mantissa = w.bits & 0x3FFu;
    if (exponent == 0) {  // zero or subnormal: mantissa 2^-24, exact in float32
        const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        return from_bits(sign | to_bits(magnitude));
    }
    if (exponent == 31) return from_bits(sign | 0x7F800000u | (mantissa << 13));  // inf / NaN
    return from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// x values of tile row i at step kk sit at xs[kk * x_step + i] (x_step 1 for one row, 4 for a row group).
// `panels` points at the tile's first panel, stored as W (the table the function comes from says which).
// Step kk may prefetch the byte at prefetch + kk * prefetch_step (nullptr: none); it never affects the result.
using TileFn = void (*)(const float* xs, std::int64_t x_step, const void* panels, std::int64_t k, const float* bias,
                        float* out, std::int64_t n, std::int64_t col0, const char* prefetch,
                        std::int64_t prefetch_step);

// ---- portable kernel -----------------------------------------------------------------------------------

template <typename W, int MR, int NP>
void tile_portable(const float* xs, std::int64_t x_step, const void* panel_data, std::int64_t k, const float* bias,
                   float* out, std::int64_t n, std::int64_t col0, const char* /*prefetch*/,
                   std::int64_t /*prefetch_step*/) {
    const W* panels = static_cast<const W*>(panel_data);
    float acc[MR * NP * kPanelRows] = {};
    for (std::int64_t kk = 0; kk < k; ++kk) {
        for (int i = 0; i < MR; ++i) {
            const float xv = xs[kk * x_step + i];
            for (int p = 0; p < NP; ++p) {
                const W* w = panels + (p * k + kk) * kPanelRows;
                float* a = acc + (i * NP + p) * kPanelRows;
                for (int l = 0; l < kPanelRows; ++l) {
                    const float product = xv * widen(w[l]);
                    a[l] = a[l] + product;
                }
            }
        }
    }
    store_tile(acc, MR, NP, bias, out, n, col0);
}

// ---- AVX2 + FMA kernel ---------------------------------------------------------------------------------

#if LENVM_HAS_X86
// The 8 float32 weights stored at w.
LENVM_AVX2_FMA inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
LENVM_AVX2_FMA inline __m256 load8(const Bf16* w) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
LENVM_AVX2_FMA inline __m256 load8(const F16* w) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}

template <typename W, int MR, int NP>
LENVM_AVX2_FMA void tile_avx2(const float* xs, std::int64_t x_step, const void* panel_data, std::int64_t k,
                              const float* bias, float* out, std::int64_t n, std::int64_t col0, const char* prefetch,
                              std::int64_t prefetch_step) {
    const W* panels = static_cast<const W*>(panel_data);
    __m256 acc[MR][NP];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
        for (int p = 0; p < NP; ++p) acc[i][p] = _mm256_setzero_ps();
    }
    for (std::int64_t kk = 0; kk < k; ++kk) {
        if (prefetch != nullptr) _mm_prefetch(prefetch + kk * prefetch_step, _MM_HINT_T1);
        __m256 wv[NP];
#pragma GCC unroll 16
        for (int p = 0; p < NP; ++p) wv[p] = load8(panels + (p * k + kk) * kPanelRows);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            const __m256 xv = _mm256_broadcast_ss(xs + kk * x_step + i);
#pragma GCC unroll 16
            for (int p = 0; p < NP; ++p) acc[i][p] = _mm256_fmadd_ps(xv, wv[p], acc[i][p]);
        }
    }
    alignas(32) float sums[MR * NP * kPanelRows];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
        for (int p = 0; p < NP; ++p) _mm256_store_ps(sums + (i * NP + p) * kPanelRows, acc[i][p]);
    }
    store_tile(sums, MR, NP, bias, out, n, col0);
}
#endif

// tiles<W>()[r - 1][p - 1]: r rows by p panels stored as W, for r <= kRowGroup and p <= kDecodePanels.
template <typename W, bool kAvx2, int MR, std::size_t... P>
constexpr std::array<TileFn, sizeof...(P)> tiles_for_rows(std::index_sequence<P...>) {
#if LENVM_HAS_X86
    if constexpr (kAvx2) return {{&tile_avx2<W, MR, static_cast<int>(P) + 1>...}};
#endif
    return {{&tile_portable<W, MR, static_cast<int>(P) + 1>...}};
}

template <typename W, bool kAvx2, std::size_t... R>
constexpr std::array<std::array<TileFn, kDecodePanels>, sizeof...(R)> tile_table(std::index_sequence<R...>) {
    return {{tiles_for_rows<W, kAvx2, static_cast<int>(R) + 1>(std::make_index_sequence<kDecodePanels>{})...}};
}

using TileTable = std::array<std::array<TileFn, kDecodePanels>, kRowGroup>;

template <typename W>
const TileTable& tiles() {
    static const TileTable selected = [] {
#if LENVM_HAS_X86
        if (std::string(linear_kernel_name()) == "avx2_fma")
            return tile_table<W, true>(std::make_index_sequence<kRowGroup>{});
#endif
        return tile_table<W, false>(std::make_index_sequence<kRowGroup>{});
    }();
    return selected;
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

bool uses_prefetch(std::int64_t m) {
    const std::int64_t groups = ceil_div(m, kRowGroup);
    return groups >= 2 && groups <= kMaxPrefetchGroups;
}

// Panels [p_begin, p_end) for all rows. xs: x itself when m == 1, else the row groups [ceil(m / 4), k, 4].
template <typename W>
void run_panels(const float* xs, const W* panels, const float* bias, float* out, std::int64_t m, std::int64_t n,
                std::int64_t k, std::int64_t p_begin, std::int64_t p_end) {
    const TileTable& table = tiles<W>();
    if (m == 1) {
        for (std::int64_t p = p_begin; p < p_end; p += kDecodePanels) {
            const auto np = static_cast<std::size_t>(std::min<std::int64_t>(kDecodePanels, p_end - p));
            table[0][np - 1](xs, 1, panels + p * k * kPanelRows, k, bias, out, n, p * kPanelRows, nullptr, 0);
        }
        return;
    }
    const std::int64_t groups = ceil_div(m, kRowGroup);
    const bool prefetching = uses_prefetch(m);
    for (std::int64_t p = p_begin; p < p_end; p += kGemmPanels) {
        const auto np = static_cast<std::size_t>(std::min<std::int64_t>(kGemmPanels, p_end - p));
        // Row group g prefetches bytes [g k step, (g + 1) k step) of the next group (within this task's panels),
        // `step` bytes per kk; every address lies inside that group.
        const std::int64_t next_panels = prefetching ? std::min<std::int64_t>(kGemmPanels, p_end - p - np) : 0;
        const std::int64_t step = next_panels * kPanelRows * std::int64_t{sizeof(W)} / groups;
        const char* next =
            next_panels > 0 ? reinterpret_cast<const char*>(panels + (p + kGemmPanels) * k * kPanelRows) : nullptr;
        for (std::int64_t i = 0; i < m; i += kRowGroup) {
            const auto rows = static_cast<std::size_t>(std::min<std::int64_t>(kRowGroup, m - i));
            const char* prefetch = next != nullptr ? next + (i / kRowGroup) * k * step : nullptr;
            table[rows - 1][np - 1](xs + i * k, kRowGroup, panels + p * k * kPanelRows, k, bias, out + i * n, n,
                                    p * kPanelRows, prefetch, step);
        }
    }
}

// The stored form of a float32 weight, exact for a value of that storage (lower bits are dropped otherwise).
inline float narrow(float w, float) { return w; }
inline Bf16 narrow(float w, Bf16) { return {static_cast<std::uint16_t>(to_bits(w) >> 16)}; }
inline F16 narrow(float w, F16) {
    const std::uint32_t bits = to_bits(w), exponent = (bits >> 23) & 0xFFu, mantissa = bits & 0x7FFFFFu;
    const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
    if (exponent == 0xFF) return {static_cast<std::uint16_t>(sign | 0x7C00u | (mantissa != 0 ? 0x200u : 0u))};
    const std::int32_t half_exponent = static_cast<std::int32_t>(exponent) - 112;
    if (exponent == 0 || half_exponent < -10) return {sign};  // below half the smallest subnormal
    if (half_exponent >= 31) return {static_cast<std::uint16_t>(sign | 0x7C00u)};
    if (half_exponent >= 1)
        return {static_cast<std::uint16_t>(sign | (static_cast<std::uint32_t>(half_exponent) << 10) |
                                           (mantissa >> 13))};
    // a subnormal half m 2^-24: m is the 24-bit significand shifted right by 14 - half_exponent
    const std::uint32_t shift = static_cast<std::uint32_t>(14 - half_exponent);
    return {static_cast<std::uint16_t>(sign | ((0x800000u | mantissa) >> shift))};
}

template <typename W>
bool exact_in(const float* w, std::int64_t count) {
    for (std::int64_t i = 0; i < count; ++i)
        if (to_bits(widen(narrow(w[i], W{}))) != to_bits(w[i])) return false;
    return true;
}

template <typename W>
void pack(const float* w, std::int64_t n, std::int64_t k, W* panels) {
    for (std::int64_t p = 0; p < panel_count(n); ++p) {
        for (std::int64_t kk = 0; kk < k; ++kk) {
            W* dst = panels + (p * k + kk) * kPanelRows;
            for (std::int64_t l = 0; l < kPanelRows; ++l) {
                const std::int64_t row = p * kPanelRows + l;
                dst[l] = narrow(row < n ? w[row * k + kk] : 0.0f, W{});
            }
        }
    }
}

template <typename W>
void linear_over(const float* x, const W* panels, const float* bias, float* out, std::int64_t m, std::int64_t n,
                 std::int64_t k, ThreadPool& pool) {
    const float* xs = x;
    thread_local std::vector<float> groups;
    if (m > 1) {  // row groups [ceil(m / 4), k, 4]; a last group's lanes past m are never read
        const auto size = static_cast<std::size_t>(ceil_div(m, kRowGroup) * kRowGroup * k);
        if (groups.size() < size) groups.resize(size);
        for (std::int64_t i = 0; i < m; ++i) {
            float* dst = groups.data() + (i / kRowGroup) * k * kRowGroup + i % kRowGroup;
            for (std::int64_t kk = 0; kk < k; ++kk) dst[kk * kRowGroup] = x[i * k + kk];
        }
        xs = groups.data();
    }
    const std::int64_t total = panel_count(n), tile = m == 1 ? kDecodePanels : kGemmPanels;
    const std::int64_t threads = pool.num_threads();
    std::int64_t per_task = 0;
    if (uses_prefetch(m)) {  // about kGroupsPerPrefetchTask panel groups per task, a whole number of tasks per thread
        const std::int64_t tile_count = ceil_div(total, tile);
        const std::int64_t tasks = threads * ceil_div(tile_count, threads * kGroupsPerPrefetchTask);
        per_task = ceil_div(tile_count, tasks) * tile;
    } else {
        const std::int64_t panel_cost = std::max<std::int64_t>(k, 1) * std::max<std::int64_t>(m, 4) * kPanelRows;
        const std::int64_t for_cost = std::max<std::int64_t>(kTaskCost / panel_cost, 1);
        const std::int64_t for_balance = ceil_div(total, threads * kMinTasksPerThread);
        per_task = ceil_div(std::min(for_cost, for_balance), tile) * tile;
    }
    const std::int64_t n_tasks = ceil_div(total, per_task);
    if (threads == 1 || n_tasks == 1 || m * n * k < kSerialMacs) {
        run_panels(xs, panels, bias, out, m, n, k, 0, total);
        return;
    }
    pool.run(n_tasks, [&](std::int64_t task) {
        const std::int64_t begin = task * per_task;
        run_panels(xs, panels, bias, out, m, n, k, begin, std::min(total, begin + per_task));
    });
}

}  // namespace

void pack_panels(const float* w, std::int64_t n, std::int64_t k, Storage storage, void* panels) {
    switch (storage) {
        case Storage::f32: pack(w, n, k, static_cast<float*>(panels)); break;
        case Storage::bf16: pack(w, n, k, static_cast<Bf16*>(panels)); break;
        case Storage::f16: pack(w, n, k, static_cast<F16*>(panels)); break;
    }
}

bool storage_exact(const float* w, std::int64_t count, Storage storage) {
    switch (storage) {
        case Storage::bf16: return exact_in<Bf16>(w, count);
        case Storage::f16: return exact_in<F16>(w, count);
        case Storage::f32: break;
    }
    return true;
}

void panel_linear(const float* x, Panels panels, const float* bias, float* out, std::int64_t m, std::int64_t n,
                  std::int64_t k, ThreadPool& pool) {
    if (m <= 0 || n <= 0) return;
    switch (panels.storage) {
        case Storage::f32: linear_over(x, static_cast<const float*>(panels.data), bias, out, m, n, k, pool); break;
        case Storage::bf16: linear_over(x, static_cast<const Bf16*>(panels.data), bias, out, m, n, k, pool); break;
        case Storage::f16: linear_over(x, static_cast<const F16*>(panels.data), bias, out, m, n, k, pool); break;
    }
}

}  // namespace lenvm
