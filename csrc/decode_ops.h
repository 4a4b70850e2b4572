// Small per-token CPU operators of the decode step, where torch's per-op overhead outweighs the work
// (a decode step issues ~60 norms and ~30 attention reads, each a few thousand FLOPs).
//
// rms_norm(x[R, D], weight[D], eps, out[R, D])
//   out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, accumulated in double then rounded to float.
// decode_attention(q[B, H, Dh], k_cache[Bc, Hkv, C, Dh], v_cache[Bc, Hkv, C, Dh], span[B], scale, out[B, H, Dh])
//   Row b, head h attends to cache positions 0..span[b]-1 of KV head h / (H / Hkv) (grouped-query):
//   out = softmax(scale · q·K^T) · V, scores and weights in float, softmax max-subtracted.
// rope_cache_attention(qkv[B, (H + 2·Hkv)·Dh], cos[C, Dh], sin[C, Dh], k_cache, v_cache, positions[B], scale,
//                      out[B, H·Dh])
//   The whole attention of a decode step for models without q/k norms: rotate-half RoPE at position p_b on
//   q and k, k and v written to cache position p_b of row b, then decode_attention over positions 0..p_b.
// rope_lookahead_attention(qkv[B·K, (H + 2·Hkv)·Dh], cos, sin, k_cache, v_cache, positions[B], K, scale,
//                          out[B·K, H·Dh], k_new[B, Hkv, K, Dh], v_new[B, Hkv, K, Dh])
//   The tree-masked lookahead: the K candidates of row b all sit at position p_b; each attends to cache
//   positions 0..p_b-1 of its row and to itself only. Their roped k and v go to k_new / v_new (the
//   cache is not touched; the caller commits the chosen one).
// Shapes are checked by the caller (csrc/bindings.cpp); nothing here allocates on the heap per call
// beyond one score buffer of C floats, and nothing exits or aborts.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lenvm {

inline void rms_norm(const float* x, const float* weight, float eps, float* out, std::int64_t rows, std::int64_t d) {
    for (std::int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * d;
        double sum = 0.0;
        for (std::int64_t i = 0; i < d; ++i) sum += static_cast<double>(xr[i]) * xr[i];
        const float inv = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(d) + eps));
        float* o = out + r * d;
        for (std::int64_t i = 0; i < d; ++i) o[i] = (xr[i] * inv) * weight[i];
    }
}

struct AttentionShape {
    std::int64_t batch, heads, kv_heads, head_dim, capacity;
};

inline void decode_attention(const float* q, const float* k_cache, const float* v_cache, const std::int32_t* span,
                             float scale, float* out, const AttentionShape& s) {
    const std::int64_t group = s.heads / s.kv_heads;
    std::vector<float> scores(static_cast<std::size_t>(s.capacity));
    for (std::int64_t b = 0; b < s.batch; ++b) {
        const std::int64_t n = span[b];
        for (std::int64_t h = 0; h < s.heads; ++h) {
            const float* qh = q + (b * s.heads + h) * s.head_dim;
            const std::int64_t kv = (b * s.kv_heads + h / group) * s.capacity * s.head_dim;
            const float* k = k_cache + kv;
            const float* v = v_cache + kv;
            float best = -INFINITY;
            for (std::int64_t j = 0; j < n; ++j) {
                const float* kj = k + j * s.head_dim;
                float dot = 0.0f;
                for (std::int64_t i = 0; i < s.head_dim; ++i) dot += qh[i] * kj[i];
                scores[j] = dot * scale;
                best = std::max(best, scores[j]);
            }
            float total = 0.0f;
            for (std::int64_t j = 0; j < n; ++j) {
                scores[j] = std::exp(scores[j] - best);
                total += scores[j];
            }
            float* o = out + (b * s.heads + h) * s.head_dim;
            std::fill(o, o + s.head_dim, 0.0f);
            for (std::int64_t j = 0; j < n; ++j) {
                const float w = scores[j] / total;
                const float* vj = v + j * s.head_dim;
                for (std::int64_t i = 0; i < s.head_dim; ++i) o[i] += w * vj[i];
            }
        }
    }
}

