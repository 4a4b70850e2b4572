// AVX2 + FMA building blocks shared by the CPU kernels (x86 only; callers check the CPU at run time).
//
// fold8(v): the sum of v's 8 lanes in the fixed order ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
// exp_nonpositive(x): e^x lane-wise for x <= 0 (relative error below 5e-7; below e^-87.3 it gives e^-87.3).
#pragma once

#include "cpu_features.h"

#if LENVM_HAS_X86
#include <immintrin.h>

namespace lenvm::avx2 {

constexpr float kExpFloor = -87.3365f;  // e^kExpFloor is about the smallest normal float

LENVM_AVX2_FMA inline float fold8(__m256 v) {
    const __m128 pairs = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // l_i + l_{i+4}
    const __m128 quads = _mm_add_ps(pairs, _mm_movehl_ps(pairs, pairs));                     // p0 + p2, p1 + p3
    return _mm_cvtss_f32(_mm_add_ss(quads, _mm_shuffle_ps(quads, quads, 1)));
}

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

}  // namespace lenvm::avx2

#endif  // LENVM_HAS_X86
