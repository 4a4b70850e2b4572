// Small per-token CPU operators of the decode step, where torch's per-op overhead outweighs the work
// (a decode step issues ~60 norms and ~30 attention reads, each a few thousand FLOPs).
//
// rms_norm(x[R, D], weight[D], eps, out[R, D])
//   out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, accumulated in double then rounded to float.
// swiglu(gate_up[R, 2n], out[R, n])
//   out = silu(gate) * up, the gated MLP's activation.
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
// Attention runs rows x KV heads (x candidates) as tasks on the core's thread pool; each task's result
// depends only on its own inputs. Shapes are checked by the caller (csrc/bindings.cpp); the only heap
// memory is a per-thread scratch buffer that grows to the largest capacity seen, and nothing exits or aborts.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "thread_pool.h"

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

// Dot product with 8 partial sums combined in a fixed order: the compiler vectorises it without
// -ffast-math, and the result depends only on the inputs (never on batch, thread or call site).
inline float dot8(const float* a, const float* b, std::int64_t n) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    std::int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
    float tail = 0.0f;
    for (; i < n; ++i) tail += a[i] * b[i];
    return (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + tail;
}

// exp(x) for x <= 0: x = k·ln2 + f with |f| <= ln2/2, e^f by its degree-6 Taylor polynomial (relative
// error < 2e-7), 2^k from exponent bits; x below -87 gives ~1e-38. Branch-free, so a loop over it
// vectorises (std::exp does not, and dominated decode attention).
inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    const float f = (x - k * 0.693359375f) + k * 2.12194440e-4f;
    float p = 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const std::int32_t bits = (static_cast<std::int32_t>(k) + 127) * (1 << 23);
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// SiLU-gated product of the MLP: out[r, i] = silu(gate_up[r, i]) * gate_up[r, n + i] for gate_up[R, 2n], out[R, n],
// silu(x) = x * sigmoid(x) with sigmoid from exp(-|x|) (exp_nonpositive, relative error < 2e-7).
inline float silu_times(float x, float up) {
    const float e = exp_nonpositive(x < 0.0f ? x : -x);  // exp(-|x|)
    const float sigmoid = (x < 0.0f ? e : 1.0f) / (1.0f + e);
    return (x * sigmoid) * up;
}

inline void swiglu(const float* gate_up, float* out, std::int64_t rows, std::int64_t n) {
    for (std::int64_t r = 0; r < rows; ++r) {
        const float* gate = gate_up + r * 2 * n;
        for (std::int64_t i = 0; i < n; ++i) out[r * n + i] = silu_times(gate[i], gate[n + i]);
    }
}

// The g query heads q[g, Dh] that share one KV head, over n keys: key(t) / value(t) give the t-th key and
// value vector, each read once for all g heads. out[g, Dh] is softmax(scale · q·K^T) · V with
// max-subtracted float scores; scores is scratch of >= g·n floats.
template <class KeyAt, class ValueAt>
inline void attend(const float* q, std::int64_t g, std::int64_t n, std::int64_t dh, float scale, KeyAt key,
                   ValueAt value, float* scores, float* out) {
    for (std::int64_t t = 0; t < n; ++t) {
        const float* k = key(t);
        for (std::int64_t h = 0; h < g; ++h) scores[h * n + t] = dot8(q + h * dh, k, dh) * scale;
    }
    for (std::int64_t h = 0; h < g; ++h) {
        float* sh = scores + h * n;
        float best = -INFINITY;
        for (std::int64_t t = 0; t < n; ++t) best = std::max(best, sh[t]);
        for (std::int64_t t = 0; t < n; ++t) sh[t] = exp_nonpositive(sh[t] - best);
        float total = 0.0f;
        for (std::int64_t t = 0; t < n; ++t) total += sh[t];
        const float inv = 1.0f / total;
        for (std::int64_t t = 0; t < n; ++t) sh[t] *= inv;
    }
    std::fill(out, out + g * dh, 0.0f);
    for (std::int64_t t = 0; t < n; ++t) {
        const float* v = value(t);
        for (std::int64_t h = 0; h < g; ++h) {
            const float w = scores[h * n + t];
            float* o = out + h * dh;
            for (std::int64_t i = 0; i < dh; ++i) o[i] += w * v[i];
        }
    }
}

// Per-thread scratch buffers (0: scores, 1: a roped query), grown on demand and kept.
inline float* thread_scratch(std::size_t which, std::int64_t n) {
    thread_local std::vector<float> buffers[2];
    std::vector<float>& buffer = buffers[which];
    if (static_cast<std::int64_t>(buffer.size()) < n) buffer.resize(static_cast<std::size_t>(n));
    return buffer.data();
}

// One task of decode attention: row b = task / Hkv, KV head task % Hkv, its query heads over positions < span[b].
inline void decode_attention_task(const float* q, const float* k_cache, const float* v_cache, const std::int32_t* span,
                                  float scale, float* out, const AttentionShape& s, std::int64_t task) {
    const std::int64_t group = s.heads / s.kv_heads, dh = s.head_dim;
    const std::int64_t b = task / s.kv_heads, kv = task % s.kv_heads;
    const float* k = k_cache + (b * s.kv_heads + kv) * s.capacity * dh;
    const float* v = v_cache + (b * s.kv_heads + kv) * s.capacity * dh;
    const std::int64_t head = b * s.heads + kv * group;  // first query head of this KV head
    attend(q + head * dh, group, span[b], dh, scale, [&](std::int64_t t) { return k + t * dh; },
           [&](std::int64_t t) { return v + t * dh; }, thread_scratch(0, group * s.capacity), out + head * dh);
}

