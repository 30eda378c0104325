"""The OpenAI-compatible HTTP front of the embedded engine: routes, validation, streaming.

Only HTTP lives here: scheduling is the engine's (`mars.engine.live`), request bodies and sampling
values are `protocol.py`'s, session identity and markers `sessions.py`'s, function calling
`toolcalls.py`'s. A client that goes away cancels its request: streams through Starlette's
disconnect listener, plain requests through `_unless_gone`; either way the engine aborts it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mars.engine.live import LiveEngine
from mars.server import toolcalls
from mars.server.dashboard import PAGES, dashboard_router, server_gauges
from mars.server.disconnect import unless_gone
from mars.server.eventstream import EventStream
from mars.server.metrics import CONTENT_TYPE, ServerMetrics
from mars.server.owners import Owners, tenant_of
from mars.server.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    _Body,
    error_response,
    sampling_params,
)
from mars.server.recorder import TraceRecorder
from mars.server.responses import (
    Activity,
    Call,
    accepted,
    chat_full,
    chat_stream,
    completion_full,
    completion_stream,
    sse,
)
from mars.server.sessions import HEADERS, chat_opening, func_calls, is_last_step, session_of
from mars.server.tenants import SCOPE_KEY, Keys, Tenant
from mars.server.tools_api import tools_router
from mars.tools.runtime import ToolRuntime

MAX_BODY_BYTES = 4 << 20
MODEL_ALIASES = ("default", "mars")
log = logging.getLogger("mars.server")
access_log = logging.getLogger("mars.server.access")
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\])$")


@dataclass
class ServerConfig:
    keys: Keys | None = None  # --api-key, --api-keys-file: one tenant per key (None: no keys)
    idle_timeout_s: float = 900.0
    keepalive_s: float = 10.0  # SSE comment interval while a stream has nothing to send
    events: EventStream | None = None  # the event stream (a JSONL file with --events)
    recorder: TraceRecorder | None = None  # --record-trace
    tools: ToolRuntime | None = None  # the tools API (None: off, the routes answer 501)
    # --served-model-name: the names clients may ask for (default: the model file's name)
    model_names: tuple[str, ...] = ()
    # Set when the server starts to shut down (SIGTERM, Ctrl-C): streams end with an error.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


class _Guard:
    """Pure ASGI middleware (it must not buffer streams): the API key, resolved to its tenant
    (put in the scope under `SCOPE_KEY` for the routes), then the body size limit."""

    def __init__(self, app: ASGIApp, keys: Keys | None) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        # The dashboard's static page and script hold no data: the page asks for the key.
        if self.keys is not None and scope["path"] not in ("/health", *PAGES):
            tenant = self.keys.resolve(headers.get(b"authorization", b""))
            if tenant is None:
                reply = error_response(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                return await reply(scope, receive, send)
            scope[SCOPE_KEY] = tenant
        size = headers.get(b"content-length", b"")
        if size.isdigit() and int(size) > MAX_BODY_BYTES:
            return await error_response(413, _too_large(int(size)))(scope, receive, send)
        seen = 0

        async def counted() -> Message:  # chunked uploads have no content-length
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise HTTPException(413, _too_large(seen))  # FastAPI lets this one through
            return message

        await self.app(scope, counted, send)


class _AccessLog:
    """One log line per request when it ends: method, path, status, session, seconds (logger
    `mars.server.access`; `mars serve` prints it). Pure ASGI: streams pass through as they go."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/health", "/metrics"):
            return await self.app(scope, receive, send)
        t0, status, session = time.monotonic(), 0, "-"

        async def watched(message: Message) -> None:
            nonlocal status, session
            if message["type"] == "http.response.start":
                status = message["status"]
                for key, value in message.get("headers", ()):
                    if key.lower() == b"x-session-id":
                        session = value.decode(errors="replace")
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            if session == "-":  # refused before its session was known: the one its headers name
                named = dict(scope.get("headers", ()))
                ids = [named[h.encode()] for h in HEADERS if h.encode() in named]
                session = "~".join(dict.fromkeys(i.decode(errors="replace") for i in ids)) or "-"
            tenant: Tenant | None = scope.get(SCOPE_KEY)  # set by the guard, inside this one
            access_log.info(
                "%s %s %s session=%s %.2fs%s",
                scope["method"],
                scope["path"],
                status or "-",
                session,
                time.monotonic() - t0,
                f" tenant={tenant.name}" if tenant is not None else "",
            )


def _too_large(size: int) -> str:
    return f"the request body ({size}+ bytes) exceeds the limit of {MAX_BODY_BYTES} bytes"


