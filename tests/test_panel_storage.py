"""16-bit panel storage (csrc/panel_linear.h, `cpu_ops.pack_panels(storage=...)`): a weight whose every value is a
bfloat16 (or float16) value, as a checkpoint stored in that dtype and loaded as float32 is, is kept in half the
bytes, and every product over it has the bits of the float32 panels of the same weight: the kernels widen each
16-bit value back to the float32 it stands for before the same multiply-add sequence."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from linear_cases import make, restore_threads, sequential_sums  # noqa: F401 (an autouse fixture)
from subproc import run_python

from lenvm_rt import _native, cpu_ops
from lenvm_rt.model import CausalLM, panel_packer
from lenvm_rt.weights import load_weights, read_config

HALVES = [torch.bfloat16, torch.float16]


def half_case(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """x, a weight whose values are exactly `dtype` values (float16 subnormals and zeros included), a bias."""
    x, w, b = make(m, n, k, seed=seed)
    if dtype == torch.float16 and w.numel() >= 4:
        w.view(-1)[:4] = torch.tensor([3e-7, -6e-8, 0.0, -0.0])  # subnormal and signed zero weights
    return x, w.to(dtype).float(), b


@pytest.mark.parametrize("dtype", HALVES, ids=["bf16", "f16"])
@pytest.mark.parametrize(("m", "n", "k"), [
    (1, 1, 1), (1, 9, 3), (1, 257, 40),  # one row: tiles of 1-4 panels, padded lanes
    (3, 24, 8), (5, 33, 9), (15, 61, 30), (70, 50, 7),  # row groups
    (9, 530, 24), (15, 1000, 40), (64, 203, 20), (65, 203, 20),  # prefetching tasks; 17 groups: no prefetch
])
def test_half_panels_give_the_float32_panels_bits(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    x, w, b = half_case(m, n, k, dtype, seed=m + n)
    half, full = cpu_ops.pack_panels(w, storage=str(dtype).removeprefix("torch.")), cpu_ops.pack_panels(w, "float32")
    assert half.storage == dtype and full.storage == torch.float32
    out = cpu_ops.panel_linear(x, half, b)
    assert torch.equal(out, cpu_ops.panel_linear(x, full, b))
    np.testing.assert_array_equal(out.numpy(), sequential_sums(x, w, b, _native.linear_kernel() == "avx2_fma"))


@pytest.mark.parametrize("dtype", HALVES, ids=["bf16", "f16"])
def test_half_layout_rows_and_bytes(dtype: torch.dtype) -> None:
    _, w, _ = half_case(1, 19, 5, dtype)
    packed = cpu_ops.pack_panels(w, storage=str(dtype).removeprefix("torch."))
    assert packed.panels.shape == (3, 5, 8) and packed.dtype == torch.float32 and packed.element_size() == 2
    stored = w.to(dtype)
    for p in range(3):
        for lane in range(8):
            row = 8 * p + lane
            expected = stored[row] if row < 19 else torch.zeros(5, dtype=dtype)
            assert torch.equal(packed.panels[p, :, lane], expected), (p, lane)
    assert torch.equal(packed.unpacked(), w) and packed.unpacked().dtype == torch.float32
    ids = torch.tensor([[0, 18], [7, 8]])
    assert torch.equal(packed.rows_at(ids), w[ids])


def test_auto_storage_and_exactness() -> None:
    _, w, _ = make(4, 11, 6, seed=2)
    assert cpu_ops.pack_panels(w).storage == torch.float32  # full float32 values: auto keeps them
    assert cpu_ops.pack_panels(w.bfloat16().float()).storage == torch.bfloat16
    assert cpu_ops.pack_panels(w.half().float()).storage == torch.float16
    assert cpu_ops.pack_panels(torch.zeros(3, 2)).storage == torch.bfloat16  # exact in both: bfloat16 first
    edge = torch.tensor([[65504.0, -65504.0, 2.0 ** -24, 2.0 ** -14, 1.0 + 2.0 ** -10, float("inf")]])
    assert _native.storage_exact(edge.numpy(), "float16")
    for beyond in (65520.0, 2.0 ** -25, 1.0 + 2.0 ** -11, 3 * 2.0 ** -26, 1e-30):  # each rounds in float16
        assert not _native.storage_exact(torch.tensor([beyond]).numpy(), "float16"), beyond
    assert not _native.storage_exact(torch.tensor([1.0 + 2.0 ** -8]).numpy(), "bfloat16")


def test_bad_input_is_named_and_the_kernel_stays_usable() -> None:
    x, w, b = make(4, 11, 6, seed=2)
    with pytest.raises(ValueError, match="weight: expected bfloat16 values for int16 panels"):
        cpu_ops.pack_panels(w, storage="bfloat16")
    with pytest.raises(ValueError, match="weight: expected float16 values for float16 panels"):
        cpu_ops.pack_panels(w, storage="float16")
    with pytest.raises(ValueError, match="storage: expected one of auto, float32, bfloat16, float16"):
        cpu_ops.pack_panels(w, storage="int8")
    with pytest.raises(ValueError, match="storage: expected 'bfloat16' or 'float16'"):
        _native.storage_exact(w.numpy(), "float32")
    half = cpu_ops.pack_panels(w.bfloat16().float())
    before = cpu_ops.panel_linear(x, half, b)
    out = np.empty((4, 11), np.float32)
    for panels in (half.native().astype(np.float64), half.native().view(np.uint16)):
        with pytest.raises(TypeError, match="panels: expected a C-contiguous float32, int16"):
            _native.panel_linear(x.numpy(), panels, 11, b.numpy(), out)
    with pytest.raises(TypeError, match="out: expected a C-contiguous float32, int16"):
        _native.pack_panels(w.numpy(), np.empty((2, 6, 8), np.uint16))
    with pytest.raises(ValueError, match=r"panels: expected shape \(2, 5, 8\)"):
        _native.panel_linear(x[:, :5].contiguous().numpy(), half.native(), 11, None, out)
    assert torch.equal(cpu_ops.panel_linear(x, half, b), before)


PORTABLE_CHECK = """
    import numpy as np, torch
    from lenvm_rt import _native, cpu_ops
    g = torch.Generator().manual_seed(5)
    x, b = torch.randn(9, 37, generator=g), torch.randn(21, generator=g)
    w = torch.randn(21, 37, generator=g)
    w[0, :3] = torch.tensor([3e-7, -6e-8, -0.0])
    full = [cpu_ops.pack_panels(v, "float32") for v in (w.bfloat16().float(), w.half().float())]
    half = [cpu_ops.pack_panels(v) for v in (w.bfloat16().float(), w.half().float())]
    same = [torch.equal(cpu_ops.panel_linear(x, h, b), cpu_ops.panel_linear(x, f, b)) for h, f in zip(half, full)]
    print(_native.linear_kernel(), *[h.storage for h in half], *same)
