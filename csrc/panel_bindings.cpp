// lenvm_rt._core.pack_panels / panel_linear: argument checks, buffer views and GIL release for csrc/panel_linear.h.
//
// pack_panels(weight: float32[N, K], out: float32[ceil(N / 8), K, 8]) -> None
// panel_linear(x: float32[M, K], panels: float32[ceil(N / 8), K, 8], n: int, bias: float32[N] | None,
//              out: float32[M, N]) -> None: out = x @ weight.T + bias for the packed weight, GIL released.
// C-contiguous float32 arrays only (a wrong dtype or layout raises TypeError, nothing is copied); shape, range,
// writeability and overlap errors raise ValueError naming the argument before anything is written.
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

void pack_panels(const CArray<float>& weight, CArray<float>& out) {
    lenvm::check(weight.ndim() == 2, "weight", "a 2-D array [N, K]", shape_of(weight));
    const py::ssize_t n = weight.shape(0), k = weight.shape(1);
    lenvm::check(out.ndim() == 3 && out.shape(0) == lenvm::panel_count(n) && out.shape(1) == k &&
                     out.shape(2) == lenvm::kPanelRows,
                 "out", panel_dims(n, k), shape_of(out));
    lenvm::check(out.writeable(), "out", "a writeable array", "a read-only array");
    lenvm::check(!overlaps(out.mutable_data(), out.size(), weight.data(), weight.size()), "out",
                 "memory disjoint from weight", "an overlapping array");
    const float* w = weight.data();
    float* panels = out.mutable_data();
    without_gil([&] { lenvm::pack_panels(w, n, k, panels); });
}

void panel_linear(const CArray<float>& x, const CArray<float>& panels, std::int64_t n,
                  const std::optional<CArray<float>>& bias, CArray<float>& out) {
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
    const float* panel_ptr = panels.data();
    const float* bias_ptr = bias ? bias->data() : nullptr;
    float* out_ptr = out.mutable_data();
    without_gil([&] { lenvm::panel_linear(x_ptr, panel_ptr, bias_ptr, out_ptr, m, n, k, lenvm::default_pool()); });
}

}  // namespace

void bind_panels(py::module_& m) {
    m.def("pack_panels", &pack_panels, py::arg("weight").noconvert(), py::arg("out").noconvert(),
          "Write weight [N, K] into `out` as panels of 8 rows [ceil(N / 8), K, 8], zero-padded (float32).");
    m.def("panel_linear", &panel_linear, py::arg("x").noconvert(), py::arg("panels").noconvert(), py::arg("n"),
          py::arg("bias").noconvert().none(true), py::arg("out").noconvert(),
          "Write x @ weight.T + bias into `out` for a weight [n, K] packed by pack_panels: x [M, K], bias [n] or\n"
          "None, out [M, n]. out[m, j] is one ordered sum over K (bit-identical for any M and thread count).");
}
