// The native decoder layers (contract in trunk.h).
//
// Structure: the matrix products go to lenvm::panel_linear (its own kernels and threading); the rest of a layer
// (norms, SwiGLU, attention) runs through a small table of row- or task-level functions, built once per process in
// a portable and an AVX2 + FMA build of the same code. This file is compiled with -ffp-contract=off (CMakeLists.txt),
// so those AVX2 builds only widen the vectors and round every operation as the portable ones do (SwiGLU's AVX2
// build is written out in intrinsics, the same operations in the same order, since the compiler left it scalar;
// tests/test_swiglu.py checks the bits). The lookahead's attention has its own AVX2 kernel (attention_avx2.h: one
// task per row, KV head and four candidates), used when the head dim is a multiple of 16; otherwise, and on the
// portable family, one task per candidate.
#include "trunk.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "attention_avx2.h"
#include "cpu_features.h"
#include "decode_ops.h"
#include "linear.h"
#include "panel_linear.h"
#include "thread_pool.h"

namespace lenvm {

namespace {

struct DecodeAttention {
    const float *q, *k_cache, *v_cache;
    const std::int32_t* span;
    float scale;
    float* out;
    AttentionShape shape;
};

struct LookaheadAttention {
    const float *qkv, *cos, *sin, *k_cache, *v_cache;
    const std::int32_t* positions;
    std::int64_t k_cand;
    float scale;
    float* out;
    const float *k_new, *v_new;
    AttentionShape shape;
};

struct ElementwiseKernels {
    void (*rms_norm)(const float* x, const float* weight, float eps, float* out, std::int64_t rows, std::int64_t d);
    void (*swiglu)(const float* gate_up, float* out, std::int64_t rows, std::int64_t n);
    void (*decode_task)(const DecodeAttention& a, std::int64_t task);
    bool avx2;  // whether lookahead_task_avx2 may run (it also needs a head dim that is a multiple of 16)
};

// Lookahead tasks: (row, KV head, chunk of candidates), task = (b Hkv + kv) chunks + c.
constexpr std::int64_t kAvx2CandidatesPerTask = 4;  // their G queries each share every key and value load

std::int64_t chunk_count(std::int64_t k_cand, std::int64_t per_task) { return (k_cand + per_task - 1) / per_task; }

void rms_norm_portable(const float* x, const float* w, float eps, float* out, std::int64_t rows, std::int64_t d) {
    rms_norm(x, w, eps, out, rows, d);
}
void swiglu_portable(const float* gate_up, float* out, std::int64_t rows, std::int64_t n) {
    swiglu(gate_up, out, rows, n);
}
void decode_task_portable(const DecodeAttention& a, std::int64_t task) {
    decode_attention_task(a.q, a.k_cache, a.v_cache, a.span, a.scale, a.out, a.shape, task);
}
void lookahead_task_portable(const LookaheadAttention& a, std::int64_t task) {  // one candidate per task
    const std::int64_t kv = (task / a.k_cand) % a.shape.kv_heads, b = task / (a.k_cand * a.shape.kv_heads);
    const std::int64_t j = task % a.k_cand;
    lookahead_attention_task(a.qkv, a.cos, a.sin, a.k_cache, a.v_cache, a.positions, a.k_cand, a.scale, a.out,
                             a.k_new, a.v_new, a.shape, (b * a.k_cand + j) * a.shape.kv_heads + kv);
}

#if LENVM_HAS_X86
// `flatten` inlines the shared inline code into these bodies, where it is compiled for AVX2 + FMA.
#define LENVM_AVX2_FLAT LENVM_AVX2_FMA __attribute__((flatten))
LENVM_AVX2_FLAT void rms_norm_avx2(const float* x, const float* w, float eps, float* out, std::int64_t rows,
                                   std::int64_t d) {
    rms_norm(x, w, eps, out, rows, d);
}
// swiglu of decode_ops.h written out in 8 lanes (the compiler leaves that loop scalar): the same operations in the
// same order, each rounded alone, so both families give the same bits.
LENVM_AVX2_FMA void swiglu_avx2(const float* gate_up, float* out, std::int64_t rows, std::int64_t n) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), floor = _mm256_set1_ps(-87.0f);
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f), shifter = _mm256_set1_ps(12582912.0f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(2.12194440e-4f);
    const float taylor[] = {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
    const std::int64_t main = n - n % 8;
    for (std::int64_t r = 0; r < rows; ++r) {
        const float* gate = gate_up + r * 2 * n;
        const float* up = gate + n;
        float* o = out + r * n;
        for (std::int64_t i = 0; i < main; i += 8) {
            const __m256 x = _mm256_loadu_ps(gate + i);
            const __m256 negative = _mm256_cmp_ps(x, zero, _CMP_LT_OQ);
            __m256 t = _mm256_blendv_ps(_mm256_xor_ps(x, _mm256_set1_ps(-0.0f)), x, negative);  // -|x|
            t = _mm256_max_ps(floor, t);
            const __m256 k = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(t, log2e), shifter), shifter);
            const __m256 f = _mm256_add_ps(_mm256_sub_ps(t, _mm256_mul_ps(k, ln2_hi)), _mm256_mul_ps(k, ln2_lo));
            __m256 p = _mm256_set1_ps(1.0f / 720.0f);
            for (const float c : taylor) p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(c));
            const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
            const __m256i bits = _mm256_slli_epi32(exponent, 23);
            const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
            const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(one, e, negative), _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(x, sigmoid), _mm256_loadu_ps(up + i)));
        }
        for (std::int64_t i = main; i < n; ++i) o[i] = silu_times(gate[i], up[i]);
    }
}
LENVM_AVX2_FLAT void decode_task_avx2(const DecodeAttention& a, std::int64_t task) {
    decode_attention_task(a.q, a.k_cache, a.v_cache, a.span, a.scale, a.out, a.shape, task);
}
LENVM_AVX2_FMA void lookahead_task_avx2(const LookaheadAttention& a, std::int64_t task) {
    const AttentionShape& s = a.shape;
    const std::int64_t dh = s.head_dim, group = s.heads / s.kv_heads, stride = (s.heads + 2 * s.kv_heads) * dh;
    const std::int64_t chunks = chunk_count(a.k_cand, kAvx2CandidatesPerTask);
    const std::int64_t c = task % chunks, kv = (task / chunks) % s.kv_heads, b = task / (chunks * s.kv_heads);
    const std::int64_t j0 = c * kAvx2CandidatesPerTask, nj = std::min(kAvx2CandidatesPerTask, a.k_cand - j0);
    const std::int64_t nq = nj * group, p = a.positions[b];
    thread_local std::vector<const float*> own_k, own_v;
    thread_local std::vector<float*> out_rows;
    own_k.resize(static_cast<std::size_t>(nq));
    own_v.resize(static_cast<std::size_t>(nq));
    out_rows.resize(static_cast<std::size_t>(nq));
    float* q = thread_scratch(1, nq * dh);
    for (std::int64_t jj = 0; jj < nj; ++jj) {
        const std::int64_t j = j0 + jj, own = ((b * s.kv_heads + kv) * a.k_cand + j) * dh;
        const float* row = a.qkv + (b * a.k_cand + j) * stride;
        for (std::int64_t h = 0; h < group; ++h) {
            const std::int64_t query = jj * group + h;
            const auto i = static_cast<std::size_t>(query);
            rope(row + (kv * group + h) * dh, a.cos + p * dh, a.sin + p * dh, q + query * dh, dh);
            own_k[i] = a.k_new + own;
            own_v[i] = a.v_new + own;
            out_rows[i] = a.out + (b * a.k_cand + j) * s.heads * dh + (kv * group + h) * dh;
        }
    }
    const std::int64_t cache_row = (b * s.kv_heads + kv) * s.capacity * dh;
    avx2::attend_many(q, nq, dh, a.scale, a.k_cache + cache_row, a.v_cache + cache_row, p, own_k.data(),
                      own_v.data(), thread_scratch(0, nq * (p + 1)), out_rows.data());
}
#undef LENVM_AVX2_FLAT
#endif

