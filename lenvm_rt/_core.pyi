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
def linear(
    x: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None,
    out: npt.NDArray[np.float32],
) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def linear_kernel() -> str: ...

class GuidanceBatch:
    def __init__(self, capacity: int, eos_ids: list[int]) -> None: ...
    def admit(
        self,
        slot: int,
        rule: int,
        target: int,
        max_new: int,
        gamma: float,
        beta: float,
        seed: int,
        greedy: bool,
    ) -> None: ...
    def retire(self, slot: int) -> None: ...
    def step(
        self,
        rows: npt.NDArray[np.int32],
        cand_ids: npt.NDArray[np.int32],
        cand_logp: npt.NDArray[np.float32],
        cand_z: npt.NDArray[np.float32],
        out_slot: npt.NDArray[np.int32],
        out_token: npt.NDArray[np.int32],
        out_done: npt.NDArray[np.uint8],
    ) -> None: ...
    def capacity(self) -> int: ...
    def active_count(self) -> int: ...
    def is_active(self, slot: int) -> bool: ...
    def generated(self, slot: int) -> int: ...
    def eos_ids(self) -> list[int]: ...