"""


def test_portable_kernel_widens_alike() -> None:
    result = run_python(textwrap.dedent(PORTABLE_CHECK), timeout=120,
                        env={**os.environ, "LENVM_RT_LINEAR_KERNEL": "scalar"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["scalar", "torch.bfloat16", "torch.float16", "True", "True"]


def _panel_bytes(model: CausalLM) -> int:
    matrices = [getattr(layer, name) for layer in model.w.layers for name in ("qkv", "o", "gate_up", "down")]
    return sum(m.panels.nbytes for m in [*matrices, model.w.lm_head])


@pytest.mark.parametrize(("dtype", "tied"), [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)],
                         ids=["bf16-tied", "bf16-untied", "f16-tied"])
def test_a_half_checkpoint_keeps_half_the_bytes_and_the_float32_bits(tmp_path, dtype: torch.dtype, tied: bool) -> None:
    directory = make_checkpoint(tmp_path, "qwen2", tied=tied, dtype=dtype)
    cfg = read_config(directory)
    weights = load_weights(directory, cfg, device=torch.device("cpu"), dtype=torch.float32)
    half = CausalLM(cfg, weights)
    assert {m.storage for layer in half.w.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)} == \
        {dtype} and half.w.lm_head.storage == dtype
    full = CausalLM(cfg, weights, panel_storage="float32")
    assert 2 * _panel_bytes(half) == _panel_bytes(full)
    prompt = torch.tensor([[5, 17, 42, 8, 99, 3], [7, 7, 1, 0, 0, 0]])
    cand = torch.tensor([[11, 12, 13], [20, 21, 22]])
    outputs = []
    with torch.inference_mode():
        for model in (half, full):
            model.allocate(batch=2, capacity=16)
            x = model.prefill(prompt, [6, 3])
            step = model.decode_step(torch.tensor([4, 9]), [6, 3])
            look = model.lookahead(cand, [7, 4])
            outputs.append((model.logits(x), model.logits(step), look, model._embed(prompt)))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("dtype", "tied"), [(torch.bfloat16, True), (torch.float16, False), (torch.float32, False)],
                         ids=["bf16-tied", "f16-untied", "fp32"])
def test_packing_while_loading_gives_the_same_model(tmp_path, dtype: torch.dtype, tied: bool) -> None:
    directory = make_checkpoint(tmp_path, "llama", tied=tied, dtype=dtype)
    cfg, cpu = read_config(directory), torch.device("cpu")
    pack = panel_packer(cpu, torch.float32)
    early = load_weights(directory, cfg, device=cpu, dtype=torch.float32, pack=pack)
    assert all(isinstance(m, cpu_ops.PanelWeight) for m in early.matrices())
    assert (early.embed is early.lm_head) == tied and isinstance(early.embed, cpu_ops.PanelWeight) == tied
    assert tied or early.embed.dtype == dtype  # an untied embedding stays as stored
    models = [CausalLM(cfg, early), CausalLM(cfg, load_weights(directory, cfg, device=cpu, dtype=torch.float32))]
    assert models[0].w.layers[0].qkv is early.layers[0].qkv  # kept as packed, not packed again
    assert models[0].w.lm_head.storage == models[1].w.lm_head.storage == dtype
    outputs = []
    with torch.inference_mode():
        for model in models:
            model.allocate(batch=1, capacity=8)
            x = model.prefill(torch.tensor([[3, 1, 4, 1, 5]]), [5])
            outputs.append((model.logits(x), model.logits(model.decode_step(torch.tensor([9]), [5])),
                            model._embed(torch.tensor([[0, 7, 299]]))))
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    backbone = load_weights(directory, cfg, device=cpu, dtype=torch.float32, with_lm_head=False, pack=pack)
    assert isinstance(backbone.layers[0].down, cpu_ops.PanelWeight)
    assert backbone.lm_head.numel() == (cfg.vocab_size * cfg.hidden_size if tied else 0)
    assert panel_packer(cpu, torch.bfloat16) is None and panel_packer(torch.device("meta"), torch.float32) is None


def test_the_benchmarks_random_checkpoint_loads_packed(tmp_path) -> None:
    from lenvm_rt.bench.archs import ARCHS, write_random_checkpoint

    tiny = {**ARCHS["qwen2.5-0.5b"], "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    directory = write_random_checkpoint(tmp_path, tiny, torch.float16)
    cfg, cpu = read_config(directory), torch.device("cpu")
    assert (cfg.model_type, cfg.num_layers, cfg.qkv_bias, cfg.torch_dtype) == ("qwen2", 2, True, "float16")
    weights = load_weights(directory, cfg, device=cpu, dtype=torch.float32, pack=panel_packer(cpu, torch.float32))
    assert {m.storage for m in weights.matrices()} == {torch.float16}
    with pytest.raises(ValueError, match="tied Llama or Qwen2"):
        write_random_checkpoint(tmp_path, {**tiny, "tie_word_embeddings": False}, torch.float16)
