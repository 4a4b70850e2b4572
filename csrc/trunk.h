// The decoder layers of Llama / Qwen2 / Qwen3 on the CPU in fp32: one call runs every layer of a decode step or
// of a candidate lookahead, so a token costs one call from Python instead of ~12 per layer.
//
// Shapes: L layers, D hidden, H query heads, Hkv key/value heads, Dh head dim, I intermediate, C cache capacity,
// B rows, K candidates per row; qkv rows are [q (H Dh) | k (Hkv Dh) | v (Hkv Dh)], gate_up rows [gate (I) | up (I)].
//
//   Trunk trunk(shape, layers);                  // weight pointers, borrowed: the caller keeps them alive
//   trunk.set_cache(cache);                      // per-layer K/V caches [Bc, Hkv, C, Dh] and RoPE tables [C, Dh]
//   trunk.decode(x, positions, B);               // x[B, D] in/out: token of row b at cache position positions[b]
//   trunk.lookahead(x, positions, B, K, k_new, v_new);
//                                                // x[B K, D] in/out: K candidates of row b, all at positions[b],
//                                                // each over the cached prefix and itself (tree mask); their roped
//                                                // k and v go to k_new / v_new [L, B, Hkv, K, Dh], caches untouched
//   trunk.commit(k_new, v_new, slot, positions, B, K);
//                                                // candidate slot[b]'s K/V into cache position positions[b]
//
// Per layer: x += o(attention(rope(qkv(norm(x))))), x += down(swiglu(gate_up(norm(x)))), with Qwen3's per-head
// q / k norms before RoPE and optional biases. Every piece is a row- or task-wise kernel (lenvm::panel_linear,
// rms_norm, swiglu and the attention of decode_ops.h, which `_core` also exposes one by one; on AVX2 CPUs the
// lookahead's attention runs as register tiles over four candidates, attention_avx2.h), so a row's result depends
// only on that row (and its cache), never on B, K or the thread count. The kernel family follows linear.h's
// choice: the norm, SwiGLU and decode attention are built twice, portable and AVX2, rounding every operation alike
// (the same bits either way); panel_linear and the tiled lookahead attention use fused multiply-adds on AVX2, so
// the two families agree to rounding. Calls on one Trunk are serialised by a mutex (they share scratch memory).
// Arguments are checked by the caller (csrc/trunk_bindings.cpp).
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "panel_linear.h"

namespace lenvm {

struct TrunkShape {
    std::int64_t layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
};

// One layer's weights: norms [D], qkv [(H + 2 Hkv) Dh, D], o [D, H Dh], gate_up [2 I, D], down [D, I], the four
// matrices packed as panels (panel_linear.h: float32, bfloat16 or float16 storage, each on its own);
// biases and the q / k norms [Dh] may be null.
struct TrunkLayer {
    const float* input_norm;
    Panels qkv;
    const float *qkv_bias, *q_norm, *k_norm;
    Panels o;
    const float *o_bias, *post_norm;
    Panels gate_up;
    const float* gate_up_bias;
    Panels down;
    const float* down_bias;
};

struct TrunkCache {
    std::vector<float*> k, v;  // per layer [batch, Hkv, capacity, Dh]
    std::int64_t batch, capacity;
    const float *cos, *sin;  // [capacity, Dh]
};

// The SwiGLU of the trunk's kernel family: out[r, i] = silu(gate_up[r, i]) * gate_up[r, n + i] (decode_ops.h's
// formula; the AVX2 family computes it 8 lanes at a time with the same bits).
void trunk_swiglu(const float* gate_up, float* out, std::int64_t rows, std::int64_t n);

class Trunk {
public:
    Trunk(const TrunkShape& shape, std::vector<TrunkLayer> layers);

    void set_cache(const TrunkCache& cache);
    bool has_cache() const { return !cache_.k.empty(); }
    const TrunkShape& shape() const { return shape_; }
    const TrunkCache& cache() const { return cache_; }

    void decode(float* x, const std::int32_t* positions, std::int64_t rows);
    void lookahead(float* x, const std::int32_t* positions, std::int64_t rows, std::int64_t k_cand, float* k_new,
                   float* v_new);
    void commit(const float* k_new, const float* v_new, const std::int64_t* slot, const std::int32_t* positions,
                std::int64_t rows, std::int64_t k_cand);

private:
    void reserve(std::int64_t m);
    void attention_input(const TrunkLayer& layer, const float* x, std::int64_t m);  // norm_, qkv_ (q/k normed)
    void mlp_residual(const TrunkLayer& layer, float* x, std::int64_t m);           // from attn_

    TrunkShape shape_;
    std::vector<TrunkLayer> layers_;
    TrunkCache cache_{};
    std::mutex mutex_;
    std::vector<float> norm_, qkv_, attn_, proj_, gate_up_, act_, q_;
    std::vector<std::int32_t> span_;
};

}  // namespace lenvm
