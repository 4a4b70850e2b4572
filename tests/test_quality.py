"""Text quality: the policy's own NLL / rank / probability of a response against an independent transformers
computation, 4-gram repetition on hand-made sequences, sampled vs least-likely text, and bad input."""
from __future__ import annotations

import math

import pytest
import torch
from checkpoints import VOCAB, make_checkpoint

import lenvm_rt
from lenvm_rt import Sampling
from lenvm_rt.quality import (
    TextQuality,
    batch_quality,
    quality_of_steps,
    repetition_rate,
    summarize_quality,
    text_quality,
)

SHARPEN = 6.0
EOS = 2  # the tiny checkpoint's config EOS; its generation config adds 1 (both are EOS ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    directory = make_checkpoint(tmp_path_factory.mktemp("quality") / "llama", "llama")
    hf = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # sharper next-token distributions than the random init's near-uniform ones
        hf.lm_head.weight.mul_(SHARPEN)
    hf.save_pretrained(directory)
    return lenvm_rt.load(directory, device="cpu"), hf


def hf_scores(hf, prompt: list[int], response: list[int]) -> tuple[list[float], list[int]]:
    """Log-probability and 1-based rank of each response token, from transformers' own forward."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]  # position P-1+i predicts response token i
    chosen = logp.gather(1, torch.tensor(response)[:, None])
    ranks = (logp > chosen).sum(-1) + 1
    return chosen[:, 0].tolist(), ranks.tolist()


def least_likely(hf, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    """n tokens, each the least likely non-EOS token after the ones before it."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([ids])).logits[0, -1]
            logits[list(eos)] = math.inf
            ids.append(int(logits.argmin()))
    return ids[len(prompt):]


PROMPT = [5, 17, 40, 99, 3, 250]
RESPONSE = [11, 12, 13, 300, 7, 7, 7, 7, 7, 42]


def test_nll_rank_and_prob_match_transformers(tiny):
    rt, hf = tiny
    q = text_quality(rt.model, PROMPT, RESPONSE, rt.eos_token_ids)
    logp, ranks = hf_scores(hf, PROMPT, RESPONSE)
    assert q.nll == pytest.approx(-sum(logp) / len(logp), abs=1e-4)
    assert q.mean_rank == sum(ranks) / len(ranks)
    assert q.mean_prob == pytest.approx(sum(math.exp(v) for v in logp) / len(logp), abs=1e-5)
    assert q.tokens == len(RESPONSE) and q.ended is False
    # [7, 7, 7, 7, 7]: 4-grams ... (7,7,7,7) twice; 7 4-grams in 10 tokens, 1 repeat
    assert q.repetition_rate == pytest.approx(1 / 7)
    assert 1.0 <= q.mean_rank <= VOCAB and 0.0 < q.mean_prob < 1.0


def test_a_trailing_eos_is_scored_but_not_counted_as_text(tiny):
    rt, hf = tiny
    response = [11, 12, 13, 14, 11, 12, 13, 14, EOS]
    q = text_quality(rt.model, PROMPT, response, rt.eos_token_ids)
    logp, ranks = hf_scores(hf, PROMPT, response)
    assert q.ended is True and q.tokens == 9
    assert q.nll == pytest.approx(-sum(logp) / 9, abs=1e-4) and q.mean_rank == sum(ranks) / 9
    assert q.repetition_rate == pytest.approx(1 / 5)  # EOS left out: 1/5 like [1,2,3,4,1,2,3,4] below


def test_batched_rows_of_different_lengths_equal_single_rows(tiny):
    rt, _ = tiny
    prompts = [PROMPT, [8, 9], PROMPT[:3] * 5]
    responses = [RESPONSE, [100, 200, EOS], [5]]
    together = batch_quality(rt.model, prompts, responses, rt.eos_token_ids, batch=8)
    alone = [text_quality(rt.model, p, r, rt.eos_token_ids) for p, r in zip(prompts, responses)]
    in_twos = batch_quality(rt.model, prompts, responses, rt.eos_token_ids, batch=2)
    for a, b, c in zip(together, alone, in_twos):
        assert a.nll == pytest.approx(b.nll, abs=1e-5) and c.nll == pytest.approx(b.nll, abs=1e-5)
        assert a.mean_rank == b.mean_rank == c.mean_rank and a.tokens == b.tokens