// Rows x KV heads are independent tasks on the core's thread pool.
inline void decode_attention(const float* q, const float* k_cache, const float* v_cache, const std::int32_t* span,
                             float scale, float* out, const AttentionShape& s) {
    default_pool().run(s.batch * s.kv_heads, [&](std::int64_t task) {
        decode_attention_task(q, k_cache, v_cache, span, scale, out, s, task);
    });
}

// x·cos + rotate_half(x)·sin for one head vector of even length d.
inline void rope(const float* x, const float* cos, const float* sin, float* out, std::int64_t d) {
    const std::int64_t half = d / 2;
    for (std::int64_t i = 0; i < half; ++i) {
        out[i] = x[i] * cos[i] - x[i + half] * sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

// The serial part of a decode step's attention: RoPE on q (into q_out[B, H, Dh]) and k, k and v written to cache
// position p_b of row b, span[b] = p_b + 1.
inline void rope_cache_write(const float* qkv, const float* cos, const float* sin, float* k_cache, float* v_cache,
                             const std::int32_t* positions, float* q_out, std::int32_t* span, const AttentionShape& s) {
    const std::int64_t dh = s.head_dim, stride = (s.heads + 2 * s.kv_heads) * dh;
    for (std::int64_t b = 0; b < s.batch; ++b) {
        const std::int64_t p = positions[b];
        const float* row = qkv + b * stride;
        const float *c = cos + p * dh, *sn = sin + p * dh;
        for (std::int64_t h = 0; h < s.heads; ++h) rope(row + h * dh, c, sn, q_out + (b * s.heads + h) * dh, dh);
        for (std::int64_t j = 0; j < s.kv_heads; ++j) {
            const std::int64_t slot = ((b * s.kv_heads + j) * s.capacity + p) * dh;
            rope(row + (s.heads + j) * dh, c, sn, k_cache + slot, dh);
            std::copy(row + (s.heads + s.kv_heads + j) * dh, row + (s.heads + s.kv_heads + j + 1) * dh, v_cache + slot);
        }
        span[b] = static_cast<std::int32_t>(p + 1);
    }
}

inline void rope_cache_attention(const float* qkv, const float* cos, const float* sin, float* k_cache, float* v_cache,
                                 const std::int32_t* positions, float scale, float* out, const AttentionShape& s) {
    std::vector<float> q(static_cast<std::size_t>(s.batch * s.heads * s.head_dim));
    std::vector<std::int32_t> span(static_cast<std::size_t>(s.batch));
    rope_cache_write(qkv, cos, sin, k_cache, v_cache, positions, q.data(), span.data(), s);
    decode_attention(q.data(), k_cache, v_cache, span.data(), scale, out, s);
}

// The lookahead's serial part: the candidates' roped k and their v into k_new / v_new [B, Hkv, K, Dh].
inline void lookahead_kv(const float* qkv, const float* cos, const float* sin, const std::int32_t* positions,
                         std::int64_t k_cand, float* k_new, float* v_new, const AttentionShape& s) {
    const std::int64_t dh = s.head_dim, stride = (s.heads + 2 * s.kv_heads) * dh;
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
    }
}

// One lookahead task: candidate j of row b and KV head kv (task = (b K + j) Hkv + kv), its query heads over the
// row's cached positions < p_b and the candidate's own k / v (after lookahead_kv).
inline void lookahead_attention_task(const float* qkv, const float* cos, const float* sin, const float* k_cache,
                                     const float* v_cache, const std::int32_t* positions, std::int64_t k_cand,
                                     float scale, float* out, const float* k_new, const float* v_new,
                                     const AttentionShape& s, std::int64_t task) {
    const std::int64_t dh = s.head_dim, stride = (s.heads + 2 * s.kv_heads) * dh, group = s.heads / s.kv_heads;
    const std::int64_t kv = task % s.kv_heads, j = (task / s.kv_heads) % k_cand, b = task / (s.kv_heads * k_cand);
    const std::int64_t p = positions[b];
    const float* row = qkv + (b * k_cand + j) * stride;
    float* q = thread_scratch(1, group * dh);
    for (std::int64_t h = 0; h < group; ++h)
        rope(row + (kv * group + h) * dh, cos + p * dh, sin + p * dh, q + h * dh, dh);
    const float* keys = k_cache + (b * s.kv_heads + kv) * s.capacity * dh;
    const float* vals = v_cache + (b * s.kv_heads + kv) * s.capacity * dh;
    const float* own_k = k_new + ((b * s.kv_heads + kv) * k_cand + j) * dh;
    const float* own_v = v_new + ((b * s.kv_heads + kv) * k_cand + j) * dh;
    attend(q, group, p + 1, dh, scale, [&](std::int64_t t) { return t < p ? keys + t * dh : own_k; },
           [&](std::int64_t t) { return t < p ? vals + t * dh : own_v; }, thread_scratch(0, group * (s.capacity + 1)),
           out + (b * k_cand + j) * s.heads * dh + kv * group * dh);
}

inline void rope_lookahead_attention(const float* qkv, const float* cos, const float* sin, const float* k_cache,
                                     const float* v_cache, const std::int32_t* positions, std::int64_t k_cand,
                                     float scale, float* out, float* k_new, float* v_new, const AttentionShape& s) {
    lookahead_kv(qkv, cos, sin, positions, k_cand, k_new, v_new, s);
    default_pool().run(s.batch * k_cand * s.kv_heads, [&](std::int64_t task) {
        lookahead_attention_task(qkv, cos, sin, k_cache, v_cache, positions, k_cand, scale, out, k_new, v_new, s, task);
    });
}

}  // namespace lenvm
