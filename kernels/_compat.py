"""Optional Triton import for `lenvm_rt.kernels`.

Contract: `HAS_TRITON` is True when `triton` imports. Otherwise `triton` and `tl` are placeholders that let
modules defining `@triton.jit` kernels (with `tl.constexpr` annotations) import; launching such a kernel
raises RuntimeError. Nothing here touches a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _MissingKernel:
        """A `@triton.jit` function defined without Triton: any launch or call raises."""

        def __init__(self, fn: Callable[..., Any]) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Callable[..., Any]:
            return self

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"kernel {self.fn.__name__!r} needs Triton, which is not installed")

    class _MissingTriton:
        """Placeholder for `triton` and `triton.language`: `jit` wraps, every other attribute is inert."""

        constexpr = Any

        @staticmethod
        def jit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        def __getattr__(self, name: str) -> Any:
            return self

    triton = _MissingTriton()
    tl = _MissingTriton()

__all__ = ["HAS_TRITON", "tl", "triton"]