const ElementwiseKernels& kernels() {
    static const ElementwiseKernels selected = [] {
#if LENVM_HAS_X86
        if (std::string(linear_kernel_name()) == "avx2_fma")
            return ElementwiseKernels{rms_norm_avx2, swiglu_avx2, decode_task_avx2, true};
#endif
        return ElementwiseKernels{rms_norm_portable, swiglu_portable, decode_task_portable, false};
    }();
    return selected;
}

// Rows of an elementwise pass per pool task: one task below kSerialElements elements.
constexpr std::int64_t kSerialElements = 64 * 1024;

template <class Fn>
void over_rows(std::int64_t rows, std::int64_t row_elements, Fn&& fn) {
    ThreadPool& pool = default_pool();
    const std::int64_t tasks = std::min<std::int64_t>(
        std::max<std::int64_t>(rows * row_elements / kSerialElements, 1), rows);
    if (tasks <= 1 || pool.num_threads() == 1) {
        fn(0, rows);
        return;
    }
    const std::int64_t per_task = (rows + tasks - 1) / tasks;
    pool.run(tasks, [&](std::int64_t task) {
        const std::int64_t begin = task * per_task;
        if (begin < rows) fn(begin, std::min(rows, begin + per_task));
    });
}

void add_into(float* x, const float* y, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace

void trunk_swiglu(const float* gate_up, float* out, std::int64_t rows, std::int64_t n) {
    kernels().swiglu(gate_up, out, rows, n);
}

Trunk::Trunk(const TrunkShape& shape, std::vector<TrunkLayer> layers) : shape_(shape), layers_(std::move(layers)) {}

void Trunk::set_cache(const TrunkCache& cache) {
    const std::lock_guard<std::mutex> lock(mutex_);
    cache_ = cache;
}

void Trunk::reserve(std::int64_t m) {
    const TrunkShape& s = shape_;
    const auto grow = [](auto& buffer, std::int64_t n) {
        if (static_cast<std::int64_t>(buffer.size()) < n) buffer.resize(static_cast<std::size_t>(n));
    };
    grow(norm_, m * s.hidden);
    grow(qkv_, m * (s.heads + 2 * s.kv_heads) * s.head_dim);
    grow(attn_, m * s.heads * s.head_dim);
    grow(q_, m * s.heads * s.head_dim);
    grow(proj_, m * s.hidden);
    grow(gate_up_, m * 2 * s.intermediate);
    grow(act_, m * s.intermediate);
    grow(span_, m);
}

void Trunk::attention_input(const TrunkLayer& layer, const float* x, std::int64_t m) {
    const TrunkShape& s = shape_;
    const ElementwiseKernels& k = kernels();
    const std::int64_t dh = s.head_dim, width = (s.heads + 2 * s.kv_heads) * dh;
    over_rows(m, s.hidden, [&](std::int64_t a, std::int64_t b) {
        k.rms_norm(x + a * s.hidden, layer.input_norm, s.eps, norm_.data() + a * s.hidden, b - a, s.hidden);
    });
    panel_linear(norm_.data(), layer.qkv, layer.qkv_bias, qkv_.data(), m, width, s.hidden, default_pool());
    if (layer.q_norm == nullptr) return;
    for (std::int64_t r = 0; r < m; ++r) {  // per-head norms in place: rows of Dh
        float* row = qkv_.data() + r * width;
        k.rms_norm(row, layer.q_norm, s.eps, row, s.heads, dh);
        k.rms_norm(row + s.heads * dh, layer.k_norm, s.eps, row + s.heads * dh, s.kv_heads, dh);
    }
}

void Trunk::mlp_residual(const TrunkLayer& layer, float* x, std::int64_t m) {
    const TrunkShape& s = shape_;
    const ElementwiseKernels& k = kernels();
    ThreadPool& pool = default_pool();
    panel_linear(attn_.data(), layer.o, layer.o_bias, proj_.data(), m, s.hidden, s.heads * s.head_dim, pool);
    add_into(x, proj_.data(), m * s.hidden);
    over_rows(m, s.hidden, [&](std::int64_t a, std::int64_t b) {
        k.rms_norm(x + a * s.hidden, layer.post_norm, s.eps, norm_.data() + a * s.hidden, b - a, s.hidden);
    });
    panel_linear(norm_.data(), layer.gate_up, layer.gate_up_bias, gate_up_.data(), m, 2 * s.intermediate, s.hidden,
                 pool);
    over_rows(m, 2 * s.intermediate, [&](std::int64_t a, std::int64_t b) {
        k.swiglu(gate_up_.data() + a * 2 * s.intermediate, act_.data() + a * s.intermediate, b - a, s.intermediate);
    });
    panel_linear(act_.data(), layer.down, layer.down_bias, proj_.data(), m, s.hidden, s.intermediate, pool);
    add_into(x, proj_.data(), m * s.hidden);
}

void Trunk::decode(float* x, const std::int32_t* positions, std::int64_t rows) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const TrunkShape& s = shape_;
    const AttentionShape shape{rows, s.heads, s.kv_heads, s.head_dim, cache_.capacity};
    reserve(rows);
    for (std::size_t l = 0; l < layers_.size(); ++l) {
        attention_input(layers_[l], x, rows);
        rope_cache_write(qkv_.data(), cache_.cos, cache_.sin, cache_.k[l], cache_.v[l], positions, q_.data(),
                         span_.data(), shape);
        const DecodeAttention args{q_.data(), cache_.k[l], cache_.v[l], span_.data(), s.scale, attn_.data(), shape};
        const auto task = kernels().decode_task;
        default_pool().run(rows * s.kv_heads, [&](std::int64_t t) { task(args, t); });
        mlp_residual(layers_[l], x, rows);
    }
}

