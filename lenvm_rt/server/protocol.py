"""Request schemas of the OpenAI-compatible endpoints, their validation, and OpenAI-shaped errors.

    body = parse_json(raw_bytes)                       # APIError 400 / 413: malformed, NaN/inf, too big
    req = parse_model(ChatRequest, body)               # APIError 400 naming the field: wrong types
    spec = build_spec(runtime, req, prompt)            # APIError 400: out of range, too long, no value model
    APIError(status, message, param=, code=).body()    # {"error": {"message", "type", "param", "code"}}

The schemas check structure and types only (strict: no "1" for 1, no true for 1); ranges come from the
runtime's own validation (`Sampling`, `LengthTarget`, `Guidance.of`, `Runtime.encode`, `_check_budget`),
so the server accepts exactly what `Runtime.generate` accepts. Unknown fields are ignored, as OpenAI
clients send fields this server does not use; options it cannot honour (echo, best_of, suffix, tools) are
refused with 400 rather than silently dropped.

Log-probabilities: chat `logprobs: true` and completions `logprobs: N` return each generated token's log p
under the policy's own distribution at its step (temperature 1, no filters: the unguided judgement, as
`Generation.token_logprobs`), and with chat `top_logprobs: N` (0-20) or completions `logprobs: N` (0-5) the N
most probable tokens of that distribution (`Generation.top_logprobs`).

Extension fields: `length: {"target": N, "constraint": "equal"|"at_most"|"at_least", "rule":
"strict"|"band"|"soft"}` (N response tokens, EOS not counted), `length_tilt: β`, `top_k`, `min_p`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..config import LengthTarget, Sampling
from ..guidance import Guidance
from ..runtime import MAX_TOP_LOGPROBS, Runtime
from ..tokenizer import IncrementalDecoder, Tokenizer

MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_TOKENS = 256
MAX_N = 16
MAX_STOP = 4
MAX_PREDICT_PROMPTS = 256
MAX_COMPLETION_LOGPROBS = 5  # completions' `logprobs` (OpenAI's limit); chat's top_logprobs goes to 20
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 500: "server_error"}


class APIError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range (numbers must be finite)")
    return value


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; NaN, Infinity and numbers that overflow to inf are refused."""
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body of {len(raw)} bytes exceeds the limit of {MAX_BODY_BYTES} bytes",
                       code="request_too_large")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except UnicodeDecodeError:
        raise APIError(400, "request body is not UTF-8 text", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body nests too deeply", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError, as are the hooks above
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object; got {type(body).__name__}", code="invalid_json")
    return body


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class LengthSpec(_Schema):
    model_config = ConfigDict(extra="forbid", strict=True)
    target: int
    constraint: str = "equal"
    rule: str | None = None  # LengthTarget's default rule


class StreamOptions(_Schema):
    include_usage: bool = False


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class _Common(_Schema):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    length: LengthSpec | None = None
    length_tilt: float | None = None
    logprobs: bool | int | None = None
    best_of: int | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    echo: bool | None = None
    suffix: str | None = None


class PredictRequest(_Schema):
    model: str | None = None
    prompts: list[str | list[int] | list[ChatMessage]]
    raw: bool = False  # text prompts as plain text instead of one user message


def parse_model(schema: type[_Schema], body: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "list[", "str", "int")))
        loc = loc or ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"{loc}: {err['msg']}", param=loc or None, code="invalid_type") from None


