"""lenvm_rt: a fast runtime for Length Value Models on Hugging Face causal LMs.

Importing this package needs neither a GPU nor Triton; kernels load on first use.

Importing it before torch also sets OMP_WAIT_POLICY=PASSIVE unless the environment already sets it: the
OpenMP runtime that torch loads then lets its idle threads sleep instead of spinning after every torch op,
where they would take the cores from the native thread pool that runs the decoder layers (plain decoding of
the default model on 2 cores, one run: 44.4 -> 35.5 ms per token). The OpenMP runtime reads it once, when
torch is first imported, so a process that imported torch earlier keeps its own setting.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import Generation, LengthTarget, ModelConfig, Sampling  # noqa: E402 (after the OpenMP setting)
from .runtime import Runtime, StreamEvent, load  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Generation", "LengthTarget", "ModelConfig", "Runtime", "Sampling", "StreamEvent", "__version__", "load"]
