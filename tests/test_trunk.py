"""The native decoder layers (`cpu_ops.Trunk`, csrc/trunk.h) against the per-op path they replace.

The per-op path (the model with its trunk switched off) composes the same layers from separate calls: native
linear and norms with the per-op native attention (Llama, Qwen2) or torch attention (Qwen3's q / k norms).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from subproc import run_python

import lenvm_rt
from lenvm_rt import _native, cpu_ops
from lenvm_rt.model import CausalLM

FAMILIES = ["llama", "qwen2", "qwen3"]  # plain, q/k/v biases, q/k norms
PROMPTS = [[5, 17, 42, 99, 3], [9, 8], [100, 101, 102, 103, 104, 105, 106, 107]]
CANDIDATES = torch.tensor([[7, 8, 9, 10], [20, 21, 22, 23], [30, 31, 32, 33]])


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory) -> CausalLM:
    directory = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return lenvm_rt.load(directory, device="cpu").model


@contextlib.contextmanager
def per_op(model: CausalLM) -> Iterator[None]:
    trunk, model._trunk = model._trunk, None
    try:
        yield
    finally:
        model._trunk = trunk


def _prefill(model: CausalLM, prompts: list[list[int]]) -> list[int]:
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    model.allocate(batch=len(prompts), capacity=32)
    model.prefill(ids, [len(p) for p in prompts])
    return [len(p) for p in prompts]


def _decode_run(model: CausalLM) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill, a lookahead with a commit, then three decode steps: every hidden state and the final caches."""
    with torch.inference_mode():
        positions = _prefill(model, PROMPTS)
        outs = [model.lookahead(CANDIDATES, positions).clone()]
        model.commit(torch.tensor([1, 3, 0]), positions)
        chosen = CANDIDATES[torch.arange(3), torch.tensor([1, 3, 0])]
        positions = [p + 1 for p in positions]
        tokens = [chosen, torch.tensor([11, 12, 13]), torch.tensor([50, 60, 70])]
        for ids in tokens:
            outs.append(model.decode_step(ids, positions).clone())
            positions = [p + 1 for p in positions]
        caches = [c[:3, :, : max(positions)].clone() for c in model.k_cache + model.v_cache]
    return outs, caches


def test_the_model_runs_the_native_trunk(model):
    assert model._trunk is not None  # fp32 on the CPU
    with torch.inference_mode():
        positions = _prefill(model, PROMPTS)
        model.lookahead(CANDIDATES, positions)
        assert model._pending_native is not None and model._pending == []


def test_lookahead_commit_and_decode_match_the_per_op_path(model):
    native_outs, native_caches = _decode_run(model)
    with per_op(model):
        ref_outs, ref_caches = _decode_run(model)
    for ours, ref in zip(native_outs + native_caches, ref_outs + ref_caches):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-5


def test_the_trunk_follows_a_reallocated_cache(model):
    with torch.inference_mode():
        _prefill(model, PROMPTS)
        model.allocate(batch=4, capacity=model.capacity + 64)  # new, larger caches: the trunk must use these
    outs, caches = _decode_run(model)  # its allocate(batch=3, capacity=32) keeps the larger caches
    assert model.k_cache[0].shape[0] == 4 and model.k_cache[0].shape[2] >= 96
    with per_op(model):
        ref_outs, ref_caches = _decode_run(model)
    for ours, ref in zip(outs + caches, ref_outs + ref_caches):
        assert (ours - ref).abs().max().item() <= 1e-5
    model._trunk.clear_cache()
    with pytest.raises(ValueError, match="cache"), torch.inference_mode():
        model.decode_step(torch.tensor([1, 2, 3]), [5, 2, 8])
    model._trunk.set_cache(model.k_cache, model.v_cache, model._cos, model._sin)  # usable again
    again, _ = _decode_run(model)
    assert all(torch.equal(a, b) for a, b in zip(again, outs))


