"""Fuzz of the HTTP layer: hypothesis draws requests from the server's schemas (numbers a little beyond their
ranges), replaces or removes up to two fields with arbitrary JSON, and also sends raw byte strings; every
answer is a 200 or a 4xx with OpenAI's error JSON (never a 500, never a hang), and the server keeps serving.
The C++ step controller has its own hypothesis fuzz against its specification in
tests/test_guidance_controller.py (test_core_and_torch_reference_match_specification_on_generated_batches);
its bad arguments are covered by tests/test_guidance_bad_input.py."""
from __future__ import annotations

import httpx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from server_helpers import tiny_runtime

from lenvm_rt.server.app import ServerThread, create_app
from lenvm_rt.server.engine import Engine

ALLOWED = {200, 400, 404, 413, 429}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


COMMON = {
    "max_tokens": st.integers(-1, 8),
    "temperature": st.floats(-0.5, 2.5),
    "top_p": st.floats(-0.1, 1.1),
    "top_k": st.integers(-1, 30),
    "min_p": st.floats(-0.1, 1.1),
    "seed": st.integers(-2, 2**64 + 2),
    "n": st.integers(0, 3),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "length": st.fixed_dictionaries(
        {"target": st.integers(-2, 8)},
        optional={"constraint": st.sampled_from(["equal", "at_most", "at_least", "about"]),
                  "rule": st.sampled_from(["strict", "band", "loose"])}),
    "length_tilt": st.floats(-1e6, 1e6),
}
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "robot"]),
                                           "content": st.text(max_size=20)}), min_size=1, max_size=3)
PROMPT = st.text(max_size=30) | st.lists(st.integers(-5, 400), max_size=8) | st.lists(st.text(max_size=5), max_size=2)
SCHEMAS = {
    "/v1/chat/completions": st.fixed_dictionaries({"model": st.just("tiny"), "messages": MESSAGES}, optional=COMMON),
    "/v1/completions": st.fixed_dictionaries({"model": st.just("tiny"), "prompt": PROMPT}, optional=COMMON),
    "/v1/length/predict": st.fixed_dictionaries({"prompts": st.lists(PROMPT, min_size=1, max_size=3)},
                                                optional={"raw": st.booleans(), "model": st.just("tiny")}),
}
FIELDS = ["model", "messages", "prompt", "prompts", *COMMON]


@st.composite
def cases(draw):
    """A request of the schema (numbers drawn a little beyond their ranges), then 0-2 fields replaced by
    arbitrary JSON or removed."""
    path = draw(st.sampled_from(sorted(SCHEMAS)))
    body = draw(SCHEMAS[path])
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)):
        if draw(st.booleans()):
            body[key] = draw(json_values)
        else:
            body.pop(key, None)
    return path, body


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    rt = tiny_runtime(tmp_path_factory.mktemp("fuzz"), max_context=48)
    with ServerThread(create_app(Engine(rt, max_batch=4), "tiny")) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        yield c
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 2}).status_code == 200


def _check(r: httpx.Response) -> None:
    assert r.status_code in ALLOWED, (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)


@given(cases())
@settings(max_examples=150, deadline=None)
def test_schema_fuzz_never_500(client, case):
    path, body = case
    with client.stream("POST", path, json=body) as r:
        r.read()
    _check(r)
    event(f"{path} {r.status_code}")
    if r.status_code == 200 and body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]")


@given(st.binary(max_size=200))
@settings(max_examples=30, deadline=None)
def test_raw_bytes_never_500(client, raw):
    _check(client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}))
