"""`lenvm_rt.cpu_ops.linear` (native fp32 GEMV / skinny GEMM) against torch, plus its guarantees.

Accuracy rule: with ref = F.linear in float64 on the same fp32 inputs,
    max|ours - ref| <= 2 * max|torch_fp32 - ref| + 2 * eps32 * max(|x| @ |w|.T + |b|)
i.e. at most twice torch's own fp32 error plus a couple of ulps of the magnitude scale of the sums.

Determinism rule (bit-exact, torch.equal): out[m, n] depends only on x[m], w[n], b[n] and K, so a row gives the
same bits alone or inside any batch, and with any thread count.
"""

from __future__ import annotations

import itertools
import mmap
import os
import textwrap
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from linear_cases import make, restore_threads  # noqa: F401 (an autouse fixture)
from subproc import run_python

from lenvm_rt import _core, _native, cpu_ops

EPS32 = float(torch.finfo(torch.float32).eps)


def assert_close_to_reference(out, x, w, b) -> None:
    b64 = None if b is None else b.double()
    ref = F.linear(x.double(), w.double(), b64)
    torch_err = (F.linear(x, w, b).double() - ref).abs().max().item() if ref.numel() else 0.0
    ours_err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b64.abs())
    atol = 2 * EPS32 * (scale.max().item() if scale.numel() else 0.0)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ours_err <= 2 * torch_err + atol, (ours_err, torch_err, atol)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m", [1, 2, 15, 16, 33])
@pytest.mark.parametrize("n", [1, 3, 960, 1001])
@pytest.mark.parametrize("k", [1, 7, 64, 576, 1000])
def test_matches_float64_reference(k: int, n: int, m: int, bias: bool) -> None:
    x, w, b = make(m, n, k, seed=k * 7 + n * 3 + m, bias=bias)
    assert_close_to_reference(cpu_ops.linear(x, w, b), x, w, b)


@pytest.mark.parametrize(("m", "n", "k"), [(0, 5, 8), (3, 0, 8), (4, 5, 0), (300, 77, 129)])
def test_edge_sizes_and_large_m(m: int, n: int, k: int) -> None:
    x, w, b = make(m, n, k)
    assert_close_to_reference(cpu_ops.linear(x, w, b), x, w, b)
    assert_close_to_reference(cpu_ops.linear(x, w), x, w, None)


def test_leading_dimensions_and_vector_input() -> None:
    x, w, b = make(6, 50, 33)
    out = cpu_ops.linear(x.view(2, 3, 33), w, b)
    assert out.shape == (2, 3, 50)
    assert torch.equal(out.view(6, 50), cpu_ops.linear(x, w, b))
    assert torch.equal(cpu_ops.linear(x[4], w, b), cpu_ops.linear(x, w, b)[4])
    for empty in [(0, 3, 33), (2, 0, 33)]:
        assert cpu_ops.linear(torch.ones(empty), w, b).shape == (*empty[:-1], 50)


@pytest.mark.parametrize("k", [7, 576, 1000])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_rows_are_bit_identical_alone_and_in_any_batch(k: int, bias: bool) -> None:
    x, w, b = make(16, 1001, k, seed=k, bias=bias)
    batched = cpu_ops.linear(x, w, b)
    for m in range(16):
        assert torch.equal(batched[m], cpu_ops.linear(x[m : m + 1], w, b)[0]), m
    for start, stop in [(0, 5), (3, 16), (7, 9), (15, 16)]:
        assert torch.equal(batched[start:stop], cpu_ops.linear(x[start:stop].clone(), w, b))
    doubled = cpu_ops.linear(torch.cat([x, x, x[:1]]), w, b)
    assert torch.equal(doubled[:16], batched) and torch.equal(doubled[16:32], batched)


@pytest.mark.parametrize("m", [1, 2, 16, 40])
def test_bit_identical_for_any_thread_count(m: int) -> None:
    x, w, b = make(m, 3072, 576, seed=m)
    results = []
    for threads in (1, 2, 3):
        cpu_ops.set_num_threads(threads)
        assert cpu_ops.get_num_threads() == threads
        results.append(cpu_ops.linear(x, w, b))
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert_close_to_reference(results[0], x, w, b)


def test_inference_mode_and_result_is_a_fresh_writeable_tensor() -> None:
    x, w, b = make(2, 64, 96)
    with torch.inference_mode():
        xi, wi, bi = x.clone(), w.clone(), b.clone()
        out = cpu_ops.linear(xi, wi, bi)
        assert torch.equal(out, cpu_ops.linear(x, w, b))
        out.add_(1.0)
    assert torch.equal(xi, x) and torch.equal(wi, w) and torch.equal(bi, b)


