"""One call through the gateway: its session, its wait for admission, its turn, its forwarding.

A plain call waits for admission before it is answered (429 at once when the queue is full, 503
past the deadline). A stream whose session must wait is answered at once with server-sent
events: keep-alive comments while it waits, then the upstream's events, or an error event (as
the embedded server does), so clients and proxies do not time out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from mars.control.admission import Overloaded
from mars.core.request import Request as Call
from mars.gateway.control import Control
from mars.gateway.proxy import Extras, Proxy
from mars.server.disconnect import unless_gone
from mars.server.protocol import APIError, ChatRequest, CompletionRequest, _Body
from mars.server.responses import Activity, overloaded
from mars.server.sessions import chat_opening, func_calls, is_last_step, session_of


@runtime_checkable
class _Leveled(Protocol):
    """A policy with queue levels, lower first (mars, autellix): vLLM's priority order."""

    def level(self, req: Call) -> int: ...


@dataclass(frozen=True)
class CallInfo:
    """What the gateway reads from a validated body before forwarding it."""

    path: str  # /v1/chat/completions or /v1/completions
    opening: Any  # what a session fingerprint hashes when the call names no session
    prompt_tokens: int  # estimated
    max_tokens: int | None

    @staticmethod
    def chat(body: ChatRequest) -> CallInfo:
        tokens = len(json.dumps(body.messages, default=str)) // 4
        limit = body.max_completion_tokens or body.max_tokens
        return CallInfo("/v1/chat/completions", chat_opening(body.messages), tokens, limit)

    @staticmethod
    def completion(body: CompletionRequest) -> CallInfo:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            opening: Any = prompt[:64]
            tokens = len(prompt)
        else:
            text = prompt if isinstance(prompt, str) else "".join(map(str, prompt))
            opening, tokens = text[:256], len(text) // 4
        return CallInfo("/v1/completions", opening, tokens, body.max_tokens)


class Calls:
    def __init__(
        self, control: Control, proxy: Proxy, activity: Activity, keepalive_s: float
    ) -> None:
        self.control, self.proxy, self.activity = control, proxy, activity
        self.keepalive_s = keepalive_s

    async def handle(self, body: _Body, request: Request, info: CallInfo) -> Response:
        """Answer the call; a plain call whose client disconnects is cancelled (and so its
        upstream request: the upstream sees the disconnect and aborts it)."""
        if body.stream:  # Starlette cancels a stream whose client left
            return await self._handle(body, request.headers, info)
        answer = await unless_gone(request, self._handle(body, request.headers, info))
        return Response(status_code=499) if answer is None else answer  # 499: nobody listens

    async def _handle(self, body: _Body, headers: Mapping[str, str], info: CallInfo) -> Response:
        sid = session_of(body, headers, info.opening)
        extras = Extras(sid, is_last_step(body, headers), *func_calls(body, headers))
        try:
            waiting = self.control.arrive(sid, info.prompt_tokens)
        except Overloaded as e:
            raise overloaded(e) from None
        if waiting is not None and body.stream:
            return self._waiting_stream(waiting, body, extras, info)
        if waiting is not None:
            try:
                await asyncio.shield(waiting)
            except Overloaded as e:
                raise overloaded(e) from None
            except asyncio.CancelledError:
                self.control.leave(sid)
                raise
        return await self._forward(body, extras, info)

    async def _forward(self, body: _Body, extras: Extras, info: CallInfo) -> Response:
        sid = extras.session_id
        session = self.control.sessions[sid]
        tokens, limit = info.prompt_tokens, info.max_tokens or 256
        turn = self.control.begin_turn(session, tokens, limit, extras.last_func_call)
        policy = self.control.policy
        if isinstance(policy, _Leveled):
            # The level the call starts at (under mars: a session's continuation 0, a new
            # session's first call 1); vLLM fixes a priority at arrival.
            extras = replace(extras, priority=policy.level(turn))
        self.activity.begin(sid)
        finished = False

        def done(usage: dict[str, Any] | None, ok: bool) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            self.activity.end(sid)
            self.control.end_turn(session, turn, usage)
            # A session whose first call failed holds nothing upstream: it does not stay.
            if (ok and extras.is_last_step) or (not ok and len(session.turns) == 1):
                self.control.end(sid)
                self.activity.forget(sid)

        try:
            payload = body.model_dump(exclude_unset=True)
            return (await self.proxy.forward(info.path, payload, extras, done)).response
        except BaseException:
            done(None, False)
            raise

    def _waiting_stream(
        self, waiting: asyncio.Future[None], body: _Body, extras: Extras, info: CallInfo
    ) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            admitted = False
            try:
                while not waiting.done():
                    done, _ = await asyncio.wait({waiting}, timeout=self.keepalive_s)
                    if not done:
                        yield b": keep-alive\n\n"
                waiting.result()
                admitted = True
                response = await self._forward(body, extras, info)
            except Overloaded as e:
                yield _error_event(overloaded(e).body())
                return
            except APIError as e:
                yield _error_event(e.body())
                return
            finally:
                if not admitted:
                    self.control.leave(extras.session_id)  # a client that left while queued
            if isinstance(response, StreamingResponse):
                async for chunk in response.body_iterator:
                    yield chunk.encode() if isinstance(chunk, str) else bytes(chunk)
            else:  # the upstream answered an error status: tell it in the stream
                try:
                    error = json.loads(bytes(response.body))
                except ValueError:
                    error = {"error": {"message": bytes(response.body).decode(errors="replace")}}
                yield _error_event(error)

        headers = {"X-Session-ID": extras.session_id, "Cache-Control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _error_event(error: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
