"""lenvm_rt: a fast runtime for Length Value Models on Hugging Face causal LMs.

Importing this package needs neither a GPU nor Triton; kernels load on first use.
"""
from .config import Generation, LengthTarget, ModelConfig, Sampling
from .runtime import Runtime, StreamEvent, load

__version__ = "0.1.0"

__all__ = ["Generation", "LengthTarget", "ModelConfig", "Runtime", "Sampling", "StreamEvent", "__version__", "load"]