@pytest.mark.parametrize("ids, expected", [
    # 4-grams (1,2,3,4) (2,3,4,1) (3,4,1,2) (4,1,2,3) (1,2,3,4): 5 of them, the last repeats the first -> 1/5
    ([1, 2, 3, 4, 1, 2, 3, 4], 1 / 5),
    # 9 tokens of one id: 6 4-grams, all (5,5,5,5); 5 repeat the first -> 5/6
    ([5] * 9, 5 / 6),
    ([1, 2, 3, 4, 5, 6, 7, 8], 0.0),  # 5 distinct 4-grams
    ([1, 1, 1, 1], 0.0),  # fewer than 5 tokens: 0 by definition
    # (1,2,3,4) (2,3,4,9) (3,4,9,1) (4,9,1,2) (9,1,2,3) (1,2,3,4) (2,3,4,9): 7 4-grams, 2 repeats -> 2/7
    ([1, 2, 3, 4, 9, 1, 2, 3, 4, 9], 2 / 7),
    ([], 0.0),
])
def test_repetition_rate_by_hand(ids, expected):
    assert repetition_rate(ids) == pytest.approx(expected, abs=1e-15)


def test_least_likely_tokens_score_worse_than_a_sample(tiny):
    rt, hf = tiny
    prompt = rt.encode("The quick brown fox")
    sampled = rt.generate(prompt, max_new_tokens=16, sampling=Sampling(temperature=1.0, seed=3)).token_ids
    worst = least_likely(hf, prompt, 16, set(rt.eos_token_ids))
    q_sampled = text_quality(rt.model, prompt, sampled, rt.eos_token_ids)
    q_worst = text_quality(rt.model, prompt, worst, rt.eos_token_ids)
    assert q_worst.nll > q_sampled.nll + 1.0
    assert q_worst.mean_prob < q_sampled.mean_prob
    assert q_worst.mean_rank > VOCAB - 3  # the last rank, up to the EOS ids it skipped
    _, ranks = hf_scores(hf, prompt, worst)
    assert q_worst.mean_rank == sum(ranks) / len(ranks)


def test_runtime_wrapper_takes_text_or_ids(tiny):
    rt, _ = tiny
    text = "Length value models predict"
    ids = rt.tokenizer.encode(text, add_special_tokens=False)
    by_text = rt.text_quality("Question: what is 12 plus 30?", text)
    by_ids = rt.text_quality("Question: what is 12 plus 30?", ids)
    assert isinstance(by_text, TextQuality) and by_text == by_ids
    chat = rt.text_quality([{"role": "user", "content": "hi"}], ids + [EOS])
    assert chat.ended and chat.tokens == len(ids) + 1


def test_summarize_quality_means_and_skips_missing():
    a = TextQuality(nll=2.0, mean_rank=3.0, mean_prob=0.25, repetition_rate=0.0, tokens=4, ended=True)
    b = TextQuality(nll=4.0, mean_rank=5.0, mean_prob=0.75, repetition_rate=0.5, tokens=8, ended=False)
    old = {"text": "written before the quality fields existed"}
    out = summarize_quality([a, None, old, b.fields(), {"nll": None}])
    assert out == {"nll": 3.0, "mean_rank": 4.0, "mean_prob": 0.5, "repetition_rate": 0.25, "tokens": 4.0, "n": 2}
    assert summarize_quality([]) == {"nll": None, "mean_rank": None, "mean_prob": None, "repetition_rate": None,
                                     "tokens": None, "n": 0}


