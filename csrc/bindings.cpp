// pybind11 module `lenvm_rt._core`: argument checks, buffer views, GIL release and docstrings only.
//
// philox_uniform(seeds: uint64[B], offsets: uint32[B], stream: int, out: float32[B]) -> None
//   Arrays are C-contiguous 1-D numpy arrays of exactly these dtypes (no conversion: a wrong dtype or layout
//   raises TypeError instead of copying). Shape, writeability and range errors raise ValueError naming the
//   argument. The loop runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "errors.h"
#include "rng.h"

namespace py = pybind11;

namespace {

template <class T>
using CArray = py::array_t<T, py::array::c_style>;

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
    py::gil_scoped_release release;
    lenvm::rng::uniform_batch(seed_ptr, offset_ptr, static_cast<std::size_t>(n),
                              static_cast<std::uint32_t>(stream), out_ptr);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "Native core of lenvm_rt (C++17, numpy arrays only). Use lenvm_rt._native, not this module.";
    m.def("philox_uniform", &philox_uniform, py::arg("seeds").noconvert(), py::arg("offsets").noconvert(),
          py::arg("stream"), py::arg("out").noconvert(),
          "Write Philox4x32-10 uniforms in [0, 1) into `out` (float32[B]), bit-identical to Triton's tl.rand.\n\n"
          "Element i uses key = seeds[i] (uint64: low word, high word) and counter = (offsets[i], stream, 0, 0);\n"
          "seeds: uint64[B], offsets: uint32[B], stream in [0, 2**32), out: float32[B], all C-contiguous.");
}