def test_seven_candidates_span_two_attention_tasks_and_match_the_per_op_path(model):
    cand = torch.arange(40, 61).view(3, 7)  # AVX2 tasks hold four candidates: one full task and one of three
    with torch.inference_mode():
        positions = _prefill(model, PROMPTS)
        ours = model.lookahead(cand, positions).clone()
        with per_op(model):
            ref = model.lookahead(cand, positions)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_large_batches_stay_on_the_trunk_with_the_same_bits_per_row(model):
    cand = torch.arange(100, 190).view(3, 30)  # 90 candidate rows: one native call like any other batch
    with torch.inference_mode():
        positions = _prefill(model, PROMPTS)
        big = model.lookahead(cand, positions).clone()
        assert model._pending_native is not None
        with per_op(model):
            ref = model.lookahead(cand, positions)
        alone = model.lookahead(cand[1:2, 7:9].expand(3, 2).contiguous(), positions).clone()
    assert (big - ref).abs().max().item() <= 1e-5
    assert torch.equal(alone[1], big[1, 7:9])


def test_a_row_gets_the_same_bits_alone_and_in_a_batch(model):
    with torch.inference_mode():
        positions = _prefill(model, PROMPTS)
        batch_look = model.lookahead(CANDIDATES, positions).clone()
        batch_step = model.decode_step(torch.tensor([11, 12, 13]), positions).clone()
        positions = _prefill(model, PROMPTS[2:])
        alone_look = model.lookahead(CANDIDATES[2:, 1:3], positions).clone()  # two of its four candidates
        alone_step = model.decode_step(torch.tensor([13]), positions).clone()
    assert torch.equal(alone_look[0], batch_look[2, 1:3])
    assert torch.equal(alone_step[0], batch_step[2])


def _portable_run(directory: str) -> np.ndarray:
    """The decode run in a process whose native kernels are all portable (LENVM_RT_LINEAR_KERNEL=scalar)."""
    code = (
        f"import sys, numpy as np, torch, lenvm_rt; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
        "import test_trunk as t; from lenvm_rt import _native; "
        f"m = lenvm_rt.load({directory!r}, device='cpu').model; assert _native.linear_kernel() == 'scalar'; "
        "outs, _ = t._decode_run(m); print(torch.cat([o.reshape(-1) for o in outs]).double().tolist())"
    )
    done = run_python(code, env={**os.environ, "LENVM_RT_LINEAR_KERNEL": "scalar"})
    assert done.returncode == 0, done.stderr
    return np.array(json.loads(done.stdout.strip().splitlines()[-1]), dtype=np.float32)


@pytest.mark.skipif(_native.linear_kernel() != "avx2_fma", reason="compares the AVX2 build with the portable one")
def test_portable_and_avx2_builds_agree(tmp_path):
    directory = make_checkpoint(tmp_path, "qwen2")
    outs, _ = _decode_run(lenvm_rt.load(directory, device="cpu").model)
    ours = torch.cat([o.reshape(-1) for o in outs]).numpy()
    portable = _portable_run(str(directory))
    assert portable.shape == ours.shape
    # the linear kernels differ (fused vs separate multiply-add); norms, SwiGLU and attention round alike
    assert np.abs(portable - ours).max() <= 1e-5


def _core_args(model: CausalLM) -> tuple:
    cfg = model.cfg
    return (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.rms_norm_eps, model.scale)


def _weights(model: CausalLM) -> list[tuple]:
    return [tuple(cpu_ops._trunk_array(getattr(layer, f)) for f in cpu_ops._TRUNK_FIELDS) for layer in model.w.layers]


def _replace(layer: tuple, field: str, value: object) -> tuple:
    index = cpu_ops._TRUNK_FIELDS.index(field)
    return layer[:index] + (value,) + layer[index + 1:]


