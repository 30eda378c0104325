"""The OpenAI-compatible HTTP front of the embedded engine: routes, validation, streaming.

Only HTTP lives here: scheduling is the engine's (`mars.engine.live`), session identity and
markers are `sessions.py`'s, function calling is `toolcalls.py`'s.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mars.engine.live import Chunk, LiveEngine
from mars.engine.sampling import SamplingParams
from mars.server import toolcalls
from mars.server.protocol import APIError, ChatRequest, CompletionRequest, _Body, error_response
from mars.server.sessions import func_calls, is_last_step, session_of

MAX_BODY_BYTES = 4 << 20
MODEL_ALIASES = ("default", "mars")


@dataclass
class ServerConfig:
    api_key: str | None = None
    idle_timeout_s: float = 900.0


@dataclass
class _Prepared:
    session_id: str
    prompt: list[int]
    params: SamplingParams
    last_step: bool
    fns: dict[str, Any]
    mode: str
    last_tool: str | None  # the tool the agent ran since its previous call (a marker)


def create_app(make_engine: Callable[[], LiveEngine], config: ServerConfig) -> FastAPI:
    state: dict[str, Any] = {"last_seen": {}}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = await asyncio.to_thread(make_engine)
        engine.start()
        state["engine"] = engine
        reaper = asyncio.create_task(_reap_idle(state, config.idle_timeout_s))
        try:
            yield
        finally:
            reaper.cancel()
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="mars", lifespan=lifespan)

    def engine() -> LiveEngine:
        eng: LiveEngine = state["engine"]
        if eng.error is not None:
            raise APIError(503, f"the engine stopped: {eng.error}; restart `mars serve`")
        return eng

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            return error_response(
                413, f"request body of {size} bytes exceeds the {MAX_BODY_BYTES} byte limit"
            )
        authorized = request.headers.get("authorization", "") == f"Bearer {config.api_key}"
        if config.api_key and request.url.path != "/health" and not authorized:
            return error_response(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return error_response(400, "the request body is not valid JSON")
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(
            422, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where or None
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.get("/health")
    async def health() -> dict[str, str]:
        eng = state.get("engine")
        return {"status": "ok" if eng is not None and eng.error is None else "starting"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        eng = engine()
        return {
            "object": "list",
            "data": [
                {
                    "id": eng.model.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "mars",
                    "max_model_len": eng.max_context,
                }
            ],
        }

    @app.get("/v1/kv_cache_stats")
    async def kv_cache_stats() -> dict[str, Any]:
        return {"policy": engine().policy_name, **engine().stats()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        stats = engine().stats()
        lines = []
        for key, value in stats.items():
            if isinstance(value, int | float):
                lines.append(f"# TYPE mars_{key} gauge")
                lines.append(f"mars_{key} {value}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str) -> dict[str, Any]:
        engine().end_session(session_id)
        state["last_seen"].pop(session_id, None)
        return {"id": session_id, "object": "session", "deleted": True}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Response:
        eng = engine()
        _check_model(eng, body.model)
        fns, mode = toolcalls.chosen(body.tools, body.tool_choice)
        messages = toolcalls.normalize_messages(body.messages)
        if fns:
            messages = [{"role": "system", "content": toolcalls.system_prompt(fns)}, *messages]
        opening = [m for m in messages if m["role"] in ("system", "user")][:2]
        sid = session_of(body, request.headers, opening)
        try:
            text = eng.model.render_chat(messages, None)
        except Exception as e:  # template errors are the client's messages' fault
            raise APIError(400, f"the messages cannot be rendered: {e}", param="messages") from None
        grammar = toolcalls.grammar(fns) if mode not in ("none", "auto") else None
        prep = _prepare(
            eng,
            body,
            request,
            sid,
            eng.model.tokenize(text),
            body.max_completion_tokens,
            grammar,
            fns,
            mode,
        )
        state["last_seen"][sid] = time.monotonic()
        if body.stream:
            return _sse(_chat_stream(eng, body, prep), eng, prep)
        return JSONResponse(await _chat_full(eng, body, prep))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        eng = engine()
        _check_model(eng, body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = eng.model.tokenize(prompt)
        else:
            tokens = [int(t) for t in prompt]
            if any(t < 0 or t >= eng.model.n_vocab for t in tokens):
                raise APIError(
                    400, f"prompt token ids must be in [0, {eng.model.n_vocab})", param="prompt"
                )
        sid = session_of(body, request.headers, tokens[:64])
        prep = _prepare(eng, body, request, sid, tokens, None, None, {}, "none")
        state["last_seen"][sid] = time.monotonic()
        if body.stream:
            return _sse(_completion_stream(eng, body, prep), eng, prep)
        return JSONResponse(await _completion_full(eng, body, prep))

    return app


def _check_model(eng: LiveEngine, name: str | None) -> None:
    if name is not None and name not in (eng.model.name, *MODEL_ALIASES):
        raise APIError(
            404,
            f"model {name!r} is not served here; use {eng.model.name!r} "
            f"(or {', '.join(MODEL_ALIASES)})",
            param="model",
            code="model_not_found",
        )


def _prepare(
    eng: LiveEngine,
    body: _Body,
    request: Request,
    sid: str,
    prompt: list[int],
    max_completion: int | None,
    grammar: str | None,
    fns: dict[str, Any],
    mode: str,
) -> _Prepared:
    if body.n != 1:
        raise APIError(400, "n must be 1: one choice per request", param="n")
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    room = eng.max_context - len(prompt)
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {len(prompt)} tokens but the context holds "
            f"{eng.max_context}; shorten it or start mars serve with a larger "
            "--kv-tokens",
            param="messages",
            code="context_length_exceeded",
        )
    max_tokens = max_completion if max_completion is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = room
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if len(prompt) + max_tokens > eng.max_context:
        raise APIError(
            400,
            f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) "
            f"exceeds the context of {eng.max_context} tokens; lower max_tokens to "
            f"at most {room}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    xargs = body.vllm_xargs or {}
    stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=tuple(stop),
            min_tokens=int(xargs.get("min_tokens", body.min_tokens)),
            ignore_eos=bool(xargs.get("ignore_eos", body.ignore_eos)),
            grammar=grammar,
        )
    except ValueError as e:
        raise APIError(400, str(e)) from None
    _, last_tool = func_calls(body, request.headers)
    return _Prepared(sid, prompt, params, is_last_step(body, request.headers), fns, mode, last_tool)


async def _generate(eng: LiveEngine, prep: _Prepared) -> AsyncIterator[Chunk]:
    try:
        async for chunk in eng.generate(
            prep.session_id, prep.prompt, prep.params, tool_name=prep.last_tool
        ):
            yield chunk
    except ValueError as e:
        raise APIError(400, str(e)) from None
    finally:
        if prep.last_step:
            eng.end_session(prep.session_id)


def _usage(last: Chunk) -> dict[str, Any]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
    }


def _finish_reason(last: Chunk, calls: list[dict[str, Any]] | None) -> str:
    if calls:
        return "tool_calls"
    return "length" if last.finish_reason == "length" else "stop"


async def _collect(eng: LiveEngine, prep: _Prepared) -> tuple[str, Chunk]:
    text, last = "", None
    async for chunk in _generate(eng, prep):
        text += chunk.text
        last = chunk
    assert last is not None and last.finish_reason is not None
    if last.finish_reason == "abort":
        raise APIError(
            503, "the request was aborted by the engine; retry", headers={"Retry-After": "1"}
        )
    return text, last


async def _chat_full(eng: LiveEngine, body: ChatRequest, prep: _Prepared) -> dict[str, Any]:
    text, last = await _collect(eng, prep)
    # A forced call cut short by max_tokens is returned as text with finish_reason "length",
    # as OpenAI does with truncated arguments.
    calls = toolcalls.parse(text, prep.fns) if prep.fns else None
    message: dict[str, Any] = {"role": "assistant", "content": None if calls else text}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": eng.model.name,
        "session_id": prep.session_id,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(last, calls),
            }
        ],
        "usage": _usage(last),
    }


async def _completion_full(
    eng: LiveEngine, body: CompletionRequest, prep: _Prepared
) -> dict[str, Any]:
    text, last = await _collect(eng, prep)
    return {
        "id": "cmpl-" + uuid.uuid4().hex,
        "object": "text_completion",
        "created": int(time.time()),
        "model": eng.model.name,
        "session_id": prep.session_id,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": _finish_reason(last, None),
            }
        ],
        "usage": _usage(last),
    }


async def _chat_stream(
    eng: LiveEngine, body: ChatRequest, prep: _Prepared
) -> AsyncIterator[dict[str, Any]]:
    base = {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": eng.model.name,
    }
    yield {
        **base,
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        ],
    }
    buffered = prep.fns  # a call must be whole before it can be parsed: send it at the end
    text, last = "", None
    async for chunk in _generate(eng, prep):
        last = chunk
        text += chunk.text
        if chunk.text and not buffered:
            yield {
                **base,
                "choices": [{"index": 0, "delta": {"content": chunk.text}, "finish_reason": None}],
            }
    assert last is not None
    calls = toolcalls.parse(text, prep.fns) if prep.fns else None
    delta: dict[str, Any] = {}
    if calls:
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
    elif buffered and text:
        delta["content"] = text
    yield {
        **base,
        "choices": [{"index": 0, "delta": delta, "finish_reason": _finish_reason(last, calls)}],
    }
    if (body.stream_options or {}).get("include_usage"):
        yield {**base, "choices": [], "usage": _usage(last)}


async def _completion_stream(
    eng: LiveEngine, body: CompletionRequest, prep: _Prepared
) -> AsyncIterator[dict[str, Any]]:
    base = {
        "id": "cmpl-" + uuid.uuid4().hex,
        "object": "text_completion",
        "created": int(time.time()),
        "model": eng.model.name,
    }
    last = None
    async for chunk in _generate(eng, prep):
        last = chunk
        if chunk.text:
            yield {**base, "choices": [{"index": 0, "text": chunk.text, "finish_reason": None}]}
    assert last is not None
    yield {
        **base,
        "choices": [{"index": 0, "text": "", "finish_reason": _finish_reason(last, None)}],
    }
    if (body.stream_options or {}).get("include_usage"):
        yield {**base, "choices": [], "usage": _usage(last)}


def _sse(
    events: AsyncIterator[dict[str, Any]], eng: LiveEngine, prep: _Prepared
) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n".encode()
        except APIError as e:
            err = {
                "error": {
                    "message": e.message,
                    "type": "invalid_request_error",
                    "param": e.param,
                    "code": e.code,
                }
            }
            yield f"data: {json.dumps(err)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    headers = {"X-Session-ID": prep.session_id, "Cache-Control": "no-cache"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _reap_idle(state: dict[str, Any], timeout_s: float) -> None:
    """End sessions that have sent nothing for `timeout_s` (their KV would linger otherwise)."""
    while True:
        await asyncio.sleep(min(10.0, timeout_s / 2))
        now = time.monotonic()
        seen: dict[str, float] = state["last_seen"]
        for sid, t in list(seen.items()):
            if now - t > timeout_s:
                del seen[sid]
                state["engine"].end_session(sid)
