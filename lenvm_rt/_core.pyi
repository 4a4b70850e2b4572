# Hand-written stub for the pybind11 module lenvm_rt._core (csrc/bindings.cpp); tests/test_core_stub.py
# checks that names and parameter names match the built module.
import numpy as np
import numpy.typing as npt

def philox_uniform(
    seeds: npt.NDArray[np.uint64],
    offsets: npt.NDArray[np.uint32],
    stream: int,
    out: npt.NDArray[np.float32],
) -> None: ...
