// lenvm_rt._core.Trunk: argument checks, buffer views and GIL release for lenvm::Trunk (csrc/trunk.h).
//
// Trunk(layers: int, hidden, heads, kv_heads, head_dim, intermediate, eps: float, scale: float, weights: list)
//   weights[l] = (input_norm, qkv, qkv_bias, q_norm, k_norm, o, o_bias, post_norm, gate_up, gate_up_bias, down,
//   down_bias): float32 C-contiguous arrays of the shapes in trunk.h, the four matrices packed as panels
//   [ceil(N / 8), K, 8] (csrc/panel_linear.h; float32, int16 bfloat16 bits or float16); biases and q_norm /
//   k_norm may be None (both or neither). The Trunk keeps references to every array it was given.
// set_cache(k: list[float32[Bc, Hkv, C, Dh]], v: same, cos: float32[C', Dh], sin: same), C' >= C; clear_cache()
// decode(x: float32[B, D], positions: int32[B]): positions in [0, C), B <= Bc; x updated in place
// lookahead(x: float32[B K, D], positions: int32[B], k_new: float32[L, B, Hkv, K, Dh], v_new: same):
//   positions in [1, C) (a candidate needs a cached prefix)
// commit(k_new, v_new, slot: int64[B], positions: int32[B]): slot in [0, K), positions in [0, C)
// swiglu(gate_up: float32[R, 2n], out: float32[R, n]): the trunk's SwiGLU (trunk_swiglu), GIL released.
// Bad shapes, dtypes-by-shape, ranges and a missing cache raise ValueError naming the argument, before anything is
// written. Forward calls run with the GIL released.
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "errors.h"
#include "panel_linear.h"
#include "py_util.h"
#include "trunk.h"

namespace {

using lenvm::py_util::CArray;
using lenvm::py_util::without_gil;

constexpr const char* kFields[] = {"input_norm", "qkv",       "qkv_bias",     "q_norm", "k_norm",   "o",
                                   "o_bias",     "post_norm", "gate_up",      "gate_up_bias", "down", "down_bias"};
constexpr std::size_t kFieldCount = sizeof(kFields) / sizeof(kFields[0]);

struct Shape2 {
    py::ssize_t rows, cols;  // cols < 0: a 1-D array of `rows`; else a matrix [rows, cols] packed as panels
};

// A weight's memory and storage (a matrix's panels: float32, int16 bfloat16 bits or float16; vectors float32).
lenvm::Panels weight_pointer(const py::handle& value, const std::string& name, Shape2 shape, bool optional,
                             std::vector<py::object>& keep) {
    if (value.is_none()) {
        lenvm::check(optional, name.c_str(), "an array", "None");
        return {nullptr, lenvm::Storage::f32};
    }
    lenvm::check(py::isinstance<py::array>(value), name.c_str(), "a float32 numpy array",
                 py::str(py::type::of(value)).cast<std::string>());
    const auto array = py::reinterpret_borrow<py::array>(value);
    lenvm::Storage storage = lenvm::Storage::f32;
    if (shape.cols >= 0 && array.dtype().is(py::dtype::of<std::int16_t>())) storage = lenvm::Storage::bf16;
    if (shape.cols >= 0 && array.dtype().is(py::dtype("float16"))) storage = lenvm::Storage::f16;
    lenvm::check((storage != lenvm::Storage::f32 || array.dtype().is(py::dtype::of<float>())) &&
                     (array.flags() & py::array::c_style),
                 name.c_str(),
                 shape.cols < 0 ? "a C-contiguous float32 array" : "C-contiguous float32, int16 or float16 panels",
                 py::str(array.dtype()).cast<std::string>());
    const py::ssize_t panels = lenvm::panel_count(shape.rows);
    const bool ok = shape.cols < 0 ? array.ndim() == 1 && array.shape(0) == shape.rows
                                   : array.ndim() == 3 && array.shape(0) == panels && array.shape(1) == shape.cols &&
                                         array.shape(2) == lenvm::kPanelRows;
    const std::string expected = shape.cols < 0 ? "shape (" + std::to_string(shape.rows) + ",)"
                                                : "panels of shape (" + std::to_string(panels) + ", " +
                                                      std::to_string(shape.cols) + ", 8)";
    lenvm::check(ok, name.c_str(), expected, py::str(array.attr("shape")).cast<std::string>());
    keep.push_back(py::reinterpret_borrow<py::object>(value));
    return {array.data(), storage};
}

class PyTrunk {
public:
    PyTrunk(std::int64_t layers, std::int64_t hidden, std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim,
            std::int64_t intermediate, float eps, float scale, const py::list& weights)
        : trunk_(make({layers, hidden, heads, kv_heads, head_dim, intermediate, eps, scale}, weights, weights_keep_)) {}

