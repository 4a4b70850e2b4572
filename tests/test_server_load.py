"""Load: 32 concurrent clients x 3 requests each (guided and unguided, streamed and not) against one server on a
tiny random checkpoint. Bounded in time, every request answered, none lost, and every answer equal to the same
request run alone with `Runtime.generate` (same seed, same tokens: text, token count and finish reason).
Also: a client that disconnects mid-stream frees its row."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_helpers import tiny_runtime

from lenvm_rt import LengthTarget, Sampling
from lenvm_rt.server.app import ServerThread, create_app
from lenvm_rt.server.engine import Engine

CLIENTS, PER_CLIENT = 32, 3
PROMPTS = ["The quick brown fox", "Length value models", "def add(a, b):", "Question: what is 12 plus 30?"]


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return tiny_runtime(tmp_path_factory.mktemp("load"))


def _body(i: int) -> dict:
    body = {"model": "tiny", "prompt": PROMPTS[i % 4] + " " * (i % 3), "max_tokens": 6 + i % 11, "seed": i,
            "temperature": [0.0, 0.8, 1.0][i % 3], "top_k": [None, 20, 15][i % 3], "stream": i % 2 == 0}
    if i % 4 == 1:
        body["length"] = {"target": 2 + i % 5, "constraint": ["equal", "at_most", "at_least"][i % 3]}
    elif i % 8 == 3:
        body["length_tilt"] = -2.0
    return body


def _expected(rt, body: dict) -> tuple[str, int, str]:
    length = body.get("length")
    g = rt.generate(body["prompt"], max_new_tokens=body["max_tokens"],
                    sampling=Sampling(temperature=body["temperature"], top_k=body["top_k"], seed=body["seed"]),
                    length=LengthTarget(length["constraint"], length["target"]) if length else None,
                    tilt=body.get("length_tilt"))
    return g.text, g.num_tokens, g.finish_reason


def _ask(client: httpx.Client, body: dict) -> tuple[str, int, str]:
    if not body["stream"]:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        return out["choices"][0]["text"], out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]
    text, reason, usage = "", None, None
    with client.stream("POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    text += c["text"]
                    reason = c["finish_reason"] or reason
                usage = chunk.get("usage") or usage
    return text, usage["completion_tokens"], reason


def test_concurrent_clients_get_what_they_would_get_alone(rt):
    bodies = [_body(i) for i in range(CLIENTS * PER_CLIENT)]
    expected = [_expected(rt, b) for b in bodies]
    engine = Engine(rt, max_batch=16, max_queue=CLIENTS)
    limits = httpx.Limits(max_connections=CLIENTS)
    with ServerThread(create_app(engine, "tiny")) as s, httpx.Client(base_url=s.url, timeout=120, limits=limits) as c:
        def client(k: int) -> list[tuple[str, int, str]]:
            return [_ask(c, bodies[k * PER_CLIENT + j]) for j in range(PER_CLIENT)]

        start = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = [a for per_client in pool.map(client, range(CLIENTS)) for a in per_client]
        elapsed = time.monotonic() - start
        assert c.get("/health").json()["active"] == 0
    assert elapsed < 120
    assert len(answers) == len(bodies)
    for i, (got, want) in enumerate(zip(answers, expected)):
        assert got == want, f"request {i}: {bodies[i]}"
    assert engine.steps < sum(n for _, n, _ in expected)  # rows really shared steps


def test_client_disconnect_frees_the_row_non_streaming(rt):
    engine = Engine(rt, max_batch=2)
    with ServerThread(create_app(engine, "tiny")) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 500, "seed": 3,
                "length": {"target": 499, "constraint": "at_least"}}
        pool = ThreadPoolExecutor(1)
        gone = pool.submit(lambda: httpx.post(f"{s.url}/v1/completions", json=body, timeout=1.0))
        deadline = time.monotonic() + 30
        while c.get("/health").json()["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        held = engine.call(lambda e: time.sleep(3))  # the engine waits while the client times out and hangs up
        with pytest.raises(httpx.TimeoutException):
            gone.result()
        held.result(30)
        while engine.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.cancelled == 1 and c.get("/health").json()["active"] == 0
        pool.shutdown()


def test_client_disconnect_frees_the_row(rt):
    engine = Engine(rt, max_batch=2)
    with ServerThread(create_app(engine, "tiny")) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 500, "temperature": 1.0, "seed": 3,
                "length": {"target": 400, "constraint": "at_least"}, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # hang up after the first token
        deadline = time.monotonic() + 30
        while c.get("/health").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/health").json()["active"] == 0
        assert 0 < engine.steps < 400
