"""Philox4x32-10 uniforms: C++ core (`lenvm_rt._native` / `_core`) vs a plain-Python reference and the
Triton kernel (`lenvm_rt.kernels.philox_uniform`, interpreter on CPU).

Reference contract: key = (seed & 0xffffffff, seed >> 32), counter = (offset, stream, 0, 0), uniform from
output word 0 folded like Triton's uint_to_uniform_float and rounded to float32.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from subproc import run_python

from lenvm_rt import _core, _native, kernels

MASK32 = 0xFFFFFFFF
UNIFORM_SCALE = 4.6566127342e-10


def philox4x32_10(counter: tuple[int, ...], key: tuple[int, int]) -> tuple[int, int, int, int]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        prod_a, prod_b = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (prod_b >> 32) ^ c1 ^ k0, prod_b & MASK32, (prod_a >> 32) ^ c3 ^ k1, prod_a & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def to_float32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bits_to_uniform(bits: int) -> float:
    folded = bits if bits < 2**31 else MASK32 - bits  # int32 x < 0 -> -x - 1
    # float32(folded) and float32(scale) have 24-bit mantissas: their double product is exact, so a
    # single rounding to float32 reproduces the float32 multiply.
    return to_float32(to_float32(float(folded)) * to_float32(UNIFORM_SCALE))


def reference_uniform(seed: int, offset: int, stream: int) -> float:
    return bits_to_uniform(philox4x32_10((offset, stream, 0, 0), (seed & MASK32, seed >> 32))[0])


def core_uniforms(seeds: list[int], offsets: list[int], stream: int) -> np.ndarray:
    seeds_np, offsets_np = np.array(seeds, dtype=np.uint64), np.array(offsets, dtype=np.uint32)
    return _native.philox_uniform(seeds_np, offsets_np, stream)


# Random123 known-answer vectors (kat_vectors, philox4x32 10): counter, key -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_reference_matches_known_answers(counter, key, expected) -> None:
    assert philox4x32_10(counter, key) == expected


def test_core_matches_known_answer_zero_key_and_counter() -> None:
    out = core_uniforms([0], [0], 0)
    assert out.tolist() == [bits_to_uniform(0x6627E8D5)]


batches = st.integers(1, 16).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n),
        st.lists(st.integers(0, MASK32), min_size=n, max_size=n),
    )
)


@settings(max_examples=200, deadline=None)
@given(batch=batches, stream=st.integers(0, MASK32))
@example(batch=([2**32, 2**64 - 1, 2**32 + 7], [MASK32, MASK32 - 1, 2**31]), stream=0)
@example(batch=([0, 1, 2**63], [0, 2**31 - 1, MASK32]), stream=MASK32)
def test_core_matches_reference(batch: tuple[list[int], list[int]], stream: int) -> None:
    seeds, offsets = batch
    expected = [reference_uniform(s, o, stream) for s, o in zip(seeds, offsets, strict=True)]
    assert core_uniforms(seeds, offsets, stream).tolist() == expected


@pytest.mark.parametrize("bits", [0, 1, 2**31 - 1, 2**31, 2**31 + 1, MASK32])
def test_conversion_extremes_stay_in_unit_interval(bits: int) -> None:
    assert 0.0 <= bits_to_uniform(bits) <= 1.0 - 2.0**-24  # largest float32 below 1


def test_conversion_maximum_is_largest_float32_below_one() -> None:
    assert bits_to_uniform(2**31 - 1) == bits_to_uniform(2**31) == 1.0 - 2.0**-24


def test_core_uniforms_lie_in_unit_interval() -> None:
    n = 1 << 16
    seeds = np.full(n, 2**40 + 3, dtype=np.uint64)
    out = _native.philox_uniform(seeds, np.arange(n, dtype=np.uint32), stream=5)
    assert out.dtype == np.float32 and out.shape == (n,)
    assert out.min() >= 0.0 and out.max() < 1.0
    assert abs(float(out.mean()) - 0.5) < 0.01


def test_core_writes_into_given_out() -> None:
    out = np.full(3, -1.0, dtype=np.float32)
    result = _native.philox_uniform(np.arange(3, dtype=np.uint64), np.zeros(3, dtype=np.uint32), 0, out=out)
    assert result is out
    assert out.tolist() == [reference_uniform(s, 0, 0) for s in range(3)]


@pytest.mark.interpret
@pytest.mark.parametrize("stream", [0, 1, 7, 2**31, MASK32])
def test_kernel_matches_core(kernel_device: str, stream: int) -> None:
    rng = np.random.default_rng(stream)
    n = 1500  # spans two programs, the second one masked
    seeds = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    seeds[:3] = [0, 2**32, 2**64 - 1]
    offsets = rng.integers(0, 2**32, size=n, dtype=np.uint32)
    offsets[:3] = [MASK32, MASK32 - 1, 0]
    expected = _native.philox_uniform(seeds, offsets, stream)

    seeds_t = torch.from_numpy(seeds.view(np.int64)).to(kernel_device)
    offsets_t = torch.from_numpy(offsets.view(np.int32)).to(kernel_device)
    got = kernels.philox_uniform(seeds_t, offsets_t, stream, backend="triton")
    assert got.dtype == torch.float32 and got.device.type == kernel_device
    np.testing.assert_array_equal(got.cpu().numpy().view(np.uint32), expected.view(np.uint32))

    got_unsigned = kernels.philox_uniform(seeds_t.view(torch.uint64), offsets_t, stream)
    assert torch.equal(got_unsigned, got)


GOOD = {
    "seeds": np.arange(4, dtype=np.uint64),
    "offsets": np.arange(4, dtype=np.uint32),
    "stream": 0,
    "out": np.zeros(4, dtype=np.float32),
}
READ_ONLY_OUT = np.zeros(4, dtype=np.float32)
READ_ONLY_OUT.flags.writeable = False


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("offsets", np.arange(4, dtype=np.int64)),
        ("seeds", np.arange(4, dtype=np.int64)),
        ("seeds", np.arange(8, dtype=np.uint64)[::2]),
        ("offsets", np.arange(3, dtype=np.uint32)),
        ("offsets", np.arange(8, dtype=np.uint32).reshape(2, 4)),
        ("seeds", [0, 1, 2, 3]),
        ("stream", -1),
        ("stream", 2**32),
        ("out", np.zeros(4, dtype=np.float64)),
        ("out", np.zeros(5, dtype=np.float32)),
        ("out", READ_ONLY_OUT),
    ],
)
def test_native_bad_input_raises_value_error_naming_argument(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        _native.philox_uniform(**{**GOOD, name: bad})
    assert _native.philox_uniform(GOOD["seeds"], GOOD["offsets"]).tolist() == [
        reference_uniform(i, i, 0) for i in range(4)
    ]


def test_core_rejects_wrong_dtype_without_copying() -> None:
    with pytest.raises(TypeError, match="incompatible function arguments"):
        _core.philox_uniform(GOOD["seeds"], np.arange(4, dtype=np.int64), 0, GOOD["out"])
    with pytest.raises(TypeError, match="incompatible function arguments"):
        _core.philox_uniform(np.arange(8, dtype=np.uint64)[::2], GOOD["offsets"], 0, GOOD["out"])


def test_kernel_bad_input_raises_value_error_naming_argument() -> None:
    seeds, offsets = torch.arange(4), torch.arange(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="^offsets: expected"):
        kernels.philox_uniform(seeds, offsets.long())
    with pytest.raises(ValueError, match="^seeds: expected"):
        kernels.philox_uniform(torch.arange(8)[::2], offsets)
    with pytest.raises(ValueError, match="^offsets: expected"):
        kernels.philox_uniform(seeds, offsets[:3])
    with pytest.raises(ValueError, match="^stream: expected"):
        kernels.philox_uniform(seeds, offsets, -1)
    with pytest.raises(ValueError, match="^backend: expected"):
        kernels.philox_uniform(seeds, offsets, backend="cuda")


def test_kernels_import_without_triton() -> None:
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lenvm_rt import kernels\n"
        "assert not kernels.HAS_TRITON\n"
        "try:\n"
        "    kernels.philox_uniform(torch.arange(2), torch.arange(2, dtype=torch.int32))\n"
        "except RuntimeError as e:\n"
        "    assert 'HAS_TRITON=False' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no RuntimeError')\n"
    )
    result = run_python(script, timeout=300)
    assert result.returncode == 0, result.stderr
