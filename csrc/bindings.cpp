// pybind11 module `lenvm_rt._core`: argument checks, buffer views, GIL release and docstrings only.
//
// philox_uniform(seeds: uint64[B], offsets: uint32[B], stream: int, out: float32[B]) -> None
//   Arrays are C-contiguous 1-D numpy arrays of exactly these dtypes (no conversion: a wrong dtype or layout
//   raises TypeError instead of copying). Shape, writeability and range errors raise ValueError naming the
//   argument. The loop runs with the GIL released.
//
// linear(x: float32[M, K], weight: float32[N, K], bias: float32[N] | None, out: float32[M, N]) -> None
//   out = x @ weight.T + bias (lenvm::linear, csrc/linear.h). C-contiguous float32 arrays only (a wrong dtype
//   or layout raises TypeError); shape, writeability and overlap errors raise ValueError naming the argument.
//   Runs on the default thread pool with the GIL released.
// set_num_threads(n: int) -> None; get_num_threads() -> int
//   Thread count of the default pool (csrc/thread_pool.h), calling thread included; n outside [1, 1024]
//   raises ValueError.
// linear_kernel() -> str
//   "avx2_fma" or "scalar": the kernel linear() uses in this process.
//
// value_head(x: float32[R, D], norm: float32[D], eps, w1: float32[H, D], b1: float32[H], w2: float32[H], b2: float,
//            z: float32[R]) -> None: the LenVM head in one call (csrc/value_head.h), GIL released.
// token_stats(logits: float32[R, V], tokens: int64[R] or int64[R, W], logp: float64 like tokens, rank: int64 like
//             tokens) -> None: log-probability and rank of chosen tokens (csrc/token_stats.h), GIL released.
// rms_norm(x: float32[R, D], weight: float32[D], eps: float, out: float32[R, D]) -> None
// decode_attention(q: float32[B, H, Dh], k_cache: float32[Bc, Hkv, C, Dh], v_cache: same, span: int32[B],
//                  scale: float, out: float32[B, H, Dh]) -> None
//   The per-token operators of csrc/decode_ops.h; shape errors raise ValueError naming the argument; GIL released.
//
// rope_cache_attention(qkv: float32[B, (H + 2 Hkv) Dh], cos: float32[C, Dh], sin: float32[C, Dh],
//                      k_cache: float32[Bc, Hkv, C, Dh], v_cache: same, positions: int32[B], heads: int,
//                      scale: float, out: float32[B, H Dh]) -> None
//   RoPE, cache write and attention of one decode step (csrc/decode_ops.h); writes the caches in place.
// rope_lookahead_attention(qkv: float32[B K, (H + 2 Hkv) Dh], cos, sin, k_cache, v_cache, positions: int32[B],
//                          heads: int, scale: float, out: float32[B K, H Dh], k_new: float32[B, Hkv, K, Dh],
//                          v_new: same) -> None
//   The tree-masked lookahead attention of K candidates per row (csrc/decode_ops.h); caches are read only.
//
// value_of_length / logit_of_length / remaining_from_logit / remaining_from_value(x: float64[N], gamma, out: float64[N])
// td_residual(u_prev: float64[N], u_next: float64[N], gamma, out: float64[N]); gamma_from_lengths(lengths, q, mass)
//   The double-precision value math of csrc/value_math.h, elementwise; γ outside (0, 1) or a negative length
//   raises ValueError.
//
// GuidanceBatch(capacity: int, eos_ids: list[int])   (lenvm::GuidanceBatch, csrc/guidance.h)
//   admit / retire / capacity / active_count / is_active / generated / eos_ids: slot-table bookkeeping.
//   step(rows: int32[B], cand_ids: int32[B, K], cand_logp: float32[B, K], cand_z: float32[B, K],
//        out_slot: int32[B], out_token: int32[B], out_done: uint8[B]) -> None
//   One decode step for the whole batch. C-contiguous arrays of exactly these dtypes (a wrong dtype or layout
//   raises TypeError); shape, writeability and overlap errors here, value errors in lenvm::GuidanceBatch, raise
//   ValueError (IndexError for a slot outside the table) naming the argument. Runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "decode_ops.h"
#include "errors.h"
#include "guidance.h"
#include "linear.h"
#include "py_util.h"
#include "rng.h"
#include "thread_pool.h"
#include "token_stats.h"
#include "value_head.h"
#include "value_math.h"

