"""The embedded default model materialises, loads through lenvm_rt.load("default") and generates."""
from __future__ import annotations

import pytest
import torch

import lenvm_rt
from lenvm_rt import Sampling


@pytest.mark.slow
def test_default_model_generates_like_transformers():
    from transformers import AutoModelForCausalLM

    rt = lenvm_rt.load("default", device="cpu")
    assert rt.config.model_type == "llama" and rt.config.num_layers == 30 and rt.config.tie_word_embeddings
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ours = rt.generate(chat, max_new_tokens=24, sampling=Sampling(temperature=0))
    hf = AutoModelForCausalLM.from_pretrained(rt.directory, dtype=torch.float32).eval()
    ids = rt.encode(chat)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                          eos_token_id=sorted(rt.eos_token_ids), pad_token_id=sorted(rt.eos_token_ids)[0])
    assert ours.token_ids == ref[0, len(ids):].tolist()
    assert "Paris" in ours.text and ours.finish_reason == "stop"
    sampled = rt.generate_batch([chat, "Once upon a time"], max_new_tokens=12,
                                sampling=Sampling(temperature=0.8, top_p=0.95, seed=0))
    assert all(1 <= g.num_tokens <= 12 for g in sampled)


@pytest.mark.slow
def test_default_value_head_predicts_and_guides():
    import json

    from lenvm_rt import LengthTarget
    from lenvm_rt.default_model import DEFAULT_HEAD_DIR

    manifest = json.loads((DEFAULT_HEAD_DIR / "manifest.json").read_text())
    rt = lenvm_rt.load("default", value_model="default", device="cpu")
    assert rt.gamma == pytest.approx(manifest["gamma"], rel=1e-12)
    short = [{"role": "user", "content": "Answer with yes or no: is the Sun a star?"}]
    long = [{"role": "user", "content": "Write a detailed essay of about 400 words on the history of trains."}]
    predicted = rt.predict_length([short, long])
    assert 0 < predicted[0] < predicted[1]  # the trained head tells a one-word answer from an essay
    g = rt.generate(long, max_new_tokens=64, sampling=Sampling(temperature=0), length=LengthTarget.equal(24))
    assert g.num_tokens <= 64 and len(g.values) == g.num_tokens


def test_default_value_head_belongs_to_the_default_model(tmp_path):
    from checkpoints import make_checkpoint

    make_checkpoint(tmp_path / "policy", "llama")
    with pytest.raises(ValueError, match="default model"):
        lenvm_rt.load(str(tmp_path / "policy"), value_model="default")
