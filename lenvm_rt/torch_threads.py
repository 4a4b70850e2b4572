"""One torch thread for the small torch ops of a CPU decode step.

    with one_torch_thread(logits.device):   # CPU: the calling thread's torch ops run on one thread inside
        ...                                 # other devices: no change

A decode step's host-side torch ops (sampling, the candidate set) work on [B, V] tensors, big enough for torch to
run them as parallel regions on its OpenMP worker threads. When torch was imported before lenvm_rt (so the
OMP_WAIT_POLICY=PASSIVE that `import lenvm_rt` sets came too late for its OpenMP runtime), those workers spin for
~9 ms after each region, on the cores the native kernels of the next forward need: measured on the default model
with 2 threads, a 15-candidate lookahead after an At Least step's candidate set took 1.18x its time after the same
ops on one thread (benchmarks/bench_step_threads.py; with PASSIVE in effect, no difference beyond the noise). On
one thread the same ops give the same bits, whatever the import order. torch's thread count is the calling
thread's own (an OpenMP setting per thread), restored on the way out; torch also keeps it as the default of
threads that start using torch while a step is inside.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_torch_thread(device: torch.device) -> Iterator[None]:
    """Run the enclosed torch ops of a CPU decode step on one thread (module docstring); other devices: no change."""
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
