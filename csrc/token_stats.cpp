// Chosen-token log-probability and rank (contract in token_stats.h). Two passes over each row: the maximum,
// the count of larger entries and a NaN / +inf check first, then the sum of exp(x - max).
#include "token_stats.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "cpu_features.h"
#include "linear.h"

#if LENVM_HAS_X86
#include <immintrin.h>
#endif

namespace lenvm {

namespace {

constexpr float kExpFloor = -87.3365f;  // e^kExpFloor is about the smallest normal float
constexpr std::int64_t kBlock = 512;     // entries per float partial sum (a multiple of 16)

struct RowScan {
    float max;
    std::int64_t larger;
    bool finite;  // no NaN and no +inf
};

RowScan scan_scalar(const float* x, std::int64_t vocab, float chosen, std::int64_t begin, RowScan s) {
    for (std::int64_t v = begin; v < vocab; ++v) {
        s.max = x[v] > s.max ? x[v] : s.max;
        s.larger += x[v] > chosen ? 1 : 0;
        s.finite = s.finite && !std::isnan(x[v]) && x[v] != std::numeric_limits<float>::infinity();
    }
    return s;
}

double exp_sum_scalar(const float* x, std::int64_t vocab, float max, std::int64_t begin) {
    double sum = 0.0;
    for (std::int64_t v = begin; v < vocab; ++v) sum += std::exp(static_cast<double>(x[v]) - static_cast<double>(max));
    return sum;
}

void row_scalar(const float* x, std::int64_t vocab, std::int64_t token, double* logp, std::int64_t* rank) {
    const float chosen = x[token];
    const RowScan s = scan_scalar(x, vocab, chosen, 0, {-std::numeric_limits<float>::infinity(), 0, true});
    *rank = s.larger + 1;
    *logp = s.finite ? (static_cast<double>(chosen) - static_cast<double>(s.max)) -
                           std::log(exp_sum_scalar(x, vocab, s.max, 0))
                     : std::numeric_limits<double>::quiet_NaN();
}

#if LENVM_HAS_X86

// e^x for x <= 0: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact product), e^r by a degree-7
// polynomial in Horner form, 2^n built in the exponent bits.
LENVM_AVX2_FMA inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(kExpFloor));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

LENVM_AVX2_FMA double fold_to_double(__m256 v) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    double sum = 0.0;
    for (float lane : lanes) sum += lane;
    return sum;
}

LENVM_AVX2_FMA void row_avx2(const float* x, std::int64_t vocab, std::int64_t token, double* logp,
                             std::int64_t* rank) {
    const float chosen = x[token];
    const std::int64_t main = vocab - vocab % 8;
    const __m256 chosen_v = _mm256_set1_ps(chosen);
    const __m256 inf_v = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    __m256 max_v = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 bad_v = _mm256_setzero_ps();  // all-ones lanes where a NaN or +inf was seen
    std::int64_t larger = 0;
    for (std::int64_t v = 0; v < main; v += 8) {
        const __m256 xv = _mm256_loadu_ps(x + v);
        max_v = _mm256_max_ps(max_v, xv);
        const int above = _mm256_movemask_ps(_mm256_cmp_ps(xv, chosen_v, _CMP_GT_OQ));
        larger += __builtin_popcount(static_cast<unsigned>(above));
        const __m256 bad = _mm256_or_ps(_mm256_cmp_ps(xv, xv, _CMP_UNORD_Q), _mm256_cmp_ps(xv, inf_v, _CMP_EQ_OQ));
        bad_v = _mm256_or_ps(bad_v, bad);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, max_v);
    RowScan s{-std::numeric_limits<float>::infinity(), larger, _mm256_movemask_ps(bad_v) == 0};
    for (float lane : lanes) s.max = lane > s.max ? lane : s.max;
    s = scan_scalar(x, vocab, chosen, main, s);
    *rank = s.larger + 1;
    if (!s.finite) {
        *logp = std::numeric_limits<double>::quiet_NaN();
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
            sum_a = _mm256_add_ps(sum_a, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + v), max_b)));
            sum_b = _mm256_add_ps(sum_b, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + v + 8), max_b)));
        }
        for (; v < end; v += 8) {
            sum_a = _mm256_add_ps(sum_a, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + v), max_b)));
        }
        sum += fold_to_double(sum_a) + fold_to_double(sum_b);
    }
    *logp = (static_cast<double>(chosen) - static_cast<double>(s.max)) - std::log(sum);
}

#endif  // LENVM_HAS_X86

}  // namespace

void token_stats(const float* logits, const std::int64_t* tokens, std::int64_t rows, std::int64_t vocab,
                 double* logp, std::int64_t* rank) {
#if LENVM_HAS_X86
    static const bool avx2 = std::strcmp(linear_kernel_name(), "avx2_fma") == 0;
    if (avx2) {
        for (std::int64_t r = 0; r < rows; ++r) row_avx2(logits + r * vocab, vocab, tokens[r], logp + r, rank + r);
        return;
    }
#endif
    for (std::int64_t r = 0; r < rows; ++r) row_scalar(logits + r * vocab, vocab, tokens[r], logp + r, rank + r);
}

}  // namespace lenvm
