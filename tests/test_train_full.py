"""Full fine-tuning of a separate LenVM: forward parity with transformers, learning, save/load round trip, bad input."""
from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint

import lenvm_rt
from lenvm_rt import train_full as tf
from lenvm_rt.rollouts import (
    FORMAT,
    MANIFEST_FILE,
    ROLLOUTS_FILE,
    PromptRecord,
    Rollout,
    RolloutSettings,
    read_rollouts,
    sample_rollouts,
)
from lenvm_rt.tokenizer import Tokenizer, tokenizer_fingerprint
from lenvm_rt.train_head import ValueHead
from lenvm_rt.training import validation_metrics
from lenvm_rt.value_math import remaining_from_logit

EOS = 2
SHORT, LONG = 50, 60  # prompt tokens that announce a short or a long completion


def write_rollouts(directory, policy, rows, *, fingerprint=None):
    """A rollouts directory by hand: rows are (prompt_ids, completion_ids, finish_reason)."""
    directory.mkdir(parents=True, exist_ok=True)
    fp = fingerprint or tokenizer_fingerprint(Tokenizer(policy))
    key = hashlib.sha256(json.dumps([str(directory), rows]).encode()).hexdigest()
    manifest = {"format": FORMAT, "settings": {"capture_hidden": False}, "tokenizer": fp, "policy": str(policy),
                "resume_key": key}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    with open(directory / ROLLOUTS_FILE, "w", encoding="utf-8") as fh:
        for n, (prompt, completion, reason) in enumerate(rows):
            r = Rollout(f"p{n // 2}", n % 2, "math" if n % 3 else "code", "train", prompt, completion, reason)
            fh.write(r.to_json() + "\n")
    return directory