    void set_cache(const py::list& k, const py::list& v, const CArray<float>& cos, const CArray<float>& sin) {
        const lenvm::TrunkShape& s = trunk_.shape();
        lenvm::check(py::len(k) == static_cast<std::size_t>(s.layers) && py::len(v) == py::len(k), "k/v",
                     "one cache array per layer", py::len(k));
        lenvm::TrunkCache cache{{}, {}, 0, 0, nullptr, nullptr};
        std::vector<py::object> keep;
        for (std::size_t l = 0; l < py::len(k); ++l) {
            for (const auto* list : {&k, &v}) {
                const py::object item = (*list)[l];
                lenvm::check(py::isinstance<CArray<float>>(item), "k/v", "float32 arrays", "another type");
                auto array = item.cast<CArray<float>>();
                lenvm::check(array.ndim() == 4 && array.shape(1) == s.kv_heads && array.shape(3) == s.head_dim &&
                                 array.writeable() && (array.flags() & py::array::c_style),
                             "k/v", "writeable C-contiguous [Bc, Hkv, C, Dh] arrays", array.ndim());
                if (l == 0 && list == &k) cache.batch = array.shape(0), cache.capacity = array.shape(2);
                lenvm::check(array.shape(0) == cache.batch && array.shape(2) == cache.capacity, "k/v",
                             "the same [Bc, C] for every layer", array.shape(2));
                (list == &k ? cache.k : cache.v).push_back(array.mutable_data());
                keep.push_back(item);
            }
        }
        for (const auto* table : {&cos, &sin})
            lenvm::check(table->ndim() == 2 && table->shape(0) >= cache.capacity && table->shape(1) == s.head_dim,
                         "cos/sin", "[C, Dh] tables covering the cache", table->ndim());
        cache.cos = cos.data();
        cache.sin = sin.data();
        keep.push_back(cos);
        keep.push_back(sin);
        trunk_.set_cache(cache);
        cache_keep_ = std::move(keep);
    }

    void clear_cache() {
        trunk_.set_cache(lenvm::TrunkCache{{}, {}, 0, 0, nullptr, nullptr});
        cache_keep_.clear();
    }

    void decode(CArray<float>& x, const CArray<std::int32_t>& positions) {
        const std::int64_t rows = check_rows(x, positions, 1, 0);
        float* xp = x.mutable_data();
        const std::int32_t* pp = positions.data();
        without_gil([&] { trunk_.decode(xp, pp, rows); });
    }

    void lookahead(CArray<float>& x, const CArray<std::int32_t>& positions, CArray<float>& k_new,
                   CArray<float>& v_new) {
        const std::int64_t k_cand = check_candidates(k_new, v_new, positions, true);
        const std::int64_t rows = check_rows(x, positions, k_cand, 1);
        float *xp = x.mutable_data(), *kp = k_new.mutable_data(), *vp = v_new.mutable_data();
        const std::int32_t* pp = positions.data();
        without_gil([&] { trunk_.lookahead(xp, pp, rows, k_cand, kp, vp); });
    }

