"""The FastAPI application of `lenvm-rt serve`, and an in-process launcher for tests and benchmarks.

    app = create_app(engine, model_name)     # the lifespan starts and stops the engine
    with ServerThread(app) as server:        # uvicorn on a free loopback port, in a thread
        server.url                           # "http://127.0.0.1:PORT"

Endpoints: POST /v1/chat/completions, /v1/completions (OpenAI-compatible; `stream: true` answers
server-sent events ending with `data: [DONE]`), POST /v1/length/predict, GET /v1/models, GET /health.
Streamed chunks carry `remaining_tokens` on each choice: the value model's live predicted remaining
length (EOS counted; null without a value model). Every finished choice carries `quality`, the policy's
own judgement of its tokens (`quality.py`: nll in nats per token, mean_rank, mean_prob, repetition_rate, and
the tokens scored), on the streamed chunk with its finish_reason too; with `logprobs` each token's log p
comes back in OpenAI's format (chat: `logprobs.content[]`, each entry's `top_logprobs` holding the step's
most probable tokens when `top_logprobs` asks for them; completions: `tokens`, `token_logprobs`, `text_offset`,
and `top_logprobs` as one {text: log p} per token for `logprobs` > 0). An alternative's `token` is its own
text and its `bytes` the bytes it stands for (a piece of a multi-byte character stays that piece); a chosen
token's `token` is the text it completed, so that the tokens join to the choice's text.
`usage.completion_tokens` counts every generated token, EOS included, up to the one that completed a stop
string; logprobs and quality cover the same tokens. Every error is OpenAI's error JSON with a 4xx (429 when the
engine's queue is full, 503 when it is not running); a client that disconnects frees its rows at the engine's
next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..quality import quality_of_steps
from .engine import Engine, EngineEvent, EngineRequest, EngineStopped, QueueFull
from .protocol import (
    MAX_PREDICT_PROMPTS,
    APIError,
    ChatRequest,
    CompletionRequest,
    GenerationSpec,
    PredictRequest,
    TextAssembler,
    build_spec,
    encode_prompt,
    messages_of,
    parse_json,
    parse_model,
)

DISCONNECT_POLL_S = 0.5


class _Choices:
    """The n engine requests of one HTTP request, their events multiplexed onto one asyncio queue."""

    def __init__(self, engine: Engine, spec: GenerationSpec) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, EngineEvent]] = asyncio.Queue()
        self.requests: list[EngineRequest] = []
        self.spec = spec
        tok = engine.rt.tokenizer
        self.eos_ids = engine.rt.eos_token_ids
        n = len(spec.samplings)
        self.text = [TextAssembler(tok, spec.stop) for _ in range(n)]
        self.ids: list[list[int]] = [[] for _ in range(n)]  # counted tokens of each choice
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.ranks: list[list[int]] = [[] for _ in range(n)]
        self.tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(n)]
        self.tokenizer = tok
        self.reasons: list[str | None] = [None] * n
        try:
            for i, sampling in enumerate(spec.samplings):
                self.requests.append(engine.submit(spec.prompt_ids, spec.max_tokens, sampling, spec.guidance,
                                                   self._sink(i), top_logprobs=spec.top_logprobs))
        except QueueFull as exc:
            self.cancel()
            raise APIError(429, str(exc), code="queue_full") from None
        except EngineStopped as exc:
            self.cancel()
            raise APIError(503, str(exc), code="unavailable") from None

    def _sink(self, index: int):
        def put(event: EngineEvent) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return put

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def apply(self, index: int, ev: EngineEvent) -> tuple[str, str | None]:
        """(new text, finish reason or None) of one event for choice `index`."""
        if self.reasons[index] is not None:
            return "", None  # events after a stop string cut the choice
        piece = ""
        if ev.token_id is not None:
            self.ids[index].append(ev.token_id)
            self.logprobs[index].append(ev.logprob)
            self.ranks[index].append(ev.rank)
            self.tops[index].append(ev.top_logprobs or [])
            piece = self.text[index].push(ev.token_id)
        reason = ev.finish_reason
        if reason is not None and not self.text[index].stopped:
            piece += self.text[index].flush()
        if self.text[index].stopped:
            reason = "stop"
            self.requests[index].cancel()
        if reason == "error":
            raise APIError(503, ev.error or "the request failed", code="unavailable")
        self.reasons[index] = reason
        return piece, reason

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.spec.prompt_ids), sum(map(len, self.ids))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def quality(self, index: int) -> dict[str, float | int] | None:
        """The policy's own judgement of choice `index`'s tokens; None when it has none."""
        if not self.ids[index]:
            return None
        q = quality_of_steps(self.ids[index], self.logprobs[index], self.ranks[index], self.eos_ids)
        return {**q.fields(), "tokens": q.tokens}

    def logprobs_of(self, index: int, chat: bool, start: int = 0) -> dict[str, Any] | None:
        """OpenAI's logprobs object for choice `index`'s tokens from `start` on; None when not asked for."""
        if not self.spec.logprobs:
            return None
        assembler, end = self.text[index], len(self.ids[index])
        texts, logps, tops = assembler.token_texts[start:end], self.logprobs[index][start:], self.tops[index][start:]
        if chat:
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                                 "top_logprobs": [self._alternative(i, alt_lp) for i, alt_lp in top]}
                                for t, lp, top in zip(texts, logps, tops)]}
        alternatives = ([{self._alternative(i, lp)["token"]: lp for i, lp in top} for top in tops]
                        if self.spec.top_logprobs else None)
        return {"tokens": texts, "token_logprobs": logps, "top_logprobs": alternatives,
                "text_offset": assembler.token_starts[start:end]}

    def _alternative(self, token_id: int, logprob: float) -> dict[str, Any]:
        tok = self.tokenizer
        return {"token": tok.token_text(token_id), "logprob": logprob, "bytes": list(tok.token_bytes(token_id))}


def _error(exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The HTTP application over a (not yet started) engine; the app's lifespan runs the engine."""
    rt = engine.rt
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lenvm_rt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:  # a bug; the server keeps serving
        return _error(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    async def body_of(request: Request) -> dict[str, Any]:
        return parse_json(await request.body())

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        active, queued = engine.load()
        return {"status": "ok" if engine.running else "stopped", "model": model_name, "active": active,
                "queued": queued, "max_batch": engine.max_batch, "max_queue": engine.max_queue,
                "value_model": rt.value is not None}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lenvm_rt", "max_model_len": rt.max_context}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = parse_model(ChatRequest, await body_of(request))
        check_model(req.model)
        spec = await asyncio.to_thread(build_spec, rt, req, messages_of(req.messages), "messages")  # tokenizes
        return await _answer(request, spec, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_model(CompletionRequest, await body_of(request))
        check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "prompt: a batch of prompts is not supported; send one request per prompt",
                               param="prompt", code="invalid_value")
            prompt = prompt[0]
        spec = await asyncio.to_thread(build_spec, rt, req, prompt, "prompt")
        return await _answer(request, spec, chat=False)

    @app.post("/v1/length/predict")
    async def predict(request: Request) -> dict[str, Any]:
        req = parse_model(PredictRequest, await body_of(request))
        check_model(req.model)
        if rt.value is None:
            raise APIError(400, "length prediction needs a value model; start the server with --value-model",
                           code="no_value_model")
        if not 1 <= len(req.prompts) <= MAX_PREDICT_PROMPTS:
            raise APIError(400, f"prompts must hold 1 to {MAX_PREDICT_PROMPTS} prompts; got {len(req.prompts)}",
                           param="prompts", code="invalid_value")
        encoded = []
        for i, p in enumerate(req.prompts):
            if isinstance(p, str) and not req.raw:
                p = [{"role": "user", "content": p}]
            elif isinstance(p, list) and p and not isinstance(p[0], int):
                p = messages_of(p)
            ids = encode_prompt(rt, p, f"prompts.{i}")
            if len(ids) > rt.max_context:
                raise APIError(400, f"prompts.{i} ({len(ids)} tokens) exceeds the context of {rt.max_context} "
                               "tokens", param=f"prompts.{i}", code="context_length_exceeded")
            encoded.append(ids)
        try:
            future = engine.call(lambda e: e.predict_lengths(encoded))
        except EngineStopped as exc:
            raise APIError(503, str(exc), code="unavailable") from None
        predicted = await asyncio.wrap_future(future)
        return {"object": "list", "model": model_name, "gamma": rt.gamma,
                "data": [{"index": i, "predicted_tokens": n, "prompt_tokens": len(ids)}
                         for i, (n, ids) in enumerate(zip(predicted, encoded))]}

    async def _answer(request: Request, spec: GenerationSpec, *, chat: bool) -> Response:
        choices = _Choices(engine, spec)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if spec.stream:
            return StreamingResponse(_stream(choices, rid, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        texts = [""] * len(spec.samplings)
        try:
            while not choices.done:
                try:
                    index, ev = await asyncio.wait_for(choices.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        choices.cancel()
                        return Response(status_code=499)
                    continue
                piece, _ = choices.apply(index, ev)
                texts[index] += piece
        except BaseException:
            choices.cancel()
            raise
        out = []
        for i, (text, reason) in enumerate(zip(texts, choices.reasons)):
            content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            out.append({"index": i, **content, "logprobs": choices.logprobs_of(i, chat), "finish_reason": reason,
                        "quality": choices.quality(i)})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": model_name, "choices": out,
                             "usage": choices.usage()})

    async def _stream(choices: _Choices, rid: str, chat: bool) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice_list: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": choice_list,
                    **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def choice(i: int, text: str, reason: str | None, remaining: float | None, role: bool = False,
                   logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
            if chat:
                delta = {"role": "assistant", "content": text} if role else {"content": text}
                body = {"index": i, "delta": delta}
            else:
                body = {"index": i, "text": text}
            body.update(logprobs=logprobs, finish_reason=reason, remaining_tokens=remaining)
            if reason is not None:
                body["quality"] = choices.quality(i)
            return body

        try:
            if chat:
                yield chunk([choice(i, "", None, None, role=True) for i in range(len(choices.reasons))])
            while not choices.done:
                index, ev = await choices.queue.get()
                counted = len(choices.ids[index])
                try:
                    piece, reason = choices.apply(index, ev)
                except APIError as exc:
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    break
                if ev.token_id is not None or reason is not None:
                    remaining = 0.0 if reason == "stop" and ev.remaining is not None else ev.remaining
                    logprobs = (choices.logprobs_of(index, chat, counted) if len(choices.ids[index]) > counted
                                else None)
                    yield chunk([choice(index, piece, reason, remaining, logprobs=logprobs)])
            if choices.spec.include_usage:
                yield chunk([], usage=choices.usage())
            yield "data: [DONE]\n\n"
        finally:
            choices.cancel()  # a client that went away frees its rows at the next step

    return app


class ServerThread:
    """uvicorn serving `app` on host:port (0: a free port) in a background thread; a context manager."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", ws="none", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.host = host
        self._thread = threading.Thread(target=self.server.run, name="lenvm-rt-http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