def test_read_only_memory_mapped_weight(tmp_path) -> None:
    x, w, b = make(3, 960, 576)
    path = tmp_path / "weight.bin"
    path.write_bytes(w.numpy().tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns that the buffer is not writable
            mapped_w = torch.frombuffer(mapped, dtype=torch.float32).view(960, 576)
        out = cpu_ops.linear(x, mapped_w, b)
        del mapped_w
    assert torch.equal(out, cpu_ops.linear(x, w, b))
    assert_close_to_reference(out, x, w, b)


def test_parameters_that_require_grad() -> None:
    x, w, b = make(2, 8, 16)
    weight = torch.nn.Parameter(w.clone())
    with pytest.raises(ValueError, match=r"^weight: .*require grad"):
        cpu_ops.linear(x, weight, b)
    with torch.no_grad():
        assert torch.equal(cpu_ops.linear(x, weight, b), cpu_ops.linear(x, w, b))


def _torch_bad_inputs():
    x, w, b = make(2, 8, 16)
    return [
        ("x", "float32", (x.double(), w, b)),
        ("weight", "float32", (x, w.half(), b)),
        ("bias", "float32", (x, w, b.double())),
        ("weight", r"shape \[N, 16\]", (x, w[:, :15].contiguous(), b)),
        ("bias", r"shape \[8\]", (x, w, b[:7].contiguous())),
        ("x", "contiguous", (torch.randn(16, 2).t(), w, b)),
        ("weight", "contiguous", (x, torch.randn(16, 8).t(), b)),
        ("bias", "contiguous", (x, w, torch.randn(16)[::2])),
        ("x", "0-D", (torch.tensor(1.0), w, b)),
        ("weight", "2-D", (x, torch.randn(16), b)),
        ("bias", "1-D", (x, w, b.view(2, 4))),
        ("x", "torch.Tensor", (x.numpy(), w, b)),
        ("weight", "torch.Tensor", (x, [[1.0]], b)),
        ("x", "CPU tensor", (x.to("meta"), w, b)),
    ]


BAD_TENSOR_INPUTS = _torch_bad_inputs()


@pytest.mark.parametrize(
    ("name", "pattern", "args"), BAD_TENSOR_INPUTS, ids=[f"{n}-{p}" for n, p, _ in BAD_TENSOR_INPUTS]
)
def test_bad_tensor_input_names_the_argument(name: str, pattern: str, args) -> None:
    with pytest.raises(ValueError, match=rf"^{name}: .*{pattern}"):
        cpu_ops.linear(*args)
    x, w, b = make(2, 8, 16)
    assert_close_to_reference(cpu_ops.linear(x, w, b), x, w, b)


def test_bad_array_input_to_native_names_the_argument() -> None:
    x, w, b = (t.numpy() for t in make(2, 8, 16))
    out = np.empty((2, 8), np.float32)
    cases = [
        ("x", (x.astype(np.float64), w, b, out)),
        ("weight", (x, np.asfortranarray(np.ones((8, 16), np.float32)), b, out)),
        ("bias", (x, w, b[:, None], out)),
        ("out", (x, w, b, np.empty((2, 7), np.float32))),
        ("out", (x, w, b, np.empty((2, 8), np.float64))),
        ("out", (x, w, None, np.empty((3, 8), np.float32))),
        ("weight", (x, np.ones((8, 15), np.float32), b, out)),
        ("x", (x[0], w, b, np.empty((8,), np.float32))),
    ]
    for name, args in cases:
        with pytest.raises(ValueError, match=rf"^{name}: "):
            _native.linear(*args)
    read_only = np.empty((2, 8), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out: expected a writeable"):
        _native.linear(x, w, b, read_only)
    storage = np.zeros(2 * 16 + 2 * 8, np.float32)
    aliased_x = storage[:32].reshape(2, 16)
    with pytest.raises(ValueError, match=r"^out: expected memory disjoint"):
        _native.linear(aliased_x, w, b, storage[16:32].reshape(2, 8))
    assert _native.linear(x, w, b, out) is out
    np.testing.assert_allclose(out, x @ w.T + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 1025, 2**40, 1.5, True, "2"])
def test_bad_thread_counts(bad) -> None:
    before = cpu_ops.get_num_threads()
    with pytest.raises(ValueError, match=r"^n: "):
        cpu_ops.set_num_threads(bad)
    if isinstance(bad, int) and not isinstance(bad, bool) and abs(bad) < 2**31:
        with pytest.raises(ValueError, match=r"^num_threads: expected an integer in \[1, 1024\]"):
            _core.set_num_threads(bad)
    assert cpu_ops.get_num_threads() == before


def test_concurrent_calls_from_python_threads() -> None:
    cases = [make(m, 1001, 576, seed=m) for m in (1, 2, 5, 16)]
    cpu_ops.set_num_threads(2)
    expected = [cpu_ops.linear(*case) for case in cases]
    failures: list[str] = []
    start = threading.Barrier(5)

    def worker(index: int) -> None:
        start.wait()
        for round_ in range(40):
            case = (index + round_) % len(cases)
            if not torch.equal(cpu_ops.linear(*cases[case]), expected[case]):
                failures.append(f"thread {index} round {round_} case {case}")

    def resizer() -> None:
        start.wait()
        for threads in itertools.islice(itertools.cycle([1, 3, 2]), 30):
            cpu_ops.set_num_threads(threads)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)] + [threading.Thread(target=resizer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, failures


def _run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = run_python(textwrap.dedent(code), timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout


CHECK_KERNEL = """
    import torch, torch.nn.functional as F
    from lenvm_rt import _native, cpu_ops
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(16, 1000, generator=g), torch.randn(1001, 1000, generator=g) * 0.03, torch.randn(1001)
    ref = F.linear(x.double(), w.double(), b.double())
    results = []
    for threads in (1, 2, 3):
        cpu_ops.set_num_threads(threads)
        results.append(cpu_ops.linear(x, w, b))
    assert all(torch.equal(results[0], r) for r in results)
    assert all(torch.equal(results[0][m], cpu_ops.linear(x[m], w, b)) for m in range(16))
    torch_err = (F.linear(x, w, b).double() - ref).abs().max().item()
    assert (results[0].double() - ref).abs().max().item() <= 2 * torch_err + 1e-5
    print(_native.linear_kernel(), _native.get_num_threads())
"""


def test_scalar_kernel_in_a_subprocess() -> None:
    assert _run_python(CHECK_KERNEL, {"LENVM_RT_LINEAR_KERNEL": "scalar"}).split() == ["scalar", "3"]
    assert _run_python(CHECK_KERNEL).split()[0] == _native.linear_kernel()


def test_environment_settings_in_a_subprocess() -> None:
    code = """
        import numpy as np
        from lenvm_rt import _native
        print(_native.get_num_threads())
        try:
            _native.linear(np.ones((1, 1), np.float32), np.ones((1, 1), np.float32), None, np.empty((1, 1), np.float32))
        except ValueError as error:
            print(str(error).split(":")[0])
    """
    assert _run_python(code, {"LENVM_RT_NUM_THREADS": "3"}).split() == ["3"]
    assert _run_python(code, {"LENVM_RT_NUM_THREADS": "3", "LENVM_RT_LINEAR_KERNEL": "avx9"}).split() == [
        "3",
        "LENVM_RT_LINEAR_KERNEL",
    ]
    with pytest.raises(AssertionError, match="LENVM_RT_NUM_THREADS: expected an integer"):
        _run_python(code, {"LENVM_RT_NUM_THREADS": "many"})


def test_interpreter_exit_and_fork_do_not_hang() -> None:
    # The daemon thread calls the core with numpy arrays only: torch ops in a daemon thread can abort the
    # process at exit by themselves (pytorch/pytorch#38228), which is not what this test is about.
    code = """
        import os, sys, threading
        import numpy as np
        import torch
        from lenvm_rt import _native, cpu_ops
        x, w = torch.randn(4, 576), torch.randn(3072, 576)
        expected = cpu_ops.linear(x, w)
        x_array, w_array, out_array = x.numpy(), w.numpy(), np.empty((4, 3072), np.float32)

        def spin():
            while True:
                _native.linear(x_array, w_array, None, out_array)

        threading.Thread(target=spin, daemon=True).start()
        pid = os.fork()
        if pid == 0:
            cpu_ops.set_num_threads(3)
            ok = torch.equal(cpu_ops.linear(x, w), expected)
            cpu_ops.set_num_threads(2)
            ok = ok and torch.equal(cpu_ops.linear(x, w), expected)
            sys.exit(0 if ok else 3)  # normal exit: runs the pool's exit-time shutdown in the child
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert torch.equal(cpu_ops.linear(x, w), expected)
        print("done")
    """
    assert _run_python(code, timeout=120).strip() == "done"
