"""The HTTP front of a Ray app: the OpenAI routes of `mars serve`, admitted by the control actor,
answered by the session's engine replica.

Ray Serve's proxy routes a request to a deployment before reading its body, so it cannot route by
session: this ingress deployment reads the body (validated with the embedded server's request
models), names the session (`mars.server.sessions`, the rules `mars serve` applies, so the
replica names it the same), waits for the session's admission by the control actor, and calls
the engine deployment with `session_id=`, which `MarsRequestRouter` routes by. A stream whose
session must wait gets keep-alive comments meanwhile, as from `mars serve`.

The client's body and headers go to the replica unchanged. Session routes (`DELETE` and the
tools API under `/v1/sessions/{id}`, `/v1/events?session_id=`) go to the session's replica.

A replica that dies while it answers fails the calls it held with a clear 502 (an error event
in a stream); the session's next call goes to a live replica, where it is prefilled again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mars.gateway.calls import CallInfo
from mars.gateway.proxy import answer_usage, stream_usage
from mars.ray.control import NAME, NAMESPACE
from mars.server.app import _Guard, install_error_handlers
from mars.server.disconnect import unless_gone
from mars.server.metrics import CONTENT_TYPE
from mars.server.protocol import APIError, ChatRequest, CompletionRequest, _Body
from mars.server.sessions import func_calls, is_last_step, session_of
from mars.server.tenants import Keys

log = logging.getLogger("mars.ray")


@dataclass(frozen=True)
class FrontConfig:
    app_name: str = "mars"
    engine: str = "MarsEngine"  # the engine deployment's name
    api_key: str | None = None
    keepalive_s: float = 10.0


class _Died(Exception):
    """The replica answering the call died."""


def create_front(config: FrontConfig) -> FastAPI:
    import ray
    from ray import serve

    control = ray.get_actor(NAME, namespace=NAMESPACE)
    engine = serve.get_deployment_handle(config.engine, app_name=config.app_name)
    app = FastAPI(title="mars on Ray Serve")
    app.add_middleware(_Guard, keys=Keys({config.api_key: False}) if config.api_key else None)
    install_error_handlers(app)

    async def relay(
        request: Request, sid: str | None, path: str | None = None, body: bytes | None = None
    ) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
        """Call the engine deployment (routed by `sid`): its status, headers and bytes."""
        raw = await request.body() if body is None else body
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        call = engine.options(stream=True).forward
        gen: Any = call.remote(
            request.method,
            path or request.url.path,
            request.url.query,
            raw,
            headers,
            session_id=sid,
        )
        try:
            head = await gen.__anext__()
        except Exception as e:
            gen.cancel()
            raise _died(e, sid) from None

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in gen:
                    yield chunk
            except Exception as e:
                raise _Died(_died(e, sid).message) from None
            finally:
                gen.cancel()

        headers = {**head["headers"], "X-MARS-Replica": head["replica"]}
        return head["status"], headers, rest()

    async def whole(status: int, headers: dict[str, str], chunks: AsyncIterator[bytes]) -> Response:
        content = b"".join([c async for c in chunks])
        return Response(content, status, headers=_kept(headers))

    async def call(body: _Body, request: Request, info: CallInfo) -> Response:
        sid = session_of(body, request.headers, info.opening)
        last = is_last_step(body, request.headers)
        tool = func_calls(body, request.headers)[1]
        tokens, limit, path = info.prompt_tokens, info.max_tokens or 256, info.path
        admission = await control.arrive.remote(sid, tokens)
        _check(admission)

        async def turn() -> tuple[int, dict[str, str], AsyncIterator[bytes], str]:
            turn_id = await control.begin.remote(sid, tokens, limit, tool)
            if turn_id is None:
                raise APIError(503, "the session ended while it waited; retry", code="ended")
            try:
                status, headers, chunks = await relay(request, sid, path)
            except BaseException:
                await control.finish.remote(turn_id, None, False, last)
                raise
            return status, headers, chunks, turn_id

        async def finished(turn_id: str, ok: bool, tail: bytes) -> None:
            await control.finish.remote(turn_id, _usage(tail), ok, last)

        if not body.stream:

            async def plain() -> Response:
                while admission.get("queued"):
                    _check(admitted := await control.wait.remote(sid, 30.0))
                    if admitted.get("admitted"):
                        break
                status, headers, chunks, turn_id = await turn()
                ok = False
                content = b""
                try:
                    content = b"".join([c async for c in chunks])
                    ok = status < 400
                except _Died as e:
                    raise APIError(502, str(e), code="replica_died") from None
                finally:
                    await finished(turn_id, ok, content)
                return Response(content, status, headers=_kept(headers))

            answer = await unless_gone(request, plain())
            if answer is None:
                await control.leave.remote(sid)
                return Response(status_code=499)
            return answer

        async def events() -> AsyncIterator[bytes]:
            state = admission
            try:
                while state.get("queued"):
                    yield b": keep-alive\n\n"
                    state = await control.wait.remote(sid, config.keepalive_s)
                _check(state)
                status, _, chunks, turn_id = await turn()
            except APIError as e:
                await control.leave.remote(sid)
                yield _error_event(e.body())
                return
            tail, ok = b"", False
            try:
                async for chunk in chunks:
                    tail = (tail + chunk)[-16384:]
                    yield chunk
                ok = status < 400
            except _Died as e:
                error = APIError(502, str(e), code="replica_died", headers={"Retry-After": "1"})
                yield _error_event(error.body())
            finally:
                # A client that left: the replica's call is cancelled, not run to its end.
                await cast(AsyncGenerator[bytes, None], chunks).aclose()
                await finished(turn_id, ok, tail)

        headers = {"X-Session-ID": sid, "Cache-Control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await call(body, request, CallInfo.chat(body))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await call(body, request, CallInfo.completion(body))

    @app.get("/health")
    async def health() -> JSONResponse:
        state = await control.state.remote()
        up = [r for r in state["replicas"] if r["up"]]
        body = {"status": "ok" if up else "no replica is up", "replicas": state["replicas"]}
        return JSONResponse(body, 200 if up else 503)

    @app.get("/v1/upstreams")
    async def replicas() -> dict[str, Any]:
        """The control plane's view: replicas, where each session is, the window."""
        state: dict[str, Any] = await control.state.remote()
        return {"object": "list", "data": state.pop("replicas"), **state}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await control.exposition.remote(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await whole(*await relay(request, None))

    @app.get("/v1/events")
    async def event_stream(request: Request, session_id: str | None = None) -> Response:
        if session_id is None:
            raise APIError(
                400,
                "on a Ray app each replica has its own event stream: give ?session_id= to "
                "follow one session's (GET /v1/upstreams lists the sessions)",
                code="session_required",
            )
        status, headers, chunks = await relay(request, session_id)
        media = headers.get("content-type", "text/event-stream")
        return StreamingResponse(_quiet(chunks), status, headers=_kept(headers), media_type=media)

    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str, request: Request) -> Response:
        placed = await control.end.remote(session_id)
        if placed is not None:  # its replica ends it there too
            try:
                await whole(*await relay(request, session_id))
            except APIError as e:
                log.warning("ending %s on its replica failed: %s", session_id, e.message)
        return JSONResponse({"id": session_id, "object": "session", "deleted": True})

    @app.api_route(
        "/v1/sessions/{session_id}/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"]
    )
    async def session_route(session_id: str, rest: str, request: Request) -> Response:
        """The tools API and the other session routes: on the session's replica."""
        status, headers, chunks = await relay(request, session_id)
        if "text/event-stream" in headers.get("content-type", ""):
            return StreamingResponse(_quiet(chunks), status, headers=_kept(headers))
        return await whole(status, headers, chunks)

    return app


def _died(e: Exception, sid: str | None) -> APIError:
    """What the client hears when the call's replica failed."""
    what = f"session {sid}'s" if sid else "the"
    return APIError(
        502,
        f"{what} engine replica failed while it answered ({type(e).__name__}); retry: the "
        "session's next call goes to a live replica, which prefills it again",
        code="replica_died",
        headers={"Retry-After": "1"},
    )


def _check(admission: dict[str, Any]) -> None:
    if "error" in admission:
        status, retry = admission["error"], admission["retry"]
        code = "queue_full" if status == 429 else "admission_timeout"
        headers = {"Retry-After": str(retry)}
        raise APIError(status, admission["message"], code=code, headers=headers)


async def _quiet(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A relayed stream that ends, rather than raises, when its replica dies."""
    try:
        async for chunk in chunks:
            yield chunk
    except _Died:
        return


def _kept(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in ("content-length", "server")}


def _usage(tail: bytes) -> dict[str, Any] | None:
    """The usage in a whole answer, or in a stream's last event that has one."""
    return answer_usage(tail) or stream_usage(tail)


def _error_event(error: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