def synthetic_rows(n, seed):
    """Completions whose length the prompt announces (short 3-5, long 12-15 tokens), ending with EOS; each
    token spells the count left after it (100 + remaining), so the values are learnable from few examples."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        long = i % 2 == 1
        prompt = [1, LONG if long else SHORT] + rng.integers(3, 384, size=int(rng.integers(2, 5))).tolist() + [10]
        length = int(rng.integers(12, 16) if long else rng.integers(3, 6))
        completion = [100 + length - 1 - i for i in range(length - 1)] + [EOS]
        rows.append((prompt, completion, "stop"))
    return rows


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("policy") / "ckpt", "qwen2", seed=1)


@pytest.fixture(scope="module")
def data(policy, tmp_path_factory):
    root = tmp_path_factory.mktemp("rollouts")
    return (write_rollouts(root / "train", policy, synthetic_rows(16, 0)),
            write_rollouts(root / "val", policy, synthetic_rows(8, 1)))


FAST = dict(epochs=1, batch=4, lr=1e-3, warmup=0.0)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.mark.parametrize("family,tied,rope", [("llama", False, None), ("qwen2", True, None), ("qwen3", False, None),
                                              ("llama", True, LLAMA3_ROPE)])
def test_forward_matches_transformers_final_normed_hidden_states(tmp_path, family, tied, rope):
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint(tmp_path / family, family, tied=tied, seed=3)
    if rope is not None:  # scaled RoPE: wavelengths on both sides of the llama3 band at head_dim 16
        config = json.loads((ckpt / "config.json").read_text())
        config["rope_parameters"] = {**config["rope_parameters"], **rope}
        (ckpt / "config.json").write_text(json.dumps(config))
        assert tf.read_config(ckpt).rope.kind == "llama3"
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    net = tf.Backbone.load(ckpt)
    seqs = [[5, 17, 42, 99, 3, 7, 8, 9, 10, 11, 2], [9, 8, 7], list(range(20, 60))]
    ids, _ = tf.right_padded(seqs)
    ours = net.hidden_states(ids)  # one right-padded batch
    with torch.no_grad():
        for b, s in enumerate(seqs):
            ref = hf(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0]
            assert (ours[b, :len(s)].detach() - ref).abs().max().item() <= 1e-4
    ours[0, :11].sum().backward()  # every trunk tensor is trainable and reached by the loss
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in net.parameters())


def test_training_reduces_the_validation_loss(policy, data, tmp_path):
    settings = tf.FullTrainSettings(epochs=5, batch=4, lr=1e-3, warmup=0.1, gamma=0.85, micro_batch=2)
    manifest = tf.train_full(policy, *data, tmp_path / "out", settings, progress=False, device="cpu")
    losses = [h["val"]["loss"] for h in manifest["history"]]
    assert len(losses) == 5 and manifest["mode"] == "full" and manifest["gamma"] == 0.85
    assert losses[-1] <= 0.25 * losses[0], losses  # five epochs cut the first epoch's loss at least 4x (~6x seen)
    assert manifest["final"] == manifest["history"][-1]["val"]


def test_saved_lenvm_loads_and_reproduces_the_training_forward(policy, tmp_path):
    from safetensors.torch import load_file

    prompts = [PromptRecord(f"q{i}", t) for i, t in enumerate(["The quick brown fox", "def add(a, b):", "42"])]
    settings = RolloutSettings(samples=2, max_tokens=8, batch=4, capture_hidden=False)
    for name in ("train", "val"):
        sample_rollouts(lenvm_rt.load(policy, device="cpu"), prompts, tmp_path / name, settings, progress=False)
    out = tmp_path / "lenvm"
    manifest = tf.train_full(policy, tmp_path / "train", tmp_path / "val", out,
                             tf.FullTrainSettings(**FAST, gamma=0.9, censoring="as-ended"), progress=False,
                             device="cpu")
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "model.safetensors", "value_head.safetensors", "lenvm_config.json", "manifest.json"} <= {
        p.name for p in out.iterdir()}
    trained, initial = load_file(out / "model.safetensors"), load_file(policy / "model.safetensors")
    assert trained.keys() == initial.keys() and torch.equal(trained["lm_head.weight"], initial["lm_head.weight"])
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    net = tf.Backbone.load(out)
    head = ValueHead(net.cfg.hidden_size)
    head.load_state_dict({k.removeprefix("v_head."): v for k, v in load_file(out / "value_head.safetensors").items()})
    rollouts = read_rollouts(tmp_path / "val")[1]
    z = tf.predict(net, head, rollouts)
    saved = read_rollouts(tmp_path / "val")
    val = tf.load_split(tmp_path / "val", saved[0]["tokenizer"], 0.9, "as-ended")
    assert validation_metrics(val, z, 0.9)["loss"] == pytest.approx(manifest["final"]["loss"], rel=1e-6)

    rt = lenvm_rt.load(policy, value_model=out, device="cpu")  # configuration (a): a separate trunk
    assert rt.gamma == 0.9 and not rt.value.shared_trunk
    for r, zr in zip(rollouts, z):
        tv = rt.token_values(r.prompt_ids, r.completion_ids)
        assert np.abs(np.array(tv.logits) - zr[1:]).max() <= 1e-4
        assert math.log(tv.prompt_value / (1 - tv.prompt_value)) == pytest.approx(zr[0], abs=1e-4)
    predicted = rt.predict_length([r.prompt_ids for r in rollouts])
    expected = [remaining_from_logit(float(zr[0]), 0.9) for zr in z]
    assert predicted == pytest.approx(expected, rel=1e-4)


def _other_tokenizer(src, dst):
    """A copy of checkpoint src whose vocabulary swaps the ids of two tokens."""
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


def test_rollouts_of_another_tokenizer_are_refused(policy, data, tmp_path):
    other = _other_tokenizer(policy, tmp_path / "other")
    with pytest.raises(ValueError, match="different tokenizer"):
        tf.train_full(other, *data, tmp_path / "out", tf.FullTrainSettings(**FAST), progress=False, device="cpu")
    with pytest.raises(ValueError, match="does not share the policy's tokenizer"):
        tf.train_full(policy, *data, tmp_path / "out", tf.FullTrainSettings(**FAST), backbone=other,
                      progress=False, device="cpu")


@pytest.mark.parametrize("bad", [dict(gamma=1.0), dict(gamma=0.0), dict(gamma=-0.5), dict(gamma=True),
                                 dict(epochs=0), dict(batch=0), dict(micro_batch=0), dict(lr=0.0),
                                 dict(warmup=1.0), dict(censoring="drop")])
def test_bad_settings_are_refused_before_any_work(policy, data, tmp_path, bad):
    with pytest.raises(ValueError):
        tf.FullTrainSettings(**bad).check()
    with pytest.raises(ValueError):
        tf.train_full(policy, *data, tmp_path / "out", tf.FullTrainSettings(**bad), progress=False, device="cpu")
    assert not (tmp_path / "out").exists()


def test_out_must_not_be_the_backbone(policy, data):
    with pytest.raises(ValueError, match="backbone's own directory"):
        tf.train_full(policy, *data, policy, tf.FullTrainSettings(**FAST), progress=False, device="cpu")


def test_resume_continues_an_interrupted_run_and_refuses_other_settings(policy, data, tmp_path, monkeypatch):
    settings = tf.FullTrainSettings(epochs=2, batch=4, lr=1e-3, warmup=0.0, gamma=0.85)
    straight = tf.train_full(policy, *data, tmp_path / "a", settings, progress=False, device="cpu")

    calls = []

    def interrupt_after_one_epoch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return validation_metrics(*args)

    monkeypatch.setattr(tf, "validation_metrics", interrupt_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        tf.train_full(policy, *data, tmp_path / "b", settings, progress=False, device="cpu")
    monkeypatch.undo()
    assert (tmp_path / "b" / tf.CHECKPOINT_FILE).is_file() and not (tmp_path / "b" / "model.safetensors").exists()
    other = tf.FullTrainSettings(epochs=2, batch=4, lr=2e-3, warmup=0.0, gamma=0.85)
    with pytest.raises(ValueError, match="another run"):
        tf.train_full(policy, *data, tmp_path / "b", other, resume=True, progress=False, device="cpu")
    resumed = tf.train_full(policy, *data, tmp_path / "b", settings, resume=True, progress=False, device="cpu")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["final"]["loss"] == pytest.approx(straight["final"]["loss"], rel=1e-6)