def create_app(make_engine: Callable[[], LiveEngine], config: ServerConfig) -> FastAPI:
    state: dict[str, Any] = {}
    activity = Activity()
    owners = Owners()
    events = config.events or EventStream()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = await asyncio.to_thread(make_engine)
        eng.bus.subscribe_all(events)
        state["metrics"] = ServerMetrics(eng.stats, names(eng)[0], eng.policy_name, eng.max_context)
        eng.bus.subscribe_all(state["metrics"])
        if config.recorder is not None:
            eng.session_end_hooks.append(config.recorder)
        eng.start()
        state["engine"] = eng
        reaper = asyncio.create_task(_reap_idle(end, activity, config.idle_timeout_s))
        try:
            yield
        finally:
            reaper.cancel()
            if config.tools is not None:
                await config.tools.close()  # kills running tools, removes the workspaces
            await asyncio.to_thread(eng.shutdown)
            events.close()
            if config.recorder is not None:
                config.recorder.close()

    app = FastAPI(title="mars", lifespan=lifespan)
    app.add_middleware(_Guard, keys=config.keys)
    app.add_middleware(_AccessLog)  # outermost: refusals by the guard are logged too
    app.include_router(tools_router(lambda: config.tools, activity, owners))

    def end(session_id: str) -> None:
        """End a session: its KV in the engine, its workspace and tools (a session that only
        ran tools is unknown to the engine)."""
        state["engine"].end_session(session_id)
        if config.tools is not None:
            _background(config.tools.end_session(session_id))
        owners.end(session_id)

    def engine() -> LiveEngine:
        eng: LiveEngine = state["engine"]
        if eng.error is not None:
            raise APIError(503, f"the engine stopped: {eng.error}; restart `mars serve`")
        return eng

    install_error_handlers(app)
    app.include_router(dashboard_router(lambda: server_gauges(engine(), config.tools)))

    @app.get("/health")
    async def health() -> JSONResponse:
        eng = state.get("engine")
        if eng is None or eng.error is not None:
            status = "starting" if eng is None else f"error: {eng.error}"
            return JSONResponse({"status": status}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        eng = engine()
        return {"object": "list", "data": [card(eng, name) for name in names(eng)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        eng = engine()
        _check_model(eng, model_id, names(eng))
        return card(eng, model_id)

    def names(eng: LiveEngine) -> tuple[str, ...]:
        return config.model_names or (eng.model.name,)

    def card(eng: LiveEngine, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "mars",
            "root": eng.model.name,
            "max_model_len": eng.max_context,
        }

    @app.get("/v1/kv_cache_stats")
    async def kv_cache_stats() -> dict[str, Any]:
        eng = engine()
        return {"policy": eng.policy_name, **eng.stats()}

    @app.get("/metrics")
    async def metrics() -> Response:
        engine()
        return Response(state["metrics"].exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/events")
    async def event_stream(request: Request, session_id: str | None = None) -> StreamingResponse:
        """Server-sent events: every event from now on (one session's with ?session_id=); a
        tenant's only those of its own sessions, and those that carry none (system gauges)."""
        engine()
        tenant = tenant_of(request)
        if session_id is not None:
            owners.check(tenant, session_id)
        if tenant is None or tenant.admin:
            return events.sse(session_id, config.keepalive_s)
        seen = tenant  # narrowed for the closure

        def visible(sid: str) -> bool:
            return not sid or owners.sees(seen, sid)

        return events.sse(session_id, config.keepalive_s, visible)

    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str, request: Request) -> dict[str, Any]:
        engine()
        owners.check(tenant_of(request), session_id)
        end(session_id)
        activity.forget(session_id)
        return {"id": session_id, "object": "session", "deleted": True}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Response:
        eng = engine()
        _check_model(eng, body.model, names(eng))
        fns, mode = toolcalls.chosen(body.tools, body.tool_choice)
        text, contents = toolcalls.render(eng.model, body.messages, fns)
        # ~1 s for a 4 MiB body
        prompt = await asyncio.to_thread(eng.model.tokenize_chat, text, contents)
        grammar = toolcalls.grammar(fns) if mode not in ("none", "auto") else None
        extra = body.model_extra or {}
        grammar = grammar or toolcalls.output_grammar(
            extra.get("response_format"), extra.get("guided_json")
        )
        tenant = tenant_of(request)
        sid = session_of(body, request.headers, chat_opening(body.messages), _salt(tenant))
        call = _call(eng, body, request, sid, prompt, body.max_completion_tokens, grammar, fns)
        call.forced = mode not in ("none", "auto")
        call.parallel = body.parallel_tool_calls is not False
        owners.claim(tenant, sid)  # once the call is valid: a refused one owns nothing
        call.activity = activity
        if body.stream:
            chunks = await accepted(eng, call)
            out = chat_stream(eng, body, call, chunks)
            return sse(out, call, config.keepalive_s, config.stopping)
        return await _unless_gone(request, chat_full(eng, body, call))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        eng = engine()
        _check_model(eng, body.model, names(eng))
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = await asyncio.to_thread(eng.model.tokenize, prompt)
        else:
            tokens = [int(t) for t in prompt]
            if any(t < 0 or t >= eng.model.n_vocab for t in tokens):
                raise APIError(
                    400, f"prompt token ids must be in [0, {eng.model.n_vocab})", param="prompt"
                )
        if not tokens:
            raise APIError(400, "the prompt is empty", param="prompt")
        tenant = tenant_of(request)
        sid = session_of(body, request.headers, tokens[:64], _salt(tenant))
        call = _call(eng, body, request, sid, tokens, None, None, {})
        owners.claim(tenant, sid)
        call.activity = activity
        if body.stream:
            chunks = await accepted(eng, call)
            out = completion_stream(eng, body, call, chunks)
            return sse(out, call, config.keepalive_s, config.stopping)
        return await _unless_gone(request, completion_full(eng, body, call))

    return app


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-style error bodies for every failure (shared by the server and the gateway)."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return error_response(400, "the request body is not valid JSON")
        first = errors[0] if errors else {}
        # Drop "body" and pydantic's union-branch tags ("str", "list[int]") from the location.
        loc = [p for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
        where = ".".join(str(p) for p in loc)
        return error_response(
            422, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where or None
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400 and "parsing the body" in str(e.detail):
            return error_response(400, "the request body could not be read as JSON")
        return error_response(e.status_code, f"{e.detail}")

    @app.exception_handler(Exception)
    async def crashed(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}")


def _salt(tenant: Tenant | None) -> str | None:
    """What salts a fingerprint session id: the tenant, so that two tenants' conversations
    that open alike are two sessions."""
    return tenant.name if tenant is not None else None


def _check_model(eng: LiveEngine, name: str | None, served: tuple[str, ...]) -> None:
    if name is not None and name not in (*served, eng.model.name, *MODEL_ALIASES):
        raise APIError(
            404,
            f"model {name!r} is not served here; use {' or '.join(map(repr, served))} "
            f"(or {', '.join(MODEL_ALIASES)})",
            param="model",
            code="model_not_found",
        )


def _call(
    eng: LiveEngine,
    body: _Body,
    request: Request,
    sid: str,
    prompt: list[int],
    max_completion: int | None,
    grammar: str | None,
    fns: dict[str, Any],
) -> Call:
    params = sampling_params(body, len(prompt), eng.max_context, max_completion, grammar)
    this_tool, last_tool = func_calls(body, request.headers)
    last = is_last_step(body, request.headers)
    call = Call(sid, prompt, params, last, last_tool, this_tool, fns)
    # KV is shared across sessions only within one tenant (and one `cache_salt`): another
    # tenant's `cached_tokens` would tell what this one's prompts begin with.
    tenant = tenant_of(request)
    call.salt = f"{tenant.name if tenant else ''}|{body.cache_salt or ''}"
    return call


async def _unless_gone(request: Request, work: Awaitable[dict[str, Any]]) -> Response:
    """Run `work`, cancelling it (and so aborting the request in the engine) if the client
    disconnects first."""
    try:
        result = await unless_gone(request, work)
    except asyncio.CancelledError:  # the server is shutting down and ran out of patience
        headers = {"Retry-After": "5"}
        return error_response(503, "the server is shutting down; retry", None, "shutdown", headers)
    if result is None:
        return Response(status_code=499)  # nobody is listening any more
    sid = result.get("session_id")
    return JSONResponse(result, headers={"X-Session-ID": sid} if isinstance(sid, str) else None)


async def _reap_idle(end: Callable[[str], None], activity: Activity, timeout_s: float) -> None:
    """End sessions that have sent nothing for `timeout_s` (their KV would linger otherwise)."""
    while True:
        await asyncio.sleep(min(10.0, timeout_s / 2))
        for sid in activity.idle(timeout_s):
            end(sid)


_tasks: set[asyncio.Task[Any]] = set()


def _background(work: Coroutine[Any, Any, Any]) -> None:
    """Run `work` on the loop without waiting for it (kept referenced until done)."""
    task = asyncio.ensure_future(work)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