def messages_of(messages: list[ChatMessage]) -> list[dict[str, str]]:
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages", code="invalid_value")
    return [{"role": m.role, "content": m.content if isinstance(m.content, str) else
             "".join(p.text for p in m.content)} for m in messages]


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request: what the engine runs, n times (seed + i for choice i)."""

    prompt_ids: list[int]
    max_tokens: int
    samplings: list[Sampling]
    guidance: Guidance | None
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool = False  # return each token's log-probability
    top_logprobs: int = 0  # and this many most probable alternatives at its step


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def encode_prompt(rt: Runtime, prompt: Any, param: str) -> list[int]:
    from jinja2.exceptions import TemplateError

    try:
        return rt.encode(prompt)
    except (ValueError, TypeError, TemplateError) as exc:
        raise _bad(str(exc), param) from None


def _logprobs_asked(req: ChatRequest | CompletionRequest) -> tuple[bool, int]:
    """(whether each token's log p is returned, how many alternatives with it): chat `logprobs: true` and
    `top_logprobs: N`, completions `logprobs: N` (N alternatives; 0 for the chosen tokens alone)."""
    value = req.logprobs
    if isinstance(req, ChatRequest):
        if value is not None and not isinstance(value, bool):
            raise _bad(f"logprobs must be true or false for chat completions; got {value!r}", "logprobs",
                       "invalid_type")
        top = req.top_logprobs or 0
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise _bad(f"top_logprobs must lie in [0, {MAX_TOP_LOGPROBS}]; got {top}", "top_logprobs")
        if top and not value:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        return bool(value), top
    if value is None or value is False:
        return False, 0
    if value is True:
        raise _bad("logprobs must be an integer for completions (N: each token's log p and the N most probable "
                   "alternatives)", "logprobs", "invalid_type")
    if not 0 <= value <= MAX_COMPLETION_LOGPROBS:
        raise _bad(f"logprobs must lie in [0, {MAX_COMPLETION_LOGPROBS}] for completions; got {value}", "logprobs")
    return True, value


def build_spec(rt: Runtime, req: ChatRequest | CompletionRequest, prompt: Any, param: str) -> GenerationSpec:
    """Validate everything a generation request asks for, with the runtime's own checks."""
    logprobs, top_logprobs = _logprobs_asked(req)
    unsupported = {"best_of": req.best_of not in (None, 1),
                   "echo": bool(getattr(req, "echo", None)), "suffix": bool(getattr(req, "suffix", None)),
                   "tools": bool(getattr(req, "tools", None))}
    for name, refused in unsupported.items():
        if refused:
            raise _bad(f"{name} is not supported by this server", name, "unsupported_parameter")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise _bad(f"n must lie in [1, {MAX_N}]; got {n}", "n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise _bad(f"stop must be at most {MAX_STOP} non-empty strings; got {req.stop!r}", "stop")
    try:
        samplings = [Sampling(temperature=1.0 if req.temperature is None else req.temperature,
                              top_k=req.top_k, top_p=1.0 if req.top_p is None else req.top_p,
                              min_p=0.0 if req.min_p is None else req.min_p,
                              seed=None if req.seed is None else req.seed + i) for i in range(n)]
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        raise _bad(str(exc), field if field in ("temperature", "top_k", "top_p", "min_p", "seed") else None) from None
    length = None
    if req.length is not None:
        try:
            length = LengthTarget(req.length.constraint, req.length.target, req.length.rule)
        except ValueError as exc:
            raise _bad(str(exc), "length") from None
    try:
        guidance = rt._guidances(length, req.length_tilt, 1)[0]
    except ValueError as exc:
        param = "length" if length is not None and req.length_tilt is None else "length_tilt"
        raise _bad(str(exc).replace("call load(..., value_model=...)", "start the server with --value-model"),
                   param) from None
    ids = encode_prompt(rt, prompt, param)
    max_tokens = req.max_tokens
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    room = rt.max_context - len(ids)
    if max_tokens is None:
        if room < 1:
            raise _bad(f"prompt ({len(ids)} tokens) leaves no room in the context of {rt.max_context} tokens",
                       param, "context_length_exceeded")
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    try:
        rt._check_budget(len(ids), max_tokens)
    except ValueError as exc:
        over = "exceeds the context" in str(exc)
        raise _bad(str(exc).replace("max_new_tokens", "max_tokens"), "max_tokens",
                   "context_length_exceeded" if over else "invalid_value") from None
    opts = req.stream_options
    return GenerationSpec(ids, max_tokens, samplings, guidance, stop, bool(req.stream),
                          bool(opts and opts.include_usage), logprobs, top_logprobs)


class TextAssembler:
    """Detokenizes one choice and applies its stop strings, holding back text that may start one."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.token_texts: list[str] = []  # the text each pushed token completed ("" mid-character, for EOS)
        self.token_starts: list[int] = []  # where each token's text starts in `text`

    def push(self, token_id: int) -> str:
        """The new text safe to send; sets `stopped` (and cuts the text) when a stop string appears."""
        self.token_starts.append(len(self.text))
        self.token_texts.append(self._decoder.push(token_id))
        return self._append(self.token_texts[-1])

    def flush(self) -> str:
        """At the end of the choice: all text not sent yet, the decoder's incomplete tail included (it joins the
        last token's text)."""
        tail = self._decoder.finish()
        if tail and self.token_texts:
            self.token_texts[-1] += tail
        piece = self._append(tail)
        if self.stopped:
            return piece
        rest, self.sent = self.text[self.sent:], len(self.text)
        return piece + rest

    def _append(self, decoded: str) -> str:
        self.text += decoded
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self._stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
            self.text = self.text[:end]
        else:
            end = max(self.sent, len(self.text) - self._hold)
        piece, self.sent = self.text[self.sent:end], end
        return piece
