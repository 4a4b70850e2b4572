// pybind11 helpers shared by the binding files of `lenvm_rt._core`.
#pragma once

#include <functional>
#include <optional>
#include <string>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "errors.h"

namespace py = pybind11;

namespace lenvm::py_util {

// A C-contiguous numpy array of exactly T (with .noconvert(): no silent copy or cast).
template <class T>
using CArray = py::array_t<T, py::array::c_style>;

// "shape [d0, d1, ...]" of an array, for error messages.
inline std::string shape_of(const py::array& a) {
    std::string text = "shape [";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) text += (d > 0 ? ", " : "") + std::to_string(a.shape(d));
    return text + "]";
}

// True when the arrays' memory ranges share a byte (empty arrays share nothing).
inline bool overlaps(const py::array& a, const py::array& b) {
    const auto* a_begin = static_cast<const char*>(a.data());
    const auto* b_begin = static_cast<const char*>(b.data());
    const std::less<const char*> before;
    return a.nbytes() > 0 && b.nbytes() > 0 && before(a_begin, b_begin + b.nbytes()) &&
           before(b_begin, a_begin + a.nbytes());
}

// The output checks of a linear layer's binding: out is [m, n] (`expected_shape` words it for the message),
// writeable, and shares no memory with x, the weights (named `weights_name` in the message) or the bias.
inline void check_linear_out(const CArray<float>& out, py::ssize_t m, py::ssize_t n, const std::string& expected_shape,
                             const CArray<float>& x, const py::array& weights, const char* weights_name,
                             const std::optional<CArray<float>>& bias) {
    lenvm::check(out.ndim() == 2 && out.shape(0) == m && out.shape(1) == n, "out", expected_shape, shape_of(out));
    lenvm::check(out.writeable(), "out", "a writeable array", "a read-only array");
    const bool shared = overlaps(out, x) || overlaps(out, weights) || (bias && overlaps(out, *bias));
    lenvm::check(!shared, "out", std::string("memory disjoint from x, ") + weights_name + " and bias",
                 "an overlapping array");
}

// Runs `fn` with the GIL released. The GIL is taken back by a plain call, not by a destructor such as
// py::gil_scoped_release's: during interpreter finalization CPython ends a daemon thread that asks for the
// GIL with pthread_exit, whose forced unwind through a (noexcept) destructor would call std::terminate.
template <class Fn>
void without_gil(Fn&& fn) {
    PyThreadState* const state = PyEval_SaveThread();
    try {
        fn();
    } catch (...) {
        PyEval_RestoreThread(state);
        throw;
    }
    PyEval_RestoreThread(state);
}

}  // namespace lenvm::py_util

// Registers lenvm_rt._core.Trunk (csrc/trunk_bindings.cpp).
void bind_trunk(py::module_& m);
// Registers lenvm_rt._core.pack_panels, panel_linear and storage_exact (csrc/panel_bindings.cpp).
void bind_panels(py::module_& m);
