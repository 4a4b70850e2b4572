"""LenVM checkpoints: token values and length prediction against transformers + a plain torch head."""
from __future__ import annotations

import math
import re
import shutil

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint, make_value_head

import lenvm_rt
from lenvm_rt.value_math import remaining_from_logit

GAMMA = 0.99


def _reference_logits(directory, head_file, ids):
    """transformers' final-normed hidden states -> nn.Linear -> SiLU -> nn.Linear, in fp32."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    w = load_file(head_file)
    D = w["v_head.fc.weight"].shape[0]
    fc, summary = torch.nn.Linear(D, D), torch.nn.Linear(D, 1)
    with torch.no_grad():
        fc.weight.copy_(w["v_head.fc.weight"])
        fc.bias.copy_(w["v_head.fc.bias"])
        summary.weight.copy_(w["v_head.summary.weight"])
        summary.bias.copy_(w["v_head.summary.bias"])
        hn = hf.model(torch.tensor([ids])).last_hidden_state[0]
        return summary(torch.nn.functional.silu(fc(hn)))[:, 0]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def lenvm(request, tmp_path_factory):
    """(policy dir, separate LenVM dir) sharing one tokenizer; the LenVM has its own random trunk."""
    root = tmp_path_factory.mktemp(request.param)
    policy = make_checkpoint(root / "policy", request.param, seed=1)
    value = make_checkpoint(root / "lenvm", request.param, seed=2, tied=True)
    make_value_head(value / "value_head.safetensors", 64, gamma=GAMMA, seed=3)
    return policy, value


def test_token_values_match_transformers_with_a_torch_head(lenvm):
    policy, value = lenvm
    rt = lenvm_rt.load(policy, value_model=value, device="cpu")
    assert rt.gamma == GAMMA and not rt.value.shared_trunk
    prompt, response = [5, 17, 42, 99, 3], [7, 8, 9, 10, 11, 2]  # ends with EOS (id 2)
    tv = rt.token_values(prompt, response)
    ref_z = _reference_logits(value, value / "value_head.safetensors", prompt + response)[len(prompt) - 1:]
    ours_z = torch.tensor([tv.prompt_value]), torch.tensor(tv.logits)
    assert (torch.tensor(tv.logits) - ref_z[1:]).abs().max().item() <= 1e-5
    assert abs(math.log(tv.prompt_value / (1 - tv.prompt_value)) - ref_z[0].item()) <= 1e-4
    assert len(ours_z[1]) == len(response)
    assert tv.value[-1] == 0.0 and tv.remaining[-1] == 0.0  # EOS is terminal
    assert tv.true_remaining == [5, 4, 3, 2, 1, 0]
    u = [tv.prompt_value] + tv.value
    for i, d in enumerate(tv.td):
        assert d == pytest.approx(GAMMA * u[i + 1] - u[i] + (1 - GAMMA), abs=1e-12)


def test_native_rows_and_the_reference_head_agree(lenvm):
    from lenvm_rt.kernels.value_head import value_head, value_head_ref

    policy, value = lenvm
    vm = lenvm_rt.load(policy, value_model=value, device="cpu").value
    h = vm.head
    x = torch.randn(80, 64, generator=torch.Generator().manual_seed(4)) * 3
    with torch.inference_mode():
        few, few_u = vm.values(x[:15])  # a decode step's candidates: one native call
        many, _ = vm.values(x)  # a prompt's positions: native as well, the same bits per row
        kernel, _ = value_head(x, vm._final_norm, h.w1, h.b1, h.w2, h.b2, eps=vm._eps)  # what CUDA would run
    ref_z, ref_u = value_head_ref(x, vm._final_norm, h.w1, h.b1, h.w2, h.b2, eps=vm._eps)
    assert torch.equal(many[:15], few)
    assert (many - ref_z).abs().max().item() <= 1e-5 and (kernel - ref_z).abs().max().item() <= 1e-5
    assert (few - ref_z[:15]).abs().max().item() <= 1e-5 and (few_u - ref_u[:15]).abs().max().item() <= 1e-6


def test_native_head_rows_are_independent_and_bad_shapes_are_named() -> None:
    from lenvm_rt import _native, cpu_ops

    g = torch.Generator().manual_seed(9)
    x, norm = torch.randn(9, 24, generator=g), torch.rand(24, generator=g) + 0.5
    w1, b1, w2 = torch.randn(40, 24, generator=g) / 5, torch.randn(40, generator=g), torch.randn(40, generator=g) / 6
    z = cpu_ops.value_head(x, norm, 1e-5, w1, b1, w2, 0.25)
    for r in range(9):  # a row's z never depends on the batch around it
        assert torch.equal(cpu_ops.value_head(x[r:r + 1], norm, 1e-5, w1, b1, w2, 0.25), z[r:r + 1])
    normed = torch.nn.functional.rms_norm(x.double(), (24,), eps=1e-5) * norm.double()
    ref = torch.nn.functional.silu(normed @ w1.double().T + b1.double()) @ w2.double() + 0.25
    assert (z.double() - ref).abs().max().item() <= 1e-5
    out = np.empty(9, np.float32)
    args = [a.numpy() for a in (x, norm)], [a.numpy() for a in (w1, b1, w2)]
    with pytest.raises(ValueError, match="w2: expected shape \\[H\\] matching w1"):
        _native.value_head(*args[0], 1e-5, args[1][0], args[1][1], args[1][2][:-1], 0.0, out)
    with pytest.raises(ValueError, match="z: expected shape \\[R\\] matching x"):
        _native.value_head(*args[0], 1e-5, *args[1], 0.0, out[:-1])
    assert torch.equal(cpu_ops.value_head(x, norm, 1e-5, w1, b1, w2, 0.25), z)  # still usable


def test_predict_length_is_the_inverse_of_the_boundary_value(lenvm):
    policy, value = lenvm
    rt = lenvm_rt.load(policy, value_model=value, device="cpu")
    prompts = [[5, 17, 42, 99, 3], [9, 8], [100, 101, 102, 103, 104, 105, 106]]
    predicted = rt.predict_length(prompts)
    for p, got in zip(prompts, predicted):
        z = _reference_logits(value, value / "value_head.safetensors", p)[-1]
        assert got == pytest.approx(remaining_from_logit(z.item(), GAMMA), rel=1e-4)
        tv = rt.token_values(p, [7])
        assert got == pytest.approx(tv.prompt_remaining, rel=1e-5)
    assert rt.predict_length(prompts[1]) == pytest.approx(predicted[1:2], rel=1e-6)


def test_shared_trunk_head_reads_the_policy_hidden_states(lenvm, tmp_path):
    policy, _ = lenvm
    head = make_value_head(tmp_path / "value_head.safetensors", 64, gamma=GAMMA, seed=4)
    rt = lenvm_rt.load(policy, value_model=head, device="cpu")
    assert rt.value.shared_trunk
    prompt, response = [5, 17, 42], [7, 8, 9]
    tv = rt.token_values(prompt, response)
    ref = _reference_logits(policy, head, prompt + response)[len(prompt):]
    assert (torch.tensor(tv.logits) - ref).abs().max().item() <= 1e-5
    assert tv.true_remaining is None  # no EOS at the end


def test_text_response_and_append_eos(lenvm):
    policy, value = lenvm
    rt = lenvm_rt.load(policy, value_model=value, device="cpu")
    tv = rt.token_values([{"role": "user", "content": "hi"}], "the quick fox", append_eos=True)
    assert tv.token_ids[-1] in rt.eos_token_ids and tv.true_remaining[-1] == 0
    assert "".join(tv.tokens[:-1]) == "the quick fox"


def test_gamma_argument_overrides_the_checkpoint(lenvm):
    policy, value = lenvm
    assert lenvm_rt.load(policy, value_model=value, gamma=0.997).gamma == 0.997


# ---- bad input -----------------------------------------------------------------------------------
def test_missing_value_head_file(lenvm, tmp_path):
    policy, value = lenvm
    target = tmp_path / "v"
    shutil.copytree(value, target)
    (target / "value_head.safetensors").unlink()
    with pytest.raises(ValueError, match="has no value_head.safetensors"):
        lenvm_rt.load(policy, value_model=target)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.update({"v_head.extra": torch.zeros(1)}), "unexpected v_head.extra"),
    (lambda t: t.pop("v_head.summary.bias"), "missing v_head.summary.bias"),
    (lambda t: t.update({"v_head.fc.bias": torch.zeros(63)}), r"v_head.fc.bias has shape \[63\], expected \[64\]"),
    (lambda t: t["v_head.fc.weight"].__setitem__((0, 0), float("nan")), "NaN/inf"),
])
def test_malformed_value_heads_are_refused(lenvm, tmp_path, edit, message):
    from safetensors.torch import load_file, save_file

    policy, _ = lenvm
    head = make_value_head(tmp_path / "value_head.safetensors", 64, gamma=GAMMA, seed=5)
    tensors = load_file(head)
    edit(tensors)
    save_file(tensors, head, metadata={"gamma": str(GAMMA)})
    with pytest.raises(ValueError, match=message):
        lenvm_rt.load(policy, value_model=head)


def test_vocabulary_mismatch_says_what_differs(lenvm, tmp_path):
    import json

    policy, value = lenvm
    target = tmp_path / "v"
    shutil.copytree(value, target)
    tok = json.loads((target / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = (next(w for w, i in vocab.items() if i == n) for n in (300, 301))
    vocab[a], vocab[b] = 301, 300  # same tokens, two ids swapped
    (target / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="vocabularies differ .*different ids for .*" + re.escape(repr(a))):
        lenvm_rt.load(policy, value_model=target)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 1.5, -0.2])
def test_gamma_outside_the_unit_interval(lenvm, gamma):
    policy, value = lenvm
    with pytest.raises(ValueError, match="gamma must be a number in \\(0, 1\\)"):
        lenvm_rt.load(policy, value_model=value, gamma=gamma)


def test_missing_gamma_must_be_given(lenvm, tmp_path):
    policy, _ = lenvm
    head = make_value_head(tmp_path / "value_head.safetensors", 64, gamma=None, seed=6)
    with pytest.raises(ValueError, match="does not record its discount"):
        lenvm_rt.load(policy, value_model=head)
    assert lenvm_rt.load(policy, value_model=head, gamma=0.9).gamma == 0.9


def test_empty_response_and_no_value_model(lenvm):
    policy, value = lenvm
    rt = lenvm_rt.load(policy, value_model=value, device="cpu")
    with pytest.raises(ValueError, match="response is empty"):
        rt.token_values([5, 6], [])
    plain = lenvm_rt.load(policy, device="cpu")
    assert plain.gamma is None
    with pytest.raises(ValueError, match="needs a value model"):
        plain.predict_length([[5, 6]])
    assert rt.predict_length([[5, 6]])[0] > 0  # still usable after the errors


def test_values_of_a_head_being_trained_take_the_torch_path(lenvm):
    policy, value = lenvm
    vm = lenvm_rt.load(policy, value_model=value, device="cpu").value
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        native, _ = vm.values(x)
    vm.head.w1.requires_grad_(True)
    try:
        z, _ = vm.values(x)  # grad mode on and a trainable head: no numpy view of it, the kernels' path instead
    finally:
        vm.head.w1.requires_grad_(False)
    assert (z.detach() - native).abs().max().item() <= 1e-5
