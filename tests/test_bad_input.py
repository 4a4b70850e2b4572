"""Every bad input gets a clear ValueError, and the runtime keeps working afterwards."""
from __future__ import annotations

import json
import shutil

import pytest
from checkpoints import make_checkpoint
from safetensors.torch import load_file, save_file

import lenvm_rt
from lenvm_rt import Sampling


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("good"), "llama")


@pytest.fixture(scope="module")
def rt(good):
    return lenvm_rt.load(good, device="cpu", max_context=64)


@pytest.fixture
def copy(good, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(good, target)
    return target


def _still_usable(rt):
    out = rt.generate([5, 6, 7], max_new_tokens=4, sampling=Sampling(temperature=0))
    assert 1 <= out.num_tokens <= 4


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        lenvm_rt.load(tmp_path / "nowhere")


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        lenvm_rt.load(tmp_path / "empty")


def test_unsupported_model_type(copy):
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        lenvm_rt.load(copy)


def test_missing_tensor_is_named(copy):
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        lenvm_rt.load(copy)


def test_wrong_shape_is_named(copy):
    tensors = load_file(copy / "model.safetensors")
    w = tensors["model.layers.0.self_attn.q_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = w[:, :-1].contiguous()
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"q_proj\.weight' has shape \[64, 63\], expected \[64, 64\]"):
        lenvm_rt.load(copy)


def test_unexpected_tensor_is_named(copy):
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensors .*extra.weight"):
        lenvm_rt.load(copy)


def test_truncated_safetensors(copy):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        lenvm_rt.load(copy)


def test_corrupted_safetensors_header(copy):
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[8:16] = b"\xff\xfe{{{{{{"
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted safetensors header"):
        lenvm_rt.load(copy)


def test_bin_only_checkpoint_is_refused(copy):
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="pickled weights .*pytorch_model.bin"):
        lenvm_rt.load(copy)


def test_offline_hub_id_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="cannot be reached"):
        lenvm_rt.load("some-org/some-model")


def test_prompt_longer_than_context(rt):
    with pytest.raises(ValueError, match="exceeds the context of 64 tokens"):
        rt.generate(list(range(3, 70)), max_new_tokens=1)
    _still_usable(rt)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, None])
def test_max_new_tokens_must_be_positive(rt, bad):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        rt.generate([5, 6], max_new_tokens=bad)
    _still_usable(rt)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"top_p": 0.0}, "top_p must lie in"),
    ({"top_p": 1.5}, "top_p must lie in"),
    ({"temperature": -0.1}, "temperature must be"),
    ({"temperature": float("nan")}, "temperature must be"),
    ({"top_k": -1}, "top_k must be"),
    ({"min_p": 2.0}, "min_p must lie in"),
    ({"seed": -3}, "seed must be"),
])
def test_sampling_settings_are_validated(rt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)
    _still_usable(rt)


@pytest.mark.parametrize("prompt", ["", [], [[]]])
def test_empty_prompt(rt, prompt):
    with pytest.raises(ValueError, match="prompt"):
        rt.generate(prompt, max_new_tokens=4)
    _still_usable(rt)


def test_token_ids_outside_the_vocabulary(rt):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 384\)"):
        rt.generate([5, 10_000], max_new_tokens=4)
    _still_usable(rt)


def test_bad_messages_are_named(rt):
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict with 'role' and 'content'"):
        rt.generate([{"role": "user", "content": "hi"}, {"content": "no role"}], max_new_tokens=4)
    _still_usable(rt)


def test_wrong_sampling_list_length(rt):
    with pytest.raises(ValueError, match="list of 2 Sampling"):
        rt.generate_batch([[5], [6]], max_new_tokens=2, sampling=[Sampling()])
    _still_usable(rt)


def test_bad_device_and_dtype(good):
    with pytest.raises(ValueError, match="dtype must be"):
        lenvm_rt.load(good, dtype="int8")
    with pytest.raises(ValueError, match="device"):
        lenvm_rt.load(good, device="tpu")