void Trunk::lookahead(float* x, const std::int32_t* positions, std::int64_t rows, std::int64_t k_cand, float* k_new,
                      float* v_new) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const TrunkShape& s = shape_;
    const AttentionShape shape{rows, s.heads, s.kv_heads, s.head_dim, cache_.capacity};
    const std::int64_t m = rows * k_cand, per_layer = rows * s.kv_heads * k_cand * s.head_dim;
    reserve(m);
#if LENVM_HAS_X86
    const bool tiled = kernels().avx2 && s.head_dim % 16 == 0;
    const auto task = tiled ? lookahead_task_avx2 : lookahead_task_portable;
    const std::int64_t per_task = tiled ? kAvx2CandidatesPerTask : 1;
#else
    const auto task = lookahead_task_portable;
    const std::int64_t per_task = 1;
#endif
    for (std::size_t l = 0; l < layers_.size(); ++l) {
        float* kn = k_new + static_cast<std::int64_t>(l) * per_layer;
        float* vn = v_new + static_cast<std::int64_t>(l) * per_layer;
        attention_input(layers_[l], x, m);
        lookahead_kv(qkv_.data(), cache_.cos, cache_.sin, positions, k_cand, kn, vn, shape);
        const LookaheadAttention args{qkv_.data(), cache_.cos, cache_.sin, cache_.k[l], cache_.v[l], positions,
                                      k_cand,      s.scale,    attn_.data(), kn,        vn,          shape};
        default_pool().run(rows * s.kv_heads * chunk_count(k_cand, per_task), [&](std::int64_t t) { task(args, t); });
        mlp_residual(layers_[l], x, m);
    }
}

void Trunk::commit(const float* k_new, const float* v_new, const std::int64_t* slot, const std::int32_t* positions,
                   std::int64_t rows, std::int64_t k_cand) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const TrunkShape& s = shape_;
    const std::int64_t dh = s.head_dim, per_layer = rows * s.kv_heads * k_cand * dh;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
        for (std::int64_t b = 0; b < rows; ++b) {
            for (std::int64_t kv = 0; kv < s.kv_heads; ++kv) {
                const std::int64_t from = static_cast<std::int64_t>(l) * per_layer + ((b * s.kv_heads + kv) * k_cand +
                                                                                      slot[b]) * dh;
                const std::int64_t to = ((b * s.kv_heads + kv) * cache_.capacity + positions[b]) * dh;
                std::memcpy(cache_.k[l] + to, k_new + from, static_cast<std::size_t>(dh) * sizeof(float));
                std::memcpy(cache_.v[l] + to, v_new + from, static_cast<std::size_t>(dh) * sizeof(float));
            }
        }
    }
}

}  // namespace lenvm
