"""Quality beside length on the server: every finished choice carries the policy's own judgement of its tokens,
and `logprobs` returns each token's log p (and with `top_logprobs` the step's most probable tokens) in OpenAI's
format. Both must equal what `Runtime.generate` of the same request alone records (Generation.token_logprobs /
token_ranks / top_logprobs), streamed or not, guided or not, cut by a stop string or not. A tiny random
checkpoint with a random head keeps it fast."""
from __future__ import annotations

import json

import httpx
import pytest
from checkpoints import make_tokenizer
from server_helpers import tiny_runtime

from lenvm_rt import LengthTarget, Sampling
from lenvm_rt.quality import quality_of_steps
from lenvm_rt.server.protocol import TextAssembler
from lenvm_rt.tokenizer import IncrementalDecoder, Tokenizer

M = "tiny"
CHAT = [{"role": "user", "content": "hi there"}]
PROMPT = [5, 17, 42, 8]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from lenvm_rt.server.app import ServerThread, create_app
    from lenvm_rt.server.engine import Engine

    rt = tiny_runtime(tmp_path_factory.mktemp("quality"))
    expected = {
        "text": [rt.generate(PROMPT, max_new_tokens=12, sampling=Sampling(temperature=0.9, seed=3 + i), top_logprobs=2)
                 for i in range(2)],
        "chat": rt.generate(CHAT, max_new_tokens=10, sampling=Sampling(temperature=1.0, seed=7), top_logprobs=3),
        "equal": rt.generate(PROMPT, max_new_tokens=20, sampling=Sampling(temperature=1.0, top_k=15, seed=1),
                             length=LengthTarget.equal(6)),
    }
    eos = rt.eos_token_ids
    expected["tokenizer"] = rt.tokenizer
    with ServerThread(create_app(Engine(rt, max_batch=4), M)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, expected, eos


def _quality(gen, eos, tokens: int | None = None) -> dict:
    n = len(gen.token_ids) if tokens is None else tokens
    q = quality_of_steps(gen.token_ids[:n], gen.token_logprobs[:n], gen.token_ranks[:n], eos)
    return {**q.fields(), "tokens": q.tokens}


def _assert_quality(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    assert got["tokens"] == want["tokens"]
    for key in ("nll", "mean_rank", "mean_prob", "repetition_rate"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key


def test_completions_logprobs_zero_and_quality_per_choice(served):
    client, expected, eos = served
    r = client.post("/v1/completions", json={"model": M, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.9,
                                             "seed": 3, "n": 2, "logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    for choice, gen in zip(body["choices"], expected["text"]):
        lp = choice["logprobs"]
        assert lp["token_logprobs"] == pytest.approx(gen.token_logprobs, rel=1e-6, abs=1e-6)
        assert len(lp["tokens"]) == gen.num_tokens and lp["top_logprobs"] is None
        assert "".join(lp["tokens"]) == choice["text"] == gen.text
        assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
        _assert_quality(choice["quality"], _quality(gen, eos))
    assert body["usage"]["completion_tokens"] == sum(c["quality"]["tokens"] for c in body["choices"])


def _alternatives(tok, step: list[tuple[int, float]]) -> list[dict]:
    return [{"token": tok.token_bytes(i).decode("utf-8", errors="replace"), "logprob": lp,
             "bytes": list(tok.token_bytes(i))} for i, lp in step]


def _assert_entries(got: list[dict], want: list[dict]) -> None:
    assert [(e["token"], e["bytes"]) for e in got] == [(e["token"], e["bytes"]) for e in want]
    assert [e["logprob"] for e in got] == pytest.approx([e["logprob"] for e in want], rel=1e-6, abs=1e-6)


def test_completions_top_logprobs(served):
    client, expected, eos = served
    r = client.post("/v1/completions", json={"model": M, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.9,
                                             "seed": 3, "n": 2, "logprobs": 2})
    assert r.status_code == 200, r.text
    tok = expected["tokenizer"]
    for choice, gen in zip(r.json()["choices"], expected["text"]):
        lp = choice["logprobs"]
        assert lp["token_logprobs"] == pytest.approx(gen.token_logprobs, rel=1e-6, abs=1e-6)
        assert len(lp["top_logprobs"]) == gen.num_tokens
        for got, step in zip(lp["top_logprobs"], gen.top_logprobs):
            want = {e["token"]: e["logprob"] for e in _alternatives(tok, step)}
            assert list(got) == list(want) and list(got.values()) == pytest.approx(list(want.values()), abs=1e-6)


def test_chat_top_logprobs_streamed_or_not(served):
    client, expected, eos = served
    gen, tok = expected["chat"], expected["tokenizer"]
    body = {"model": M, "messages": CHAT, "max_tokens": 10, "temperature": 1.0, "seed": 7, "logprobs": True,
            "top_logprobs": 3}
    r = client.post("/v1/chat/completions", json=body)
    entries = r.json()["choices"][0]["logprobs"]["content"]
    chunks = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    for got in (entries, streamed):
        assert [e["logprob"] for e in got] == pytest.approx(gen.token_logprobs, rel=1e-6, abs=1e-6)
        assert "".join(e["token"] for e in got) == gen.text
        assert len(got) == len(gen.top_logprobs)
        for entry, step in zip(got, gen.top_logprobs):
            _assert_entries(entry["top_logprobs"], _alternatives(tok, step))


def test_quality_without_logprobs(served):
    client, expected, eos = served
    gen = expected["equal"]
    r = client.post("/v1/completions", json={"model": M, "prompt": PROMPT, "max_tokens": 20, "temperature": 1.0,
                                             "top_k": 15, "seed": 1, "length": {"target": 6}})
    choice = r.json()["choices"][0]
    assert choice["logprobs"] is None and choice["text"] == gen.text
    _assert_quality(choice["quality"], _quality(gen, eos))


def test_streamed_chat_logprobs_and_quality_on_the_last_chunk(served):
    client, expected, eos = served
    gen = expected["chat"]
    body = {"model": M, "messages": CHAT, "max_tokens": 10, "temperature": 1.0, "seed": 7, "logprobs": True,
            "stream": True}
    chunks = []
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    entries = [e for c in choices if c["logprobs"] for e in c["logprobs"]["content"]]
    assert [e["logprob"] for e in entries] == pytest.approx(gen.token_logprobs, rel=1e-6, abs=1e-6)
    assert all(e["bytes"] == list(e["token"].encode("utf-8")) and e["top_logprobs"] == [] for e in entries)
    assert "".join(e["token"] for e in entries) == "".join(c["delta"].get("content") or "" for c in choices) == gen.text
    finished = [c for c in choices if c["finish_reason"] is not None]
    assert len(finished) == 1 and all("quality" not in c for c in choices if c["finish_reason"] is None)
    _assert_quality(finished[0]["quality"], _quality(gen, eos))


def test_stop_string_cuts_logprobs_and_quality_with_the_usage(served):
    client, expected, eos = served
    gen = expected["text"][0]
    middle = len(gen.text) // 2
    stop = next(gen.text[i:i + 2] for i in range(middle, len(gen.text) - 1) if gen.text[i:i + 2].strip())
    r = client.post("/v1/completions", json={"model": M, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.9,
                                             "seed": 3, "logprobs": 0, "stop": [stop]})
    body = r.json()
    choice = body["choices"][0]
    n = body["usage"]["completion_tokens"]
    assert choice["finish_reason"] == "stop" and stop not in choice["text"] and n <= gen.num_tokens
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(gen.token_logprobs[:n], rel=1e-6, abs=1e-6)
    _assert_quality(choice["quality"], _quality(gen, eos, n))


def test_chat_logprobs_false_gives_none(served):
    client, expected, eos = served
    r = client.post("/v1/chat/completions", json={"model": M, "messages": CHAT, "max_tokens": 10, "temperature": 1.0,
                                                  "seed": 7, "logprobs": False, "top_logprobs": 0})
    choice = r.json()["choices"][0]
    assert choice["logprobs"] is None and choice["message"]["content"] == expected["chat"].text
    _assert_quality(choice["quality"], _quality(expected["chat"], eos))


def test_pieces_join_to_decode_when_the_ids_end_mid_character(tmp_path):
    make_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    ids = tok.encode("a \u20ac", add_special_tokens=False)[:-1]  # the euro sign's last byte cut off
    assert tok.decode(ids).endswith("\ufffd")
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(t) for t in ids]
    assert pieces[-1] == "" and "".join(pieces) + decoder.finish() == tok.decode(ids)
    asm = TextAssembler(tok, ["zz"])
    sent = "".join(asm.push(t) for t in ids) + asm.flush()
    assert sent == "".join(asm.token_texts) == tok.decode(ids) and not asm.stopped
    stopping = TextAssembler(tok, ["\ufffd"])  # a stop string met only by the tail
    sent = "".join(stopping.push(t) for t in ids) + stopping.flush()
    assert stopping.stopped and sent == tok.decode(ids)[:-1]