// x·cos + rotate_half(x)·sin for one head vector of even length d.
inline void rope(const float* x, const float* cos, const float* sin, float* out, std::int64_t d) {
    const std::int64_t half = d / 2;
    for (std::int64_t i = 0; i < half; ++i) {
        out[i] = x[i] * cos[i] - x[i + half] * sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

inline void rope_cache_attention(const float* qkv, const float* cos, const float* sin, float* k_cache, float* v_cache,
                                 const std::int32_t* positions, float scale, float* out, const AttentionShape& s) {
    const std::int64_t dh = s.head_dim, stride = (s.heads + 2 * s.kv_heads) * dh;
    std::vector<float> q(static_cast<std::size_t>(s.batch * s.heads * dh));
    std::vector<std::int32_t> span(static_cast<std::size_t>(s.batch));
    for (std::int64_t b = 0; b < s.batch; ++b) {
        const std::int64_t p = positions[b];
        const float* row = qkv + b * stride;
        const float *c = cos + p * dh, *sn = sin + p * dh;
        for (std::int64_t h = 0; h < s.heads; ++h) rope(row + h * dh, c, sn, q.data() + (b * s.heads + h) * dh, dh);
        for (std::int64_t j = 0; j < s.kv_heads; ++j) {
            const std::int64_t slot = ((b * s.kv_heads + j) * s.capacity + p) * dh;
            rope(row + (s.heads + j) * dh, c, sn, k_cache + slot, dh);
            std::copy(row + (s.heads + s.kv_heads + j) * dh, row + (s.heads + s.kv_heads + j + 1) * dh, v_cache + slot);
        }
        span[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(p + 1);
    }
    decode_attention(q.data(), k_cache, v_cache, span.data(), scale, out, s);
}

inline void rope_lookahead_attention(const float* qkv, const float* cos, const float* sin, const float* k_cache,
                                     const float* v_cache, const std::int32_t* positions, std::int64_t k_cand,
                                     float scale, float* out, float* k_new, float* v_new, const AttentionShape& s) {
    const std::int64_t dh = s.head_dim, stride = (s.heads + 2 * s.kv_heads) * dh, group = s.heads / s.kv_heads;
    std::vector<float> q(static_cast<std::size_t>(dh)), scores(static_cast<std::size_t>(s.capacity + 1));
    for (std::int64_t b = 0; b < s.batch; ++b) {
        const std::int64_t p = positions[b];
        const float *c = cos + p * dh, *sn = sin + p * dh;
        for (std::int64_t j = 0; j < k_cand; ++j) {
            const float* row = qkv + (b * k_cand + j) * stride;
            for (std::int64_t kv = 0; kv < s.kv_heads; ++kv) {
                const std::int64_t own = ((b * s.kv_heads + kv) * k_cand + j) * dh;
                rope(row + (s.heads + kv) * dh, c, sn, k_new + own, dh);
                std::copy(row + (s.heads + s.kv_heads + kv) * dh, row + (s.heads + s.kv_heads + kv + 1) * dh,
                          v_new + own);
            }
        }
        for (std::int64_t j = 0; j < k_cand; ++j) {
            const float* row = qkv + (b * k_cand + j) * stride;
            for (std::int64_t h = 0; h < s.heads; ++h) {
                const std::int64_t kv = h / group;
                rope(row + h * dh, c, sn, q.data(), dh);
                const float* keys = k_cache + (b * s.kv_heads + kv) * s.capacity * dh;
                const float* vals = v_cache + (b * s.kv_heads + kv) * s.capacity * dh;
                const float* own_k = k_new + ((b * s.kv_heads + kv) * k_cand + j) * dh;
                const float* own_v = v_new + ((b * s.kv_heads + kv) * k_cand + j) * dh;
                float best = -INFINITY;
                for (std::int64_t t = 0; t <= p; ++t) {
                    const float* key = t < p ? keys + t * dh : own_k;
                    float dot = 0.0f;
                    for (std::int64_t i = 0; i < dh; ++i) dot += q[i] * key[i];
                    scores[t] = dot * scale;
                    best = std::max(best, scores[t]);
                }
                float total = 0.0f;
                for (std::int64_t t = 0; t <= p; ++t) {
                    scores[t] = std::exp(scores[t] - best);
                    total += scores[t];
                }
                float* o = out + (b * k_cand + j) * s.heads * dh + h * dh;
                std::fill(o, o + dh, 0.0f);
                for (std::int64_t t = 0; t <= p; ++t) {
                    const float w = scores[t] / total;
                    const float* value = t < p ? vals + t * dh : own_v;
                    for (std::int64_t i = 0; i < dh; ++i) o[i] += w * value[i];
                }
            }
        }
    }
}

}  // namespace lenvm
