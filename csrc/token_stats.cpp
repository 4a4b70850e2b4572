// Chosen-token log-probability and rank (contract in token_stats.h). Two passes over each row: the maximum,
// the counts of larger entries and a NaN / +inf check first, then the sum of exp(x - max). Entries above the
// smallest chosen logit are few (the chosen tokens are mostly among the likeliest), and only they are compared
// with every chosen token.
#include "token_stats.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_features.h"
#include "linear.h"
#include "simd_avx2.h"

#if LENVM_HAS_X86
#include <immintrin.h>
#endif

namespace lenvm {

namespace {

constexpr std::int64_t kBlock = 512;     // entries per float partial sum (a multiple of 16)

struct RowScan {
    float max;
    bool finite;  // no NaN and no +inf
};

// The chosen tokens of one row: their logits, the smallest of them (entries above it are counted one by one),
// and per token the count of strictly larger entries.
struct Chosen {
    const float* x;
    const std::int64_t* tokens;
    std::int64_t width;
    float lowest;
    std::int64_t* larger;

    Chosen(const float* row, const std::int64_t* t, std::int64_t w, std::int64_t* counts)
        : x(row), tokens(t), width(w), lowest(std::numeric_limits<float>::infinity()), larger(counts) {
        for (std::int64_t i = 0; i < width; ++i) {
            larger[i] = 0;
            const float c = x[tokens[i]];
            lowest = c < lowest ? c : lowest;  // a NaN never counts: no entry is larger than it
        }
    }
    void count(float value) const {
        for (std::int64_t i = 0; i < width; ++i) larger[i] += value > x[tokens[i]] ? 1 : 0;
    }
};

RowScan scan_scalar(const float* x, std::int64_t vocab, const Chosen& chosen, std::int64_t begin, RowScan s) {
    for (std::int64_t v = begin; v < vocab; ++v) {
        s.max = x[v] > s.max ? x[v] : s.max;
        if (x[v] > chosen.lowest) chosen.count(x[v]);
        s.finite = s.finite && !std::isnan(x[v]) && x[v] != std::numeric_limits<float>::infinity();
    }
    return s;
}

double exp_sum_scalar(const float* x, std::int64_t vocab, float max, std::int64_t begin) {
    double sum = 0.0;
    for (std::int64_t v = begin; v < vocab; ++v) sum += std::exp(static_cast<double>(x[v]) - static_cast<double>(max));
    return sum;
}

// logp and rank of every chosen token from the row's maximum and log-sum-exp
void finish_row(const Chosen& chosen, const RowScan& s, double log_sum, double* logp, std::int64_t* rank) {
    for (std::int64_t i = 0; i < chosen.width; ++i) {
        const double c = chosen.x[chosen.tokens[i]];
        rank[i] = chosen.larger[i] + 1;
        logp[i] = s.finite ? (c - static_cast<double>(s.max)) - log_sum : std::numeric_limits<double>::quiet_NaN();
    }
}

void row_scalar(const Chosen& chosen, std::int64_t vocab, double* logp, std::int64_t* rank) {
    const RowScan s = scan_scalar(chosen.x, vocab, chosen, 0, {-std::numeric_limits<float>::infinity(), true});
    finish_row(chosen, s, s.finite ? std::log(exp_sum_scalar(chosen.x, vocab, s.max, 0)) : 0.0, logp, rank);
}

#if LENVM_HAS_X86

LENVM_AVX2_FMA double fold_to_double(__m256 v) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    double sum = 0.0;
    for (float lane : lanes) sum += lane;
    return sum;
}

LENVM_AVX2_FMA void row_avx2(const Chosen& chosen, std::int64_t vocab, double* logp, std::int64_t* rank) {
    const float* x = chosen.x;
    const std::int64_t main = vocab - vocab % 8;
    const __m256 lowest_v = _mm256_set1_ps(chosen.lowest);
    const __m256 inf_v = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    __m256 max_v = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 bad_v = _mm256_setzero_ps();  // all-ones lanes where a NaN or +inf was seen
    for (std::int64_t v = 0; v < main; v += 8) {
        const __m256 xv = _mm256_loadu_ps(x + v);
        max_v = _mm256_max_ps(max_v, xv);
        unsigned above = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(xv, lowest_v, _CMP_GT_OQ)));
        for (; above != 0; above &= above - 1) chosen.count(x[v + __builtin_ctz(above)]);
        const __m256 bad = _mm256_or_ps(_mm256_cmp_ps(xv, xv, _CMP_UNORD_Q), _mm256_cmp_ps(xv, inf_v, _CMP_EQ_OQ));
        bad_v = _mm256_or_ps(bad_v, bad);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, max_v);
    RowScan s{-std::numeric_limits<float>::infinity(), _mm256_movemask_ps(bad_v) == 0};
    for (float lane : lanes) s.max = lane > s.max ? lane : s.max;
    s = scan_scalar(x, vocab, chosen, main, s);
    if (!s.finite) {
        finish_row(chosen, s, 0.0, logp, rank);
        return;
    }
    // float partial sums over blocks of kBlock entries, each block folded into a double: the float rounding
    // grows with the block, not with the vocabulary
    const __m256 max_b = _mm256_set1_ps(s.max);
    double sum = exp_sum_scalar(x, vocab, s.max, main);
    for (std::int64_t block = 0; block < main; block += kBlock) {
        const std::int64_t end = block + kBlock < main ? block + kBlock : main;
        __m256 sum_a = _mm256_setzero_ps(), sum_b = _mm256_setzero_ps();
        std::int64_t v = block;
        for (; v + 16 <= end; v += 16) {
            sum_a = _mm256_add_ps(sum_a, avx2::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + v), max_b)));
            sum_b = _mm256_add_ps(sum_b, avx2::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + v + 8), max_b)));
        }
        for (; v < end; v += 8) {
            sum_a = _mm256_add_ps(sum_a, avx2::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + v), max_b)));
        }
        sum += fold_to_double(sum_a) + fold_to_double(sum_b);
    }
    finish_row(chosen, s, std::log(sum), logp, rank);
}

#endif  // LENVM_HAS_X86

}  // namespace

void token_stats(const float* logits, const std::int64_t* tokens, std::int64_t rows, std::int64_t width,
                 std::int64_t vocab, double* logp, std::int64_t* rank) {
#if LENVM_HAS_X86
    static const bool avx2 = std::strcmp(linear_kernel_name(), "avx2_fma") == 0;
#else
    constexpr bool avx2 = false;
#endif
    std::vector<std::int64_t> larger(static_cast<std::size_t>(width));
    for (std::int64_t r = 0; r < rows; ++r) {
        const Chosen chosen(logits + r * vocab, tokens + r * width, width, larger.data());
#if LENVM_HAS_X86
        if (avx2) {
            row_avx2(chosen, vocab, logp + r * width, rank + r * width);
            continue;
        }
#endif
        row_scalar(chosen, vocab, logp + r * width, rank + r * width);
    }
}

}  // namespace lenvm
