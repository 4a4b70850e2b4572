"""Decoding behaviour of Runtime: batching, seeded sampling, EOS, streaming, chat prompts."""
from __future__ import annotations

import json

import pytest
import torch
from checkpoints import make_checkpoint

import lenvm_rt
from lenvm_rt import Sampling

PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 30, 31], [100], [11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return lenvm_rt.load(make_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2"), device="cpu")


def test_batched_greedy_equals_one_by_one(rt):
    greedy = Sampling(temperature=0)
    batch = rt.generate_batch(PROMPTS, max_new_tokens=20, sampling=greedy)
    alone = [rt.generate(p, max_new_tokens=20, sampling=greedy) for p in PROMPTS]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert [g.finish_reason for g in batch] == [g.finish_reason for g in alone]


def test_seeded_sampling_is_reproducible_and_independent_of_batch(rt):
    samplings = [Sampling(temperature=1.0, seed=100 + i, top_k=50, top_p=0.95, min_p=0.01) for i in range(4)]
    batch = rt.generate_batch(PROMPTS, max_new_tokens=24, sampling=samplings)
    again = rt.generate_batch(PROMPTS, max_new_tokens=24, sampling=samplings)
    shuffled = rt.generate_batch(PROMPTS[::-1], max_new_tokens=24, sampling=samplings[::-1])[::-1]
    alone = [rt.generate(p, max_new_tokens=24, sampling=s) for p, s in zip(PROMPTS, samplings)]
    ids = [g.token_ids for g in batch]
    assert ids == [g.token_ids for g in again]
    assert ids == [g.token_ids for g in shuffled]
    assert ids == [g.token_ids for g in alone]


def test_different_seeds_give_different_samples(rt):
    a = rt.generate(PROMPTS[0], max_new_tokens=24, sampling=Sampling(seed=1))
    b = rt.generate(PROMPTS[0], max_new_tokens=24, sampling=Sampling(seed=2))
    assert a.token_ids != b.token_ids


def test_mixed_greedy_and_sampled_rows_keep_their_own_settings(rt):
    greedy, sampled = Sampling(temperature=0), Sampling(temperature=1.0, seed=7)
    mixed = rt.generate_batch(PROMPTS[:2], max_new_tokens=16, sampling=[greedy, sampled])
    assert mixed[0].token_ids == rt.generate(PROMPTS[0], max_new_tokens=16, sampling=greedy).token_ids
    assert mixed[1].token_ids == rt.generate(PROMPTS[1], max_new_tokens=16, sampling=sampled).token_ids


def test_top_k_one_equals_greedy(rt):
    top1 = rt.generate(PROMPTS[1], max_new_tokens=16, sampling=Sampling(temperature=1.5, top_k=1, seed=3))
    greedy = rt.generate(PROMPTS[1], max_new_tokens=16, sampling=Sampling(temperature=0))
    assert top1.token_ids == greedy.token_ids


def test_stops_on_every_eos_id_of_the_generation_config(tmp_path):
    directory = make_checkpoint(tmp_path / "m", "llama")
    free = lenvm_rt.load(directory, device="cpu").generate([5, 6, 7], max_new_tokens=12,
                                                            sampling=Sampling(temperature=0))
    ids = free.token_ids
    stop_at = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    config = json.loads((directory / "generation_config.json").read_text())
    config["eos_token_id"] = [2, ids[stop_at]]  # a second EOS id that greedy decoding reaches
    (directory / "generation_config.json").write_text(json.dumps(config))
    rt = lenvm_rt.load(directory, device="cpu")
    assert ids[stop_at] in rt.eos_token_ids and 2 in rt.eos_token_ids
    out = rt.generate([5, 6, 7], max_new_tokens=12, sampling=Sampling(temperature=0))
    assert out.token_ids == ids[: stop_at + 1]
    assert out.finish_reason == "stop" and out.num_tokens == stop_at + 1


def test_max_new_tokens_bounds_the_output(rt):
    out = rt.generate(PROMPTS[0], max_new_tokens=5, sampling=Sampling(temperature=0))
    assert out.num_tokens <= 5
    assert out.finish_reason == ("length" if out.num_tokens == 5 and out.token_ids[-1] not in rt.eos_token_ids
                                 else "stop")


def test_stream_yields_the_same_tokens_as_generate(rt):
    s = Sampling(seed=11, temperature=0.8)
    events = list(rt.stream(PROMPTS[3], max_new_tokens=20, sampling=s))
    gen = rt.generate(PROMPTS[3], max_new_tokens=20, sampling=s)
    assert [e.token_id for e in events] == gen.token_ids
    assert "".join(e.text for e in events) == gen.text
    assert events[-1].finish_reason == gen.finish_reason
    assert all(e.finish_reason is None for e in events[:-1])


def test_chat_messages_use_the_checkpoint_template(rt):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello, fox."}]
    ref = AutoTokenizer.from_pretrained(rt.directory).apply_chat_template(messages, add_generation_prompt=True)
    ref_ids = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert rt.encode(messages) == list(ref_ids)
    out = rt.generate(messages, max_new_tokens=4, sampling=Sampling(temperature=0))
    assert out.prompt_tokens == len(ref_ids)


def test_text_prompt_matches_transformers_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    # A llama directory: for model_type qwen2, transformers 5 swaps in Qwen2Tokenizer's own
    # pre-tokenizer instead of the one in tokenizer.json, which only real Qwen2 files match.
    rt = lenvm_rt.load(make_checkpoint(tmp_path / "m", "llama"), device="cpu")
    text = "The quick brown fox, 你好 and 12345."
    assert rt.encode(text) == AutoTokenizer.from_pretrained(rt.directory)(text)["input_ids"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_and_decode(tmp_path, dtype):
    directory = make_checkpoint(tmp_path / "m", "qwen3", dtype=dtype)
    assert lenvm_rt.load(directory).config.torch_dtype == str(dtype).removeprefix("torch.")
    fp32 = lenvm_rt.load(directory, device="cpu")
    half = lenvm_rt.load(directory, device="cpu", dtype=dtype)
    assert fp32.dtype == torch.float32 and half.dtype == dtype
    a = fp32.generate([5, 6, 7], max_new_tokens=8, sampling=Sampling(temperature=0))
    b = half.generate([5, 6, 7], max_new_tokens=8, sampling=Sampling(temperature=0))
    assert a.num_tokens >= 1 and b.num_tokens >= 1