    void commit(const CArray<float>& k_new, const CArray<float>& v_new, const CArray<std::int64_t>& slot,
                const CArray<std::int32_t>& positions) {
        const std::int64_t k_cand = check_candidates(k_new, v_new, positions, false);
        lenvm::check(positions.ndim() == 1 && positions.shape(0) <= trunk_.cache().batch, "positions",
                     "int32[B], B at most the cache's rows", positions.shape(0));
        check_positions(positions, 0);
        lenvm::check(slot.ndim() == 1 && slot.shape(0) == positions.shape(0), "slot", "int64[B] like positions",
                     slot.ndim() == 1 ? slot.shape(0) : -1);
        for (py::ssize_t b = 0; b < slot.shape(0); ++b)
            lenvm::check(slot.data()[b] >= 0 && slot.data()[b] < k_cand, "slot", "values in [0, K)", slot.data()[b]);
        trunk_.commit(k_new.data(), v_new.data(), slot.data(), positions.data(), positions.shape(0), k_cand);
    }

private:
    static lenvm::Trunk make(const lenvm::TrunkShape& s, const py::list& weights, std::vector<py::object>& keep) {
        lenvm::check(s.layers >= 1 && s.hidden >= 1 && s.intermediate >= 1, "shape",
                     "layers, hidden and intermediate >= 1", s.layers);
        lenvm::check(s.kv_heads >= 1 && s.heads >= s.kv_heads && s.heads % s.kv_heads == 0 && s.head_dim >= 2 &&
                         s.head_dim % 2 == 0,
                     "heads", "a multiple of kv_heads, with an even head_dim", s.heads);
        lenvm::check(py::len(weights) == static_cast<std::size_t>(s.layers), "weights", "one tuple per layer",
                     py::len(weights));
        const py::ssize_t d = s.hidden, dh = s.head_dim, qkv = (s.heads + 2 * s.kv_heads) * dh, i2 = 2 * s.intermediate;
        const Shape2 shapes[kFieldCount] = {{d, -1},  {qkv, d}, {qkv, -1}, {dh, -1},  {dh, -1},
                                            {d, s.heads * dh},   {d, -1},   {d, -1},   {i2, d},
                                            {i2, -1}, {d, s.intermediate},  {d, -1}};
        const bool optional[kFieldCount] = {false, false, true,  true, true,  false,
                                            true,  false, false, true, false, true};
        std::vector<lenvm::TrunkLayer> layers;
        for (std::size_t l = 0; l < py::len(weights); ++l) {
            const py::handle item = weights[l];
            lenvm::check(py::isinstance<py::tuple>(item) && py::len(item) == kFieldCount, "weights",
                         "tuples of 12 arrays (or None)", py::str(py::type::of(item)).cast<std::string>());
            const auto fields = py::reinterpret_borrow<py::tuple>(item);
            lenvm::Panels p[kFieldCount];
            for (std::size_t f = 0; f < kFieldCount; ++f)
                p[f] = weight_pointer(fields[f], "weights[" + std::to_string(l) + "]." + kFields[f], shapes[f],
                                      optional[f], keep);
            lenvm::check((p[3].data == nullptr) == (p[4].data == nullptr), "weights",
                         "q_norm and k_norm both or neither", "one of them");
            const auto vec = [&](std::size_t f) { return static_cast<const float*>(p[f].data); };
            layers.push_back({vec(0), p[1], vec(2), vec(3), vec(4), p[5], vec(6), vec(7), p[8], vec(9), p[10],
                              vec(11)});
        }
        return lenvm::Trunk(s, std::move(layers));
    }

    std::int64_t check_rows(const CArray<float>& x, const CArray<std::int32_t>& positions, std::int64_t per_row,
                            std::int32_t first_position) {
        const lenvm::TrunkShape& s = trunk_.shape();
        lenvm::check(trunk_.has_cache(), "cache", "set_cache() before a forward", "no cache");
        lenvm::check(positions.ndim() == 1 && positions.shape(0) >= 1, "positions", "int32[B], B >= 1",
                     positions.ndim());
        const std::int64_t rows = positions.shape(0);
        lenvm::check(rows <= trunk_.cache().batch, "positions", "at most the cache's rows", rows);
        check_positions(positions, first_position);
        lenvm::check(x.ndim() == 2 && x.shape(0) == rows * per_row && x.shape(1) == s.hidden && x.writeable(), "x",
                     "a writeable float32[B K, D] (K = 1 for decode)", x.ndim() == 2 ? x.shape(0) : -1);
        return rows;
    }

    void check_positions(const CArray<std::int32_t>& positions, std::int32_t first) {
        for (py::ssize_t b = 0; b < positions.shape(0); ++b)
            lenvm::check(positions.data()[b] >= first && positions.data()[b] < trunk_.cache().capacity, "positions",
                         "values in [" + std::to_string(first) + ", C)", positions.data()[b]);
    }

