// lenvm_rt._core.pack_panels / panel_linear / storage_exact: argument checks, buffer views and GIL release for
// csrc/panel_linear.h.
//
// pack_panels(weight: float32[N, K], out: float32 | int16 | float16 [ceil(N / 8), K, 8]) -> None; int16 panels
//     hold bfloat16 bits (torch.bfloat16 viewed as int16), float16 ones float16 values, and need every weight
//     exact in that storage
// panel_linear(x: float32[M, K], panels: float32 | int16 | float16 [ceil(N / 8), K, 8], n: int,
//              bias: float32[N] | None, out: float32[M, N]) -> None: out = x @ weight.T + bias, GIL released.
// storage_exact(weight: float32 array, storage: "bfloat16" | "float16") -> bool: every value exact in it.
// C-contiguous arrays of those dtypes only (a wrong dtype or layout raises TypeError, nothing is copied); shape,
// range, writeability and overlap errors raise ValueError naming the argument before anything is written.
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "errors.h"
#include "panel_linear.h"
#include "py_util.h"

namespace {

using lenvm::py_util::CArray;
using lenvm::py_util::check_linear_out;
using lenvm::py_util::overlaps;
using lenvm::py_util::shape_of;
using lenvm::py_util::without_gil;

std::string panel_dims(py::ssize_t n, py::ssize_t k) {
    return "shape (" + std::to_string(lenvm::panel_count(n)) + ", " + std::to_string(k) + ", 8)";
}

// The storage an array of panels holds, from its dtype; TypeError for any other array.
lenvm::Storage storage_of(const py::array& panels, const char* name) {
    if (panels.flags() & py::array::c_style) {
        if (panels.dtype().is(py::dtype::of<float>())) return lenvm::Storage::f32;
        if (panels.dtype().is(py::dtype::of<std::int16_t>())) return lenvm::Storage::bf16;
        if (panels.dtype().is(py::dtype("float16"))) return lenvm::Storage::f16;
    }
    throw py::type_error(std::string(name) + ": expected a C-contiguous float32, int16 (bfloat16 bits) or float16 "
                         "array, got " + py::str(panels.dtype()).cast<std::string>());
}

bool exact(const CArray<float>& weight, lenvm::Storage storage) {
    const float* w = weight.data();
    const std::int64_t count = weight.size();
    bool result = true;
    without_gil([&] { result = lenvm::storage_exact(w, count, storage); });
    return result;
}

bool storage_exact(const CArray<float>& weight, const std::string& storage) {
    lenvm::check(storage == "bfloat16" || storage == "float16", "storage", "'bfloat16' or 'float16'", storage);
    return exact(weight, storage == "bfloat16" ? lenvm::Storage::bf16 : lenvm::Storage::f16);
}

void pack_panels(const CArray<float>& weight, py::array out) {
    const lenvm::Storage storage = storage_of(out, "out");
    lenvm::check(weight.ndim() == 2, "weight", "a 2-D array [N, K]", shape_of(weight));
    const py::ssize_t n = weight.shape(0), k = weight.shape(1);
    lenvm::check(out.ndim() == 3 && out.shape(0) == lenvm::panel_count(n) && out.shape(1) == k &&
                     out.shape(2) == lenvm::kPanelRows,
                 "out", panel_dims(n, k), shape_of(out));
    lenvm::check(out.writeable(), "out", "a writeable array", "a read-only array");
    lenvm::check(!overlaps(out, weight), "out", "memory disjoint from weight", "an overlapping array");
    lenvm::check(storage == lenvm::Storage::f32 || exact(weight, storage), "weight",
                 storage == lenvm::Storage::bf16 ? "bfloat16 values for int16 panels"
                                                 : "float16 values for float16 panels",
                 "values that storage would round");
    const float* w = weight.data();
    void* panels = out.mutable_data();
    without_gil([&] { lenvm::pack_panels(w, n, k, storage, panels); });
}

void panel_linear(const CArray<float>& x, const py::array& panels, std::int64_t n,
                  const std::optional<CArray<float>>& bias, CArray<float>& out) {
    const lenvm::Storage storage = storage_of(panels, "panels");
    lenvm::check(x.ndim() == 2, "x", "a 2-D array [M, K]", shape_of(x));
    const py::ssize_t m = x.shape(0), k = x.shape(1);
    lenvm::check(n >= 0, "n", "a row count >= 0", n);
    lenvm::check(panels.ndim() == 3 && panels.shape(0) == lenvm::panel_count(n) && panels.shape(1) == k &&
                     panels.shape(2) == lenvm::kPanelRows,
                 "panels", panel_dims(n, k) + " (N = n, K from x)", shape_of(panels));
    if (bias) lenvm::check(bias->ndim() == 1 && bias->shape(0) == n, "bias", "shape (" + std::to_string(n) + ",)",
                           shape_of(*bias));
    check_linear_out(out, m, n, "shape (" + std::to_string(m) + ", " + std::to_string(n) + ")", x, panels, "panels",
                     bias);
    const float* x_ptr = x.data();
    const lenvm::Panels panel_ptr{panels.data(), storage};
    const float* bias_ptr = bias ? bias->data() : nullptr;
    float* out_ptr = out.mutable_data();
    without_gil([&] { lenvm::panel_linear(x_ptr, panel_ptr, bias_ptr, out_ptr, m, n, k, lenvm::default_pool()); });
}

}  // namespace

void bind_panels(py::module_& m) {
    m.def("pack_panels", &pack_panels, py::arg("weight").noconvert(), py::arg("out").noconvert(),
          "Write weight [N, K] into `out` as panels of 8 rows [ceil(N / 8), K, 8], zero-padded: float32 values,\n"
          "bfloat16 bits for an int16 `out`, float16 values for a float16 one (weights exact in that storage).");
    m.def("panel_linear", &panel_linear, py::arg("x").noconvert(), py::arg("panels").noconvert(), py::arg("n"),
          py::arg("bias").noconvert().none(true), py::arg("out").noconvert(),
          "Write x @ weight.T + bias into `out` for a weight [n, K] packed by pack_panels: x [M, K], bias [n] or\n"
          "None, out [M, n]. out[m, j] is one ordered sum over K (bit-identical for any M and thread count, and\n"
          "for every storage of the same weight).");
    m.def("storage_exact", &storage_exact, py::arg("weight").noconvert(), py::arg("storage"),
          "Whether every value of a float32 array is exactly a value of `storage` ('bfloat16' or 'float16').");
}