namespace {

using lenvm::py_util::CArray;
using lenvm::py_util::check_linear_out;
using lenvm::py_util::shape_of;
using lenvm::py_util::without_gil;

template <class T>
void check_vector(const CArray<T>& a, const char* name, py::ssize_t length) {
    lenvm::check(a.ndim() == 1, name, "a 1-D array", std::to_string(a.ndim()) + "-D array");
    lenvm::check(a.shape(0) == length, name, "length " + std::to_string(length) + " (as seeds)", a.shape(0));
}

void philox_uniform(const CArray<std::uint64_t>& seeds, const CArray<std::uint32_t>& offsets,
                    std::int64_t stream, CArray<float>& out) {
    lenvm::check(seeds.ndim() == 1, "seeds", "a 1-D array", std::to_string(seeds.ndim()) + "-D array");
    const py::ssize_t n = seeds.shape(0);
    check_vector(offsets, "offsets", n);
    check_vector(out, "out", n);
    lenvm::check(out.writeable(), "out", "a writeable array", "a read-only array");
    lenvm::check(stream >= 0 && stream <= 0xFFFFFFFFll, "stream", "an integer in [0, 2**32)", stream);

    const std::uint64_t* seed_ptr = seeds.data();
    const std::uint32_t* offset_ptr = offsets.data();
    float* out_ptr = out.mutable_data();
    without_gil([&] {
        lenvm::rng::uniform_batch(seed_ptr, offset_ptr, static_cast<std::size_t>(n),
                                  static_cast<std::uint32_t>(stream), out_ptr);
    });
}

void linear(const CArray<float>& x, const CArray<float>& weight, const std::optional<CArray<float>>& bias,
            CArray<float>& out) {
    lenvm::check(x.ndim() == 2, "x", "a 2-D array [M, K]", shape_of(x));
    const py::ssize_t m = x.shape(0);
    const py::ssize_t k = x.shape(1);
    lenvm::check(weight.ndim() == 2 && weight.shape(1) == k, "weight",
                 "shape [N, " + std::to_string(k) + "] (K from x)", shape_of(weight));
    const py::ssize_t n = weight.shape(0);
    if (bias) {
        lenvm::check(bias->ndim() == 1 && bias->shape(0) == n, "bias",
                     "shape [" + std::to_string(n) + "] (N from weight)", shape_of(*bias));
    }
    check_linear_out(out, m, n,
                     "shape [" + std::to_string(m) + ", " + std::to_string(n) + "] (M from x, N from weight)", x,
                     weight, "weight", bias);
    const float* x_ptr = x.data();
    const float* weight_ptr = weight.data();
    const float* bias_ptr = bias ? bias->data() : nullptr;
    float* out_ptr = out.mutable_data();
    without_gil([&] { lenvm::linear(x_ptr, weight_ptr, bias_ptr, out_ptr, m, n, k, lenvm::default_pool()); });
}

// Shape message built only on failure, so a clean step allocates nothing here.
template <class Expected>
[[noreturn]] void fail_shape(const char* name, const Expected& expected, const py::array& got) {
    throw std::invalid_argument(lenvm::describe_failure(name, expected, shape_of(got)));
}

bool share_bytes(const py::array& a, const py::array& b) {
    const std::less<const char*> before;
    const auto* a_begin = static_cast<const char*>(a.data());
    const auto* b_begin = static_cast<const char*>(b.data());
    return a.nbytes() > 0 && b.nbytes() > 0 && before(a_begin, b_begin + b.nbytes()) &&
           before(b_begin, a_begin + a.nbytes());
}

void guidance_step(lenvm::GuidanceBatch& batch, const CArray<std::int32_t>& rows, const CArray<std::int32_t>& cand_ids,
                   const CArray<float>& cand_logp, const CArray<float>& cand_z, CArray<std::int32_t>& out_slot,
                   CArray<std::int32_t>& out_token, CArray<std::uint8_t>& out_done) {
    if (rows.ndim() != 1) fail_shape("rows", "a 1-D array [B]", rows);
    const py::ssize_t b = rows.shape(0);
    if (cand_ids.ndim() != 2 || cand_ids.shape(0) != b) {
        fail_shape("cand_ids", "shape [B, K] with B = " + std::to_string(b) + " (from rows)", cand_ids);
    }
    const py::ssize_t k = cand_ids.shape(1);
    const auto same_as_ids = [&](const py::array& a, const char* name) {
        if (a.ndim() != 2 || a.shape(0) != b || a.shape(1) != k) {
            fail_shape(name, "shape [" + std::to_string(b) + ", " + std::to_string(k) + "] (as cand_ids)", a);
        }
    };
    same_as_ids(cand_logp, "cand_logp");
    same_as_ids(cand_z, "cand_z");
    const py::array inputs[] = {rows, cand_ids, cand_logp, cand_z};
    const py::array outputs[] = {out_slot, out_token, out_done};
    const char* const output_names[] = {"out_slot", "out_token", "out_done"};
    for (int o = 0; o < 3; ++o) {
        const py::array& out = outputs[o];
        if (out.ndim() != 1 || out.shape(0) != b) {
            fail_shape(output_names[o], "shape [" + std::to_string(b) + "] (B from rows)", out);
        }
        lenvm::check(out.writeable(), output_names[o], "a writeable array", "a read-only array");
        bool shared = false;
        for (const py::array& other : inputs) shared = shared || share_bytes(out, other);
        for (int p = 0; p < o; ++p) shared = shared || share_bytes(out, outputs[p]);
        lenvm::check(!shared, output_names[o], "memory disjoint from the inputs and the other outputs",
                     "an overlapping array");
    }
    const lenvm::StepArgs args{rows.data(),          cand_ids.data(),        cand_logp.data(),
                               cand_z.data(),        out_slot.mutable_data(), out_token.mutable_data(),
                               out_done.mutable_data(), static_cast<std::int64_t>(b), static_cast<std::int64_t>(k)};
    without_gil([&] { batch.step(args); });
}

void rms_norm_py(const CArray<float>& x, const CArray<float>& weight, float eps, CArray<float>& out) {
    lenvm::check(x.ndim() == 2, "x", "a 2-D array [R, D]", x.ndim());
    const auto rows = x.shape(0), d = x.shape(1);
    lenvm::check(weight.ndim() == 1 && weight.shape(0) == d, "weight", "shape [D] matching x", weight.shape(0));
    lenvm::check(out.ndim() == 2 && out.shape(0) == rows && out.shape(1) == d, "out", "the shape of x", out.ndim());
    lenvm::check(out.writeable(), "out", "a writeable array", "read-only");
    const float* xp = x.data();
    const float* wp = weight.data();
    float* op = out.mutable_data();
    without_gil([&] { lenvm::rms_norm(xp, wp, eps, op, rows, d); });
}

void value_head_py(const CArray<float>& x, const CArray<float>& norm, float eps, const CArray<float>& w1,
                   const CArray<float>& b1, const CArray<float>& w2, float b2, CArray<float>& z) {
    lenvm::check(x.ndim() == 2, "x", "a 2-D array [R, D]", x.ndim());
    const auto rows = x.shape(0), d = x.shape(1);
    lenvm::check(norm.ndim() == 1 && norm.shape(0) == d, "norm", "shape [D] matching x", norm.shape(0));
    lenvm::check(w1.ndim() == 2 && w1.shape(1) == d, "w1", "shape [H, D] matching x", w1.ndim());
    const auto hidden = w1.shape(0);
    lenvm::check(b1.ndim() == 1 && b1.shape(0) == hidden, "b1", "shape [H] matching w1", b1.shape(0));
    lenvm::check(w2.ndim() == 1 && w2.shape(0) == hidden, "w2", "shape [H] matching w1", w2.shape(0));
    lenvm::check(z.ndim() == 1 && z.shape(0) == rows, "z", "shape [R] matching x", z.shape(0));
    lenvm::check(z.writeable(), "z", "a writeable array", "read-only");
    const float *xp = x.data(), *np = norm.data(), *w1p = w1.data(), *b1p = b1.data(), *w2p = w2.data();
    float* zp = z.mutable_data();
    without_gil(
        [&] { lenvm::value_head(xp, np, eps, w1p, b1p, w2p, b2, zp, rows, d, hidden, lenvm::default_pool()); });
}

void token_stats_py(const CArray<float>& logits, const CArray<std::int64_t>& tokens, CArray<double>& logp,
                    CArray<std::int64_t>& rank) {
    lenvm::check(logits.ndim() == 2 && logits.shape(1) > 0, "logits", "a 2-D array [R, V], V >= 1", logits.ndim());
    const auto rows = logits.shape(0), vocab = logits.shape(1);
    lenvm::check((tokens.ndim() == 1 || (tokens.ndim() == 2 && tokens.shape(1) >= 1)) && tokens.shape(0) == rows,
                 "tokens", "int64[R] or int64[R, W] matching logits", tokens.ndim());
    const py::ssize_t width = tokens.ndim() == 2 ? tokens.shape(1) : 1;
    for (py::ssize_t i = 0; i < rows * width; ++i)
        lenvm::check_index(tokens.data()[i] >= 0 && tokens.data()[i] < vocab, "tokens", "ids in [0, V)",
                           tokens.data()[i]);
    const auto shaped_like_tokens = [&](const py::array& a) {
        if (a.ndim() != tokens.ndim() || !a.writeable()) return false;
        for (py::ssize_t d = 0; d < a.ndim(); ++d)
            if (a.shape(d) != tokens.shape(d)) return false;
        return true;
    };
    lenvm::check(shaped_like_tokens(logp), "logp", "a writeable float64 array shaped like tokens", logp.ndim());
    lenvm::check(shaped_like_tokens(rank), "rank", "a writeable int64 array shaped like tokens", rank.ndim());
    const float* lp = logits.data();
    const std::int64_t* tp = tokens.data();
    double* op = logp.mutable_data();
    std::int64_t* rp = rank.mutable_data();
    without_gil([&] { lenvm::token_stats(lp, tp, rows, width, vocab, op, rp); });
}

void decode_attention_py(const CArray<float>& q, const CArray<float>& k_cache, const CArray<float>& v_cache,
                         const CArray<std::int32_t>& span, float scale, CArray<float>& out) {
    lenvm::check(q.ndim() == 3, "q", "a 3-D array [B, H, Dh]", q.ndim());
    lenvm::check(k_cache.ndim() == 4, "k_cache", "a 4-D array [Bc, Hkv, C, Dh]", k_cache.ndim());
    const lenvm::AttentionShape s{q.shape(0), q.shape(1), k_cache.shape(1), q.shape(2), k_cache.shape(2)};
    lenvm::check(k_cache.shape(0) >= s.batch && k_cache.shape(3) == s.head_dim && s.kv_heads > 0 &&
                     s.heads % s.kv_heads == 0,
                 "k_cache", "[Bc >= B, Hkv dividing H, C, Dh]", k_cache.shape(1));
    lenvm::check(v_cache.ndim() == 4 && v_cache.shape(0) == k_cache.shape(0) && v_cache.shape(1) == s.kv_heads &&
                     v_cache.shape(2) == s.capacity && v_cache.shape(3) == s.head_dim,
                 "v_cache", "the shape of k_cache", v_cache.ndim());
    lenvm::check(span.ndim() == 1 && span.shape(0) == s.batch, "span", "int32[B]", span.ndim());
    for (py::ssize_t b = 0; b < s.batch; ++b)
        lenvm::check(span.data()[b] >= 1 && span.data()[b] <= s.capacity, "span", "values in [1, C]", span.data()[b]);
    lenvm::check(out.ndim() == 3 && out.shape(0) == s.batch && out.shape(1) == s.heads && out.shape(2) == s.head_dim,
                 "out", "the shape of q", out.ndim());
    lenvm::check(out.writeable(), "out", "a writeable array", "read-only");
    const float *qp = q.data(), *kp = k_cache.data(), *vp = v_cache.data();
    const std::int32_t* sp = span.data();
    float* op = out.mutable_data();
    without_gil([&] { lenvm::decode_attention(qp, kp, vp, sp, scale, op, s); });
}

void rope_cache_attention_py(const CArray<float>& qkv, const CArray<float>& cos, const CArray<float>& sin,
                             CArray<float>& k_cache, CArray<float>& v_cache, const CArray<std::int32_t>& positions,
                             std::int64_t heads, float scale, CArray<float>& out) {
    lenvm::check(k_cache.ndim() == 4 && k_cache.writeable(), "k_cache", "a writeable 4-D array", k_cache.ndim());
    lenvm::check(qkv.ndim() == 2, "qkv", "a 2-D array [B, (H + 2 Hkv) Dh]", qkv.ndim());
    const lenvm::AttentionShape s{qkv.shape(0), heads, k_cache.shape(1), k_cache.shape(3), k_cache.shape(2)};
    lenvm::check(s.kv_heads > 0 && heads > 0 && heads % s.kv_heads == 0 && s.head_dim % 2 == 0, "heads",
                 "a multiple of the cache's KV heads, with an even head dim", heads);
    lenvm::check(qkv.shape(1) == (heads + 2 * s.kv_heads) * s.head_dim, "qkv", "(H + 2 Hkv) Dh columns", qkv.shape(1));
    lenvm::check(k_cache.shape(0) >= s.batch, "k_cache", "at least B rows", k_cache.shape(0));
    lenvm::check(v_cache.ndim() == 4 && v_cache.writeable() && v_cache.shape(0) == k_cache.shape(0) &&
                     v_cache.shape(1) == s.kv_heads && v_cache.shape(2) == s.capacity && v_cache.shape(3) == s.head_dim,
                 "v_cache", "a writeable array shaped like k_cache", v_cache.ndim());
    for (const auto* table : {&cos, &sin})
        lenvm::check(table->ndim() == 2 && table->shape(0) >= s.capacity && table->shape(1) == s.head_dim,
                     "cos/sin", "[C, Dh] tables covering the cache", table->ndim());
    lenvm::check(positions.ndim() == 1 && positions.shape(0) == s.batch, "positions", "int32[B]", positions.ndim());
    for (py::ssize_t b = 0; b < s.batch; ++b)
        lenvm::check(positions.data()[b] >= 0 && positions.data()[b] < s.capacity, "positions", "values in [0, C)",
                     positions.data()[b]);
    lenvm::check(out.ndim() == 2 && out.shape(0) == s.batch && out.shape(1) == heads * s.head_dim && out.writeable(),
                 "out", "a writeable array [B, H Dh]", out.ndim());
    const float *qp = qkv.data(), *cp = cos.data(), *sp = sin.data();
    float *kp = k_cache.mutable_data(), *vp = v_cache.mutable_data(), *op = out.mutable_data();
    const std::int32_t* pp = positions.data();
    without_gil([&] { lenvm::rope_cache_attention(qp, cp, sp, kp, vp, pp, scale, op, s); });
}

void rope_lookahead_attention_py(const CArray<float>& qkv, const CArray<float>& cos, const CArray<float>& sin,
                                 const CArray<float>& k_cache, const CArray<float>& v_cache,
                                 const CArray<std::int32_t>& positions, std::int64_t heads, float scale,
                                 CArray<float>& out, CArray<float>& k_new, CArray<float>& v_new) {
    lenvm::check(k_cache.ndim() == 4, "k_cache", "a 4-D array [Bc, Hkv, C, Dh]", k_cache.ndim());
    lenvm::check(k_new.ndim() == 4 && k_new.writeable(), "k_new", "a writeable 4-D array [B, Hkv, K, Dh]",
                 k_new.ndim());
    const std::int64_t batch = k_new.shape(0), k_cand = k_new.shape(2);
    const lenvm::AttentionShape s{batch, heads, k_cache.shape(1), k_cache.shape(3), k_cache.shape(2)};
    lenvm::check(s.kv_heads > 0 && heads > 0 && heads % s.kv_heads == 0 && s.head_dim % 2 == 0, "heads",
                 "a multiple of the cache's KV heads, with an even head dim", heads);
    lenvm::check(k_new.shape(1) == s.kv_heads && k_new.shape(3) == s.head_dim && k_cand >= 1, "k_new",
                 "[B, Hkv, K, Dh] matching the cache", k_new.shape(1));
    lenvm::check(v_new.ndim() == 4 && v_new.writeable() && v_new.shape(0) == batch && v_new.shape(1) == s.kv_heads &&
                     v_new.shape(2) == k_cand && v_new.shape(3) == s.head_dim,
                 "v_new", "a writeable array shaped like k_new", v_new.ndim());
    lenvm::check(qkv.ndim() == 2 && qkv.shape(0) == batch * k_cand &&
                     qkv.shape(1) == (heads + 2 * s.kv_heads) * s.head_dim,
                 "qkv", "[B K, (H + 2 Hkv) Dh]", qkv.ndim() == 2 ? qkv.shape(0) : -1);
    lenvm::check(k_cache.shape(0) >= batch, "k_cache", "at least B rows", k_cache.shape(0));
    lenvm::check(v_cache.ndim() == 4 && v_cache.shape(0) == k_cache.shape(0) && v_cache.shape(1) == s.kv_heads &&
                     v_cache.shape(2) == s.capacity && v_cache.shape(3) == s.head_dim,
                 "v_cache", "the shape of k_cache", v_cache.ndim());
    for (const auto* table : {&cos, &sin})
        lenvm::check(table->ndim() == 2 && table->shape(0) >= s.capacity && table->shape(1) == s.head_dim,
                     "cos/sin", "[C, Dh] tables covering the cache", table->ndim());
    lenvm::check(positions.ndim() == 1 && positions.shape(0) == batch, "positions", "int32[B]", positions.ndim());
    for (py::ssize_t b = 0; b < batch; ++b)
        lenvm::check(positions.data()[b] >= 1 && positions.data()[b] < s.capacity, "positions", "values in [1, C)",
                     positions.data()[b]);
    lenvm::check(out.ndim() == 2 && out.shape(0) == batch * k_cand && out.shape(1) == heads * s.head_dim &&
                     out.writeable(),
                 "out", "a writeable array [B K, H Dh]", out.ndim());
    const float *qp = qkv.data(), *cp = cos.data(), *sp = sin.data(), *kp = k_cache.data(), *vp = v_cache.data();
    float *op = out.mutable_data(), *knp = k_new.mutable_data(), *vnp = v_new.mutable_data();
    const std::int32_t* pp = positions.data();
    without_gil([&] { lenvm::rope_lookahead_attention(qp, cp, sp, kp, vp, pp, k_cand, scale, op, knp, vnp, s); });
}

// Elementwise value math over a float64 array: checks, then `fn(x, gamma)` for every element.
template <double (*Fn)(double, double), bool Lengths>
void value_math_map(const CArray<double>& x, double gamma, CArray<double>& out) {
    lenvm::math64::check_gamma(gamma);
    lenvm::check(x.ndim() == 1 && out.ndim() == 1 && x.shape(0) == out.shape(0), "out",
                 "a 1-D array as long as the input", out.ndim() == 1 ? out.shape(0) : -1);
    const double* in = x.data();
    double* dst = out.mutable_data();
    const auto n = x.shape(0);
    for (py::ssize_t i = 0; i < n; ++i) {
        if (Lengths) lenvm::math64::check_length(in[i]);
        dst[i] = Fn(in[i], gamma);
    }
}

void td_residual_map(const CArray<double>& u_prev, const CArray<double>& u_next, double gamma, CArray<double>& out) {
    lenvm::math64::check_gamma(gamma);
    lenvm::check(u_prev.ndim() == 1 && u_next.ndim() == 1 && u_prev.shape(0) == u_next.shape(0), "u_next",
                 "a 1-D array as long as u_prev", u_next.ndim() == 1 ? u_next.shape(0) : -1);
    lenvm::check(out.ndim() == 1 && out.shape(0) == u_prev.shape(0), "out", "a 1-D array as long as u_prev",
                 out.ndim() == 1 ? out.shape(0) : -1);
    for (py::ssize_t i = 0; i < u_prev.shape(0); ++i)
        out.mutable_data()[i] = lenvm::math64::td_residual(u_prev.data()[i], u_next.data()[i], gamma);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    bind_trunk(m);
    bind_panels(m);
    m.doc() = "Native core of lenvm_rt (C++17, numpy arrays only). Use lenvm_rt._native, not this module.";
    m.def("philox_uniform", &philox_uniform, py::arg("seeds").noconvert(), py::arg("offsets").noconvert(),
          py::arg("stream"), py::arg("out").noconvert(),
          "Write Philox4x32-10 uniforms in [0, 1) into `out` (float32[B]), bit-identical to Triton's tl.rand.\n\n"
          "Element i uses key = seeds[i] (uint64: low word, high word) and counter = (offsets[i], stream, 0, 0);\n"
          "seeds: uint64[B], offsets: uint32[B], stream in [0, 2**32), out: float32[B], all C-contiguous.");
    m.def("linear", &linear, py::arg("x").noconvert(), py::arg("weight").noconvert(),
          py::arg("bias").noconvert().none(true), py::arg("out").noconvert(),
          "Write x @ weight.T + bias into `out` (float32, C-contiguous): x [M, K], weight [N, K],\n"
          "bias [N] or None, out [M, N], out disjoint from the inputs. out[m, n] depends only on x[m], weight[n],\n"
          "bias[n] and K (bit-identical for any M and thread count). Runs on the default thread pool, GIL released.");
    m.def("set_num_threads", [](int n) { without_gil([n] { lenvm::default_pool().set_num_threads(n); }); },
          py::arg("n"),
          "Set the default pool's thread count (calling thread included), n in [1, 1024].");
    m.def("get_num_threads", [] { return lenvm::default_pool().num_threads(); },
          "Thread count of the default pool: set_num_threads, else LENVM_RT_NUM_THREADS, else min(cores, 8).");
    m.def("pool_self_check",
          [](int num_threads, std::int64_t jobs, std::int64_t max_tasks) {
              std::int64_t faulty = 0;
              without_gil([&] { faulty = lenvm::pool_self_check(num_threads, jobs, max_tasks); });
              return faulty;
          },
          py::arg("num_threads"), py::arg("jobs"), py::arg("max_tasks"),
          "Run `jobs` jobs of 1..max_tasks tasks on a private pool; return how many ran a task other than once.");
    m.def("linear_kernel", [] { return std::string(lenvm::linear_kernel_name()); },
          "Kernel used by linear() in this process: 'avx2_fma' or 'scalar' (LENVM_RT_LINEAR_KERNEL=scalar forces it).");

    m.def("rms_norm", &rms_norm_py, py::arg("x").noconvert(), py::arg("weight").noconvert(), py::arg("eps"),
          py::arg("out").noconvert(), "out = x / sqrt(mean(x**2) + eps) * weight per row (float32).");
    m.def("value_head", &value_head_py, py::arg("x").noconvert(), py::arg("norm").noconvert(), py::arg("eps"),
          py::arg("w1").noconvert(), py::arg("b1").noconvert(), py::arg("w2").noconvert(), py::arg("b2"),
          py::arg("z").noconvert(),
          "z[r] = b2 + w2 . silu(w1 rms_norm(x[r]) + b1) (float32; csrc/value_head.h), GIL released.");
    m.def("token_stats", &token_stats_py, py::arg("logits").noconvert(), py::arg("tokens").noconvert(),
          py::arg("logp").noconvert(), py::arg("rank").noconvert(),
          "Per row r and chosen token t = tokens[r] (int64[R]) or tokens[r, i] (int64[R, W]): logp = log\n"
          "softmax(logits[r])[t] (float64) and rank = 1 + the count of logits[r] strictly above logits[r, t]\n"
          "(int64), shaped like tokens; logits float32 [R, V], one pass per row. NaN logp for a row with NaN or +inf.");
    m.def("decode_attention", &decode_attention_py, py::arg("q").noconvert(), py::arg("k_cache").noconvert(),
          py::arg("v_cache").noconvert(), py::arg("span").noconvert(), py::arg("scale"), py::arg("out").noconvert(),
          "One query per row and head over cache positions 0..span[b]-1, grouped-query, float32.");
    m.def("rope_cache_attention", &rope_cache_attention_py, py::arg("qkv").noconvert(), py::arg("cos").noconvert(),
          py::arg("sin").noconvert(), py::arg("k_cache").noconvert(), py::arg("v_cache").noconvert(),
          py::arg("positions").noconvert(), py::arg("heads"), py::arg("scale"), py::arg("out").noconvert(),
          "RoPE, KV-cache write and attention of one decode step (models without q/k norms), float32.");
    m.def("rope_lookahead_attention", &rope_lookahead_attention_py, py::arg("qkv").noconvert(),
          py::arg("cos").noconvert(), py::arg("sin").noconvert(), py::arg("k_cache").noconvert(),
          py::arg("v_cache").noconvert(), py::arg("positions").noconvert(), py::arg("heads"), py::arg("scale"),
          py::arg("out").noconvert(), py::arg("k_new").noconvert(), py::arg("v_new").noconvert(),
          "Tree-masked lookahead attention of K candidates per row (models without q/k norms), float32.");
    namespace vm = lenvm::math64;
    m.def("value_of_length", &value_math_map<vm::value_of_length, true>, py::arg("lengths").noconvert(),
          py::arg("gamma"), py::arg("out").noconvert(), "out = 1 - gamma**lengths (float64).");
    m.def("logit_of_length", &value_math_map<vm::logit_of_length, true>, py::arg("lengths").noconvert(),
          py::arg("gamma"), py::arg("out").noconvert(), "out = ln((1 - gamma**l) / gamma**l) (float64).");
    m.def("remaining_from_logit", &value_math_map<vm::remaining_from_logit, false>, py::arg("z").noconvert(),
          py::arg("gamma"), py::arg("out").noconvert(), "out = softplus(z) / -ln(gamma) (float64).");
    m.def("remaining_from_value", &value_math_map<vm::remaining_from_value, false>, py::arg("u").noconvert(),
          py::arg("gamma"), py::arg("out").noconvert(), "out = ln(1 - u) / ln(gamma) (float64).");
    m.def("td_residual", &td_residual_map, py::arg("u_prev").noconvert(), py::arg("u_next").noconvert(),
          py::arg("gamma"), py::arg("out").noconvert(), "out = gamma * u_next - u_prev + (1 - gamma) (float64).");
    m.def("gamma_from_lengths", &vm::gamma_from_lengths, py::arg("lengths"), py::arg("quantile"), py::arg("mass"),
          "(1 - mass) ** (1 / L_q), L_q the quantile of the lengths (numpy's linear interpolation).");

    using lenvm::GuidanceBatch;
    py::class_<GuidanceBatch>(m, "GuidanceBatch",
                              "Length-guided selection: a slot table of per-request state and one step() per decode\n"
                              "step for the whole batch (rules: lenvm_rt/select_ref.py; contract: csrc/guidance.h).")
        .def(py::init<std::int64_t, std::vector<std::int32_t>>(), py::arg("capacity"), py::arg("eos_ids"),
             "capacity in [1, 2**24] slots; eos_ids: non-empty token ids >= 0 (eos_ids[0] is the forced EOS).")
        .def("admit", &GuidanceBatch::admit, py::arg("slot"), py::arg("rule"), py::arg("target"), py::arg("max_new"),
             py::arg("gamma"), py::arg("beta"), py::arg("seed"), py::arg("greedy"),
             "Start a request in a free slot with t = 0: rule 1 equal, 2 at_most, 3 at_least, 4 tilt, 5 equal_band,\n"
             "6 equal_soft, 7 at_most_band, 8 at_least_band; target >= 1 (unused by tilt); max_new >= 1; 0 < gamma < 1; |beta| <= 1e30;\n"
             "seed in [0, 2**64).")
        .def("retire", &GuidanceBatch::retire, py::arg("slot"), "Free an active slot.")
        .def("step", &guidance_step, py::arg("rows").noconvert(), py::arg("cand_ids").noconvert(),
             py::arg("cand_logp").noconvert(), py::arg("cand_z").noconvert(), py::arg("out_slot").noconvert(),
             py::arg("out_token").noconvert(), py::arg("out_done").noconvert(),
             "One decode step: rows int32[B] (distinct active slots), cand_ids int32[B, K] (-1 = empty, slot 0\n"
             "filled), cand_logp / cand_z float32[B, K] -> out_slot int32[B] (-1 = forced EOS), out_token int32[B],\n"
             "out_done uint8[B]; then t += 1 for every row. On error nothing is written or advanced. GIL released.")
        .def("capacity", &GuidanceBatch::capacity, "Slots in the table.")
        .def("active_count", &GuidanceBatch::active_count, "Admitted, not yet retired slots.")
        .def("is_active", &GuidanceBatch::is_active, py::arg("slot"), "Whether the slot holds a request.")
        .def("generated", &GuidanceBatch::generated, py::arg("slot"), "Tokens t an active slot has generated.")
        .def("eos_ids", &GuidanceBatch::eos_ids, "The EOS token ids.");
}