@pytest.mark.parametrize(("change", "name"), [
    (lambda w, dh: w.__setitem__(0, _replace(w[0], "qkv", w[0][1][:-1])), r"weights\[0\]\.qkv"),
    (lambda w, dh: w.__setitem__(1, _replace(_replace(w[1], "q_norm", np.ones(dh, np.float32)), "k_norm", None)),
     "q_norm and k_norm"),
    (lambda w, dh: w.__setitem__(0, _replace(w[0], "input_norm", w[0][0].astype(np.float64))),
     r"weights\[0\]\.input_norm"),
    (lambda w, dh: w.__setitem__(0, _replace(w[0], "down", None)), r"weights\[0\]\.down"),
    (lambda w, dh: w.__setitem__(0, w[0][:-1]), "weights"),
    (lambda w, dh: w.pop(), "weights"),
])
def test_bad_weights_are_named(model, change, name):
    weights = _weights(model)
    change(weights, model.cfg.head_dim)
    with pytest.raises(ValueError, match=name):
        _native.Trunk(*_core_args(model), weights)


def test_bad_calls_are_named_and_the_trunk_stays_usable(model):
    cfg = model.cfg
    core = _native.Trunk(*_core_args(model), _weights(model))
    x = np.zeros((1, cfg.hidden_size), np.float32)
    with pytest.raises(ValueError, match="cache"):
        core.decode(x, np.array([0], np.int32))
    bad_heads = list(_core_args(model))
    bad_heads[2] = cfg.num_kv_heads + 1 if cfg.num_kv_heads > 1 else 3
    bad_heads[3] = 2
    with pytest.raises(ValueError, match="heads"):
        _native.Trunk(*bad_heads, _weights(model))

    ref_outs, ref_caches = _decode_run(model)  # the model's own trunk, before any bad call
    trunk = model._trunk._core
    L, Hkv, Dh = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    rows, capacity = model.k_cache[0].shape[0], model.k_cache[0].shape[2]
    k_new = np.zeros((L, 3, Hkv, 4, Dh), np.float32)
    calls = [
        (lambda: trunk.decode(np.zeros((3, cfg.hidden_size + 1), np.float32), np.array([5, 2, 8], np.int32)), "x"),
        (lambda: trunk.decode(np.zeros((3, cfg.hidden_size), np.float32), np.array([5, 2, capacity], np.int32)),
         "positions"),
        (lambda: trunk.decode(np.zeros((rows + 1, cfg.hidden_size), np.float32),
                              np.arange(1, rows + 2, dtype=np.int32)), "positions"),  # more rows than the cache holds
        (lambda: trunk.lookahead(np.zeros((12, cfg.hidden_size), np.float32), np.array([5, 0, 8], np.int32), k_new,
                                 k_new.copy()), "positions"),
        (lambda: trunk.lookahead(np.zeros((12, cfg.hidden_size), np.float32), np.array([5, 2, 8], np.int32),
                                 k_new[:, :2].copy(), k_new.copy()), "k_new"),
        (lambda: trunk.lookahead(np.zeros((12, cfg.hidden_size), np.float32), np.array([5, 2, 8], np.int32), k_new,
                                 k_new[..., :1].copy()), "v_new"),
        (lambda: trunk.commit(k_new, k_new, np.array([0, 4, 1], np.int64), np.array([5, 2, 8], np.int32)), "slot"),
        (lambda: trunk.commit(np.zeros((L, rows + 1, Hkv, 4, Dh), np.float32), np.zeros((L, rows + 1, Hkv, 4, Dh),
                                                                                       np.float32),
                              np.zeros(rows + 1, np.int64), np.arange(1, rows + 2, dtype=np.int32)), "positions"),
        (lambda: trunk.set_cache(model.k_cache[:1], model.v_cache[:1], np.zeros((4, Dh), np.float32),
                                 np.zeros((4, Dh), np.float32)), "k/v"),
    ]
    with torch.inference_mode():
        _prefill(model, PROMPTS)
        for call, name in calls:
            with pytest.raises(ValueError, match=name):
                call()
    outs, caches = _decode_run(model)  # nothing was written: the same run gives the same bits
    assert all(torch.equal(a, b) for a, b in zip(outs + caches, ref_outs + ref_caches))
