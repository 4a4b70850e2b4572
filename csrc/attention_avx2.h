// AVX2 + FMA attention of several queries over one KV head's cached prefix, each query optionally followed by a
// key of its own (the lookahead's candidates): the small matrix products as register tiles, so a key or value
// vector loaded once serves four queries.
//
// attend_many(q[nq, Dh], nq, Dh, scale, keys[np, Dh], vals[np, Dh], np, own_k, own_v, scores, out):
//   for query i, out[i][0..Dh) = softmax(scale · q_i·[k_0 .. k_{np-1}, own_k[i]]) · [v_0 .. v_{np-1}, own_v[i]]
//   (own_k / own_v null: the prefix only). scores: scratch of nq · (np + 1) floats. Dh a multiple of 16.
// Each score is one fused multiply-add chain over Dh in 8-lane chunks, folded in a fixed order; each output
// element one chain over the keys in order. So a query's result depends only on its own inputs, never on nq or
// on which tile it fell in. Compiled only for x86 (the caller checks the CPU).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd_avx2.h"

#if LENVM_HAS_X86

namespace lenvm::avx2 {

LENVM_AVX2_FMA inline float dot(const float* a, const float* b, std::int64_t dh) {
    __m256 acc = _mm256_setzero_ps();
    for (std::int64_t c = 0; c < dh; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
    return fold8(acc);
}

LENVM_AVX2_FMA inline void attend_many(const float* q, std::int64_t nq, std::int64_t dh, float scale, const float* keys,
                                       const float* vals, std::int64_t np, const float* const* own_k,
                                       const float* const* own_v, float* scores, float* const* out) {
    const std::int64_t n = np + (own_k != nullptr ? 1 : 0);
    // QK: 4 queries x 3 keys per tile; leftover queries and keys one pair at a time (the same chain and fold)
    std::int64_t i = 0;
    for (; i + 4 <= nq; i += 4) {
        std::int64_t t = 0;
        for (; t + 3 <= np; t += 3) {
            __m256 acc[4][3];
            for (auto& row : acc)
                for (auto& cell : row) cell = _mm256_setzero_ps();
            for (std::int64_t c = 0; c < dh; c += 8) {
                const __m256 k0 = _mm256_loadu_ps(keys + t * dh + c), k1 = _mm256_loadu_ps(keys + (t + 1) * dh + c),
                             k2 = _mm256_loadu_ps(keys + (t + 2) * dh + c);
                for (int a = 0; a < 4; ++a) {
                    const __m256 qv = _mm256_loadu_ps(q + (i + a) * dh + c);
                    acc[a][0] = _mm256_fmadd_ps(qv, k0, acc[a][0]);
                    acc[a][1] = _mm256_fmadd_ps(qv, k1, acc[a][1]);
                    acc[a][2] = _mm256_fmadd_ps(qv, k2, acc[a][2]);
                }
            }
            for (int a = 0; a < 4; ++a)
                for (int b = 0; b < 3; ++b) scores[(i + a) * n + t + b] = fold8(acc[a][b]) * scale;
        }
        for (; t < np; ++t)
            for (int a = 0; a < 4; ++a) scores[(i + a) * n + t] = dot(q + (i + a) * dh, keys + t * dh, dh) * scale;
    }
    for (; i < nq; ++i)
        for (std::int64_t t = 0; t < np; ++t) scores[i * n + t] = dot(q + i * dh, keys + t * dh, dh) * scale;
    if (own_k != nullptr)
        for (std::int64_t a = 0; a < nq; ++a) scores[a * n + np] = dot(q + a * dh, own_k[a], dh) * scale;
    // softmax per row: max, exponentials summed in 8 lanes (then the tail), one reciprocal
    for (std::int64_t a = 0; a < nq; ++a) {
        float* s = scores + a * n;
        __m256 mv = _mm256_set1_ps(-INFINITY);
        std::int64_t t = 0;
        for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t));
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, mv);
        float best = -INFINITY;
        for (float l : lanes) best = std::max(best, l);
        for (; t < n; ++t) best = std::max(best, s[t]);
        const __m256 bv = _mm256_set1_ps(best);
        __m256 sum = _mm256_setzero_ps();
        t = 0;
        for (; t + 8 <= n; t += 8) {
            const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), bv));
            _mm256_storeu_ps(s + t, e);
            sum = _mm256_add_ps(sum, e);
        }
        float total = fold8(sum);
        for (; t < n; ++t) {
            alignas(32) float one[8] = {s[t] - best, 0, 0, 0, 0, 0, 0, 0};
            _mm256_store_ps(one, exp_nonpositive(_mm256_load_ps(one)));
            s[t] = one[0];
            total += one[0];
        }
        const __m256 inv = _mm256_set1_ps(1.0f / total);
        t = 0;
        for (; t + 8 <= n; t += 8) _mm256_storeu_ps(s + t, _mm256_mul_ps(_mm256_loadu_ps(s + t), inv));
        for (; t < n; ++t) s[t] *= 1.0f / total;
    }
    // PV: 4 queries x 16 dims, each output lane one multiply-add chain over the keys in order, the own value last
    for (std::int64_t a0 = 0; a0 < nq; a0 += 4) {
        const std::int64_t rows = std::min<std::int64_t>(4, nq - a0);
        for (std::int64_t d = 0; d < dh; d += 16) {
            __m256 acc[4][2];
            for (int a = 0; a < 4; ++a) acc[a][0] = acc[a][1] = _mm256_setzero_ps();
            for (std::int64_t t = 0; t < np; ++t) {
                const __m256 v0 = _mm256_loadu_ps(vals + t * dh + d), v1 = _mm256_loadu_ps(vals + t * dh + d + 8);
                for (int a = 0; a < 4; ++a) {
                    if (a >= rows) break;
                    const __m256 w = _mm256_broadcast_ss(scores + (a0 + a) * n + t);
                    acc[a][0] = _mm256_fmadd_ps(w, v0, acc[a][0]);
                    acc[a][1] = _mm256_fmadd_ps(w, v1, acc[a][1]);
                }
            }
            for (int a = 0; a < rows; ++a) {
                if (own_v != nullptr) {
                    const __m256 w = _mm256_broadcast_ss(scores + (a0 + a) * n + np);
                    acc[a][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(own_v[a0 + a] + d), acc[a][0]);
                    acc[a][1] = _mm256_fmadd_ps(w, _mm256_loadu_ps(own_v[a0 + a] + d + 8), acc[a][1]);
                }
                _mm256_storeu_ps(out[a0 + a] + d, acc[a][0]);
                _mm256_storeu_ps(out[a0 + a] + d + 8, acc[a][1]);
            }
        }
    }
}

}  // namespace lenvm::avx2

#endif  // LENVM_HAS_X86
