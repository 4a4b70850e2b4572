"""The bad-input catalogue of the server (README, "Serving"): one test per row, each answered with its 4xx and
OpenAI's error JSON, never a 500, and the server still serving afterwards. A tiny random checkpoint with a
random head keeps it fast; the README table is checked against CATALOGUE."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import httpx
import pytest
from server_helpers import tiny_runtime

from lenvm_rt import Sampling
from lenvm_rt.server.app import ServerThread, create_app
from lenvm_rt.server.engine import Engine

M = "tiny"
CHAT = {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
TEXT = {"model": M, "prompt": "The quick brown fox", "max_tokens": 4}


def chat(**kw):
    return json.dumps({**CHAT, **kw})


def text(**kw):
    return json.dumps({**TEXT, **kw})


C, T, P = "/v1/chat/completions", "/v1/completions", "/v1/length/predict"
# (what is wrong, endpoint, raw body, status, error code)
CATALOGUE = [
    ("malformed JSON", C, '{"model": "tiny", "messages": [', 400, "invalid_json"),
    ("body not a JSON object", C, '[1, 2]', 400, "invalid_json"),
    ("body not UTF-8", T, b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "invalid_json"),
    ("NaN anywhere in the body", C, chat(temperature=0.5).replace("0.5", "NaN"), 400, "invalid_json"),
    ("Infinity in a nested field", T, text(length={"target": 3}).replace('3}', 'Infinity}'), 400, "invalid_json"),
    ("number overflowing to inf (1e999)", T, text(top_p=0.5).replace("0.5", "1e999"), 400, "invalid_json"),
    ("body over 4 MiB", T, text(prompt="a" * (4 * 1024 * 1024 + 1)), 413, "request_too_large"),
    ("missing required field (messages)", C, json.dumps({"model": M}), 400, "invalid_type"),
    ("wrong type: temperature as a string", C, chat(temperature="0.5"), 400, "invalid_type"),
    ("wrong type: max_tokens as a float", T, text(max_tokens=1.5), 400, "invalid_type"),
    ("wrong type: max_tokens as a bool", T, text(max_tokens=True), 400, "invalid_type"),
    ("wrong type: stream as a string", C, chat(stream="yes"), 400, "invalid_type"),
    ("unknown message role", C, chat(messages=[{"role": "robot", "content": "x"}]), 400, "invalid_type"),
    ("empty messages", C, chat(messages=[]), 400, "invalid_value"),
    ("empty prompt", T, text(prompt=""), 400, "invalid_value"),
    ("token id outside the vocabulary", T, text(prompt=[1, 2, 10**9]), 400, "invalid_value"),
    ("a batch of prompts", T, text(prompt=["a", "b"]), 400, "invalid_value"),
    ("temperature < 0", C, chat(temperature=-0.5), 400, "invalid_value"),
    ("top_p outside (0, 1]", C, chat(top_p=1.5), 400, "invalid_value"),
    ("top_k < 0", C, chat(top_k=-1), 400, "invalid_value"),
    ("min_p outside [0, 1]", T, text(min_p=2.0), 400, "invalid_value"),
    ("seed < 0 or >= 2**64", T, text(seed=2**64), 400, "invalid_value"),
    ("max_tokens <= 0", T, text(max_tokens=0), 400, "invalid_value"),
    ("n outside [1, 16]", C, chat(n=17), 400, "invalid_value"),
    ("stop: more than 4 strings or an empty one", C, chat(stop=["a", ""]), 400, "invalid_value"),
    ("unknown model", C, chat(model="gpt-4"), 404, "model_not_found"),
    ("prompt + max_tokens over the context", T, text(max_tokens=600), 400, "context_length_exceeded"),
    ("prompt alone over the context", T, text(prompt=[5] * 600, max_tokens=None), 400, "context_length_exceeded"),
    ("unknown length constraint", T, text(length={"target": 5, "constraint": "about"}), 400, "invalid_value"),
    ("length target <= 0", T, text(length={"target": 0}), 400, "invalid_value"),
    ("length target not an int", T, text(length={"target": "5"}), 400, "invalid_type"),
    ("unknown field inside length", T, text(length={"target": 5, "tokens": 5}), 400, "invalid_type"),
    ("length and length_tilt together", T, text(length={"target": 5}, length_tilt=-1.0), 400, "invalid_value"),
    ("top_logprobs outside [0, 20]", C, chat(logprobs=True, top_logprobs=21), 400, "invalid_value"),
    ("top_logprobs without logprobs: true", C, chat(top_logprobs=2), 400, "invalid_value"),
    ("completions logprobs over 5", T, text(logprobs=6), 400, "invalid_value"),
    ("logprobs < 0", T, text(logprobs=-1), 400, "invalid_value"),
    ("wrong type: chat logprobs as an int", C, chat(logprobs=1), 400, "invalid_type"),
    ("wrong type: completions logprobs as a bool", T, text(logprobs=True), 400, "invalid_type"),
    ("unsupported option (echo)", T, text(echo=True), 400, "unsupported_parameter"),
    ("length/predict without prompts", P, json.dumps({"prompts": []}), 400, "invalid_value"),
    ("length/predict prompt over the context", P, json.dumps({"prompts": [[5] * 600]}), 400,
     "context_length_exceeded"),
    ("unknown route", "/v1/nothing", "{}", 404, "not_found"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    rt = tiny_runtime(tmp_path_factory.mktemp("catalogue"))
    with ServerThread(create_app(Engine(rt, max_batch=4), M)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        yield c


def _check_error(r: httpx.Response, status: int, code: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert code is None or err["code"] == code, err


@pytest.mark.parametrize("what, path, body, status, code", CATALOGUE, ids=[row[0] for row in CATALOGUE])
def test_bad_input(server, what, path, body, status, code):
    r = server.post(path, content=body, headers={"content-type": "application/json"})
    _check_error(r, status, code)
    assert server.get("/health").json()["status"] == "ok"


def test_wrong_method(server):
    _check_error(server.get(C), 405, "method_not_allowed")


def test_still_serving_after_the_catalogue(server):
    r = server.post(T, json={**TEXT, "seed": 1, "length": {"target": 2, "constraint": "at_most"}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_queue_full_429_no_value_model_400_engine_stopped_503(tmp_path):
    rt = tiny_runtime(tmp_path, value=False)
    engine = Engine(rt, max_batch=1, max_queue=1)
    with ServerThread(create_app(engine, M)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        _check_error(c.post(T, json={**TEXT, "length": {"target": 3}}), 400, "invalid_value")
        _check_error(c.post(P, json={"prompts": ["a"]}), 400, "no_value_model")
        gate = threading.Event()
        done = threading.Event()

        def hold(ev):
            gate.wait(10)
            if ev.finish_reason is not None:
                done.set()

        engine.submit([5, 6], 8, Sampling(temperature=0), None, hold)  # holds the only place
        r = c.post(T, json=TEXT)
        gate.set()
        _check_error(r, 429, "queue_full")
        assert r.headers["retry-after"] == "1"
        assert done.wait(30)
        assert c.post(T, json=TEXT).status_code == 200  # the place is free again
        engine.stop()  # as during shutdown: HTTP still up, engine gone
        _check_error(c.post(T, json=TEXT), 503, "unavailable")
        assert c.get("/health").json()["status"] == "stopped"


def test_readme_lists_every_row():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| "))
    for what, _, _, status, code in CATALOGUE:
        assert re.search(rf"\| {re.escape(what)} \|[^\n]*\| {status} \|[^\n]*`{code}`", table), what