@pytest.mark.parametrize("prompt, response, message", [
    (PROMPT, [], "response is empty"),
    ([], [3], "prompt is empty"),
    (PROMPT, [3, VOCAB], f"must lie in \\[0, {VOCAB}\\); got \\[{VOCAB}\\]"),
    (PROMPT, [-1], "must lie in"),
    (PROMPT, [3, True], "list of token ids"),
    (PROMPT, "text", "list of token ids"),
    (PROMPT, [3, EOS, 4], "EOS id at position 1 before its end"),
    (PROMPT, [7] * 600, "exceed the context of 512 tokens"),
])
def test_bad_input_is_refused(tiny, prompt, response, message):
    rt, _ = tiny
    with pytest.raises(ValueError, match=message):
        text_quality(rt.model, prompt, response, rt.eos_token_ids)


def test_bad_batches_and_runtime_input(tiny):
    rt, _ = tiny
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        batch_quality(rt.model, [PROMPT, PROMPT], [[3]], rt.eos_token_ids)
    with pytest.raises(ValueError, match="response 1: the response is empty"):
        batch_quality(rt.model, [PROMPT, PROMPT], [[3], []], rt.eos_token_ids)
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        batch_quality(rt.model, [PROMPT], [[3]], rt.eos_token_ids, batch=0)
    with pytest.raises(ValueError, match="response is empty"):
        rt.text_quality("hello", "")
    with pytest.raises(ValueError, match="exceed the context of 100 tokens"):
        text_quality(rt.model, PROMPT, [7] * 95, rt.eos_token_ids, max_context=100)


def test_decoding_step_statistics_equal_transformers_scores_of_the_generated_text(tiny):
    rt, hf = tiny
    prompts = [[5, 9, 13, 21], [7, 8]]
    gens = rt.generate_batch(prompts, max_new_tokens=12, sampling=[Sampling(temperature=1.3, seed=4),
                                                                   Sampling(temperature=0.7, top_k=5, seed=8)])
    for prompt, gen in zip(prompts, gens):
        logp, ranks = hf_scores(hf, prompt, gen.token_ids)
        assert gen.token_ranks == ranks  # sampled at other temperatures: ranks > 1 occur
        assert gen.token_logprobs == pytest.approx(logp, abs=1e-4)
        from_steps = quality_of_steps(gen.token_ids, gen.token_logprobs, gen.token_ranks, rt.eos_token_ids)
        assert gen.quality == from_steps and gen.response_tokens == gen.num_tokens - from_steps.ended
        forward = text_quality(rt.model, prompt, gen.token_ids, rt.eos_token_ids)
        assert from_steps.nll == pytest.approx(forward.nll, abs=1e-4)
        assert (from_steps.mean_rank, from_steps.repetition_rate, from_steps.ended) == \
            (forward.mean_rank, forward.repetition_rate, forward.ended)
    assert any(r > 1 for g in gens for r in g.token_ranks)
    events = list(rt.stream(prompts[0], max_new_tokens=12, sampling=Sampling(temperature=1.3, seed=4)))
    assert [e.logprob for e in events] == pytest.approx(gens[0].token_logprobs, abs=1e-6)
    assert [e.rank for e in events] == gens[0].token_ranks
    assert "".join(e.text for e in events) == gens[0].text


def test_quality_of_steps_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="one log-probability and one rank per token"):
        quality_of_steps([5, 6], [-0.1], [1, 2], {EOS})
    with pytest.raises(ValueError, match="one log-probability and one rank per token"):
        quality_of_steps([], [], [], {EOS})


def test_generation_quality_is_none_without_tokens():
    from lenvm_rt.config import Generation

    empty = Generation(text="", token_ids=[], num_tokens=0, finish_reason="length", prompt_tokens=3,
                       prefill_seconds=0.0, decode_seconds=0.0)
    assert empty.quality is None and empty.response_tokens == 0
    ended = Generation(text="a", token_ids=[7, 2], num_tokens=2, finish_reason="stop", prompt_tokens=3,
                       prefill_seconds=0.0, decode_seconds=0.0, token_logprobs=[-1.0, -3.0], token_ranks=[1, 4])
    q = ended.quality
    assert (q.nll, q.mean_rank, q.tokens, q.ended, ended.response_tokens) == (2.0, 2.5, 2, True, 1)
