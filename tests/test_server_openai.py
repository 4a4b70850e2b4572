"""The official `openai` client drives the server end to end on the default model (SmolLM2-135M-Instruct with its
shipped value head): chat, completions, streaming, the length extension, n, stop, errors. Every answer equals
`Runtime.generate` of the same request alone, computed before the server takes the model."""
from __future__ import annotations

import httpx
import pytest
from server_helpers import torch_head

import lenvm_rt
from lenvm_rt import LengthTarget, Sampling

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "Explain why the sky is blue."}]
GUIDED = Sampling(temperature=0, min_p=0.2, top_k=15)


@pytest.fixture(scope="module")
def served():
    from lenvm_rt.server.app import ServerThread, create_app
    from lenvm_rt.server.engine import Engine

    rt = torch_head(lenvm_rt.load("default", value_model="default", device="cpu"))
    expected = {
        "chat": rt.generate(CHAT, max_new_tokens=12, sampling=Sampling(temperature=0, seed=0), top_logprobs=4),
        "equal": rt.generate(CHAT, max_new_tokens=40, sampling=GUIDED, length=LengthTarget.equal(16)),
        "text": rt.generate("Once upon a time", max_new_tokens=8, sampling=Sampling(temperature=0.8, seed=1)),
        "predict": rt.predict_length([CHAT]),
        "tokenizer": rt.tokenizer,
    }
    with ServerThread(create_app(Engine(rt, max_batch=8), "default")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, server.url, expected
        client.close()


@pytest.mark.slow
def test_models_and_chat(served):
    client, _, expected = served
    assert [m.id for m in client.models.list().data] == ["default"]
    out = client.chat.completions.create(model="default", messages=CHAT, max_tokens=12, temperature=0, seed=0)
    want = expected["chat"]
    assert out.choices[0].message.content == want.text and out.choices[0].finish_reason == want.finish_reason
    assert out.usage.completion_tokens == want.num_tokens and out.usage.prompt_tokens == want.prompt_tokens


@pytest.mark.slow
def test_chat_logprobs_and_quality_through_the_client(served):
    client, _, expected = served
    want = expected["chat"]
    out = client.chat.completions.create(model="default", messages=CHAT, max_tokens=12, temperature=0, seed=0,
                                         logprobs=True, top_logprobs=4)
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(want.token_logprobs, rel=1e-6, abs=1e-6)
    assert "".join(c.token for c in content) == out.choices[0].message.content == want.text
    tok = expected["tokenizer"]
    for c, step in zip(content, want.top_logprobs, strict=True):  # greedy: the chosen token leads its alternatives
        assert [bytes(t.bytes) for t in c.top_logprobs] == [tok.token_bytes(i) for i, _ in step]
        assert [t.logprob for t in c.top_logprobs] == pytest.approx([lp for _, lp in step], rel=1e-6, abs=1e-6)
        assert c.top_logprobs[0].logprob == c.logprob
    quality = out.choices[0].model_extra["quality"]
    assert quality["tokens"] == want.num_tokens
    assert quality["nll"] == pytest.approx(-sum(want.token_logprobs) / want.num_tokens, rel=1e-6)
    assert quality["mean_rank"] == pytest.approx(sum(want.token_ranks) / want.num_tokens, rel=1e-9)


@pytest.mark.slow
def test_streaming_chat_carries_the_live_prediction(served):
    client, _, expected = served
    stream = client.chat.completions.create(model="default", messages=CHAT, max_tokens=12, temperature=0, seed=0,
                                            stream=True, stream_options={"include_usage": True})
    text, remaining, usage = "", [], None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.model_extra.get("remaining_tokens") is not None:
                remaining.append(c.model_extra["remaining_tokens"])
        usage = chunk.usage or usage
    assert text == expected["chat"].text
    assert usage.completion_tokens == expected["chat"].num_tokens == len(remaining)
    assert remaining == pytest.approx(expected["chat"].values, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_length_extension_equal_and_at_most(served):
    client, _, expected = served
    out = client.chat.completions.create(model="default", messages=CHAT, max_tokens=40, temperature=0,
                                         extra_body={"length": {"target": 16, "constraint": "equal"},
                                                     "min_p": 0.2, "top_k": 15})
    want = expected["equal"]
    assert out.usage.completion_tokens == want.num_tokens and out.choices[0].message.content == want.text
    short = client.chat.completions.create(model="default", messages=CHAT, max_tokens=40, temperature=0,
                                           extra_body={"length": {"target": 5, "constraint": "at_most"}})
    assert short.usage.completion_tokens <= 6 and short.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_completions_n_stop_and_streaming(served):
    client, _, expected = served
    out = client.completions.create(model="default", prompt="Once upon a time", max_tokens=8, temperature=0.8,
                                    seed=1, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text == expected["text"].text
    assert out.usage.completion_tokens >= expected["text"].num_tokens + 1  # both choices counted
    stream = client.completions.create(model="default", prompt="Once upon a time", max_tokens=8, temperature=0.8,
                                       seed=1, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected["text"].text
    first_word = expected["text"].text.split()[0]
    cut = client.completions.create(model="default", prompt="Once upon a time", max_tokens=8, temperature=0.8,
                                    seed=1, stop=[first_word])
    assert cut.choices[0].finish_reason == "stop" and first_word not in cut.choices[0].text


@pytest.mark.slow
def test_length_predict_and_errors(served):
    client, url, expected = served
    r = httpx.post(f"{url}/v1/length/predict", json={"prompts": [CHAT]}, timeout=60)
    assert r.json()["data"][0]["predicted_tokens"] == pytest.approx(expected["predict"][0], rel=1e-3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=CHAT, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