    std::int64_t check_candidates(const CArray<float>& k_new, const CArray<float>& v_new,
                                  const CArray<std::int32_t>& positions, bool writeable) {
        const lenvm::TrunkShape& s = trunk_.shape();
        lenvm::check(trunk_.has_cache(), "cache", "set_cache() before a forward", "no cache");
        const bool ok = k_new.ndim() == 5 && k_new.shape(0) == s.layers && k_new.shape(1) == positions.shape(0) &&
                        k_new.shape(2) == s.kv_heads && k_new.shape(3) >= 1 && k_new.shape(4) == s.head_dim &&
                        (!writeable || k_new.writeable());
        lenvm::check(ok, "k_new", "a float32[L, B, Hkv, K, Dh]", k_new.ndim());
        lenvm::check(v_new.ndim() == 5 && v_new.shape(3) == k_new.shape(3) && v_new.size() == k_new.size() &&
                         (!writeable || v_new.writeable()),
                     "v_new", "an array shaped like k_new", v_new.ndim());
        return k_new.shape(3);
    }

    std::vector<py::object> weights_keep_;  // declared before trunk_: filled while trunk_ is built
    lenvm::Trunk trunk_;
    std::vector<py::object> cache_keep_;
};

void swiglu(const CArray<float>& gate_up, CArray<float>& out) {
    lenvm::check(gate_up.ndim() == 2 && gate_up.shape(1) % 2 == 0, "gate_up", "a 2-D array [R, 2n]",
                 py::str(gate_up.attr("shape")).cast<std::string>());
    const py::ssize_t rows = gate_up.shape(0), n = gate_up.shape(1) / 2;
    lenvm::check(out.ndim() == 2 && out.shape(0) == rows && out.shape(1) == n, "out",
                 "shape (" + std::to_string(rows) + ", " + std::to_string(n) + ")",
                 py::str(out.attr("shape")).cast<std::string>());
    lenvm::check(out.writeable(), "out", "a writeable array", "a read-only array");
    const float* in = gate_up.data();
    float* o = out.mutable_data();
    without_gil([&] { lenvm::trunk_swiglu(in, o, rows, n); });
}

}  // namespace

void bind_trunk(py::module_& m) {
    m.def("swiglu", &swiglu, py::arg("gate_up").noconvert(), py::arg("out").noconvert(),
          "out = silu(gate) * up for gate_up [R, 2n] = [gate | up] (float32), the trunk's own kernel.");
    py::class_<PyTrunk>(m, "Trunk", "Decoder layers of a Llama / Qwen2 / Qwen3 model in fp32 (csrc/trunk.h).")
        .def(py::init<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, float, float,
                      const py::list&>(),
             py::arg("layers"), py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
             py::arg("intermediate"), py::arg("eps"), py::arg("scale"), py::arg("weights"),
             "weights[l] = (input_norm, qkv, qkv_bias, q_norm, k_norm, o, o_bias, post_norm, gate_up, gate_up_bias,\n"
             "down, down_bias), float32 C-contiguous; biases and q_norm / k_norm may be None.")
        .def("set_cache", &PyTrunk::set_cache, py::arg("k"), py::arg("v"), py::arg("cos").noconvert(),
             py::arg("sin").noconvert(), "Per-layer caches [Bc, Hkv, C, Dh] and RoPE tables [C, Dh].")
        .def("clear_cache", &PyTrunk::clear_cache, "Forget the caches (and drop the references to them).")
        .def("decode", &PyTrunk::decode, py::arg("x").noconvert(), py::arg("positions").noconvert(),
             "Every layer for one token per row: x float32[B, D] in place, positions int32[B]. GIL released.")
        .def("lookahead", &PyTrunk::lookahead, py::arg("x").noconvert(), py::arg("positions").noconvert(),
             py::arg("k_new").noconvert(), py::arg("v_new").noconvert(),
             "Every layer for K candidates per row: x float32[B K, D] in place; the candidates' K/V into\n"
             "k_new / v_new float32[L, B, Hkv, K, Dh]; the cache is only read. GIL released.")
        .def("commit", &PyTrunk::commit, py::arg("k_new").noconvert(), py::arg("v_new").noconvert(),
             py::arg("slot").noconvert(), py::arg("positions").noconvert(),
             "Copy candidate slot[b] of row b from k_new / v_new into cache position positions[b].");
}
