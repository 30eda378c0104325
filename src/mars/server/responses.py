"""Turning the engine's output into OpenAI responses: whole bodies, server-sent event streams,
tool calls, usage. `app.py` validates and routes; this module answers."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from mars.control.admission import Overloaded
from mars.engine.live import Chunk, LiveEngine
from mars.engine.logprobs import TokenLogprob
from mars.engine.sampling import SamplingParams
from mars.server import toolcalls
from mars.server.eventstream import Stopping, keepalive
from mars.server.logprobs import StreamLogprobs, whole
from mars.server.protocol import APIError, ChatRequest, CompletionRequest, error_body

log = logging.getLogger("mars.server")


class Activity:
    """When each session was last active; a session with a request in flight is never idle."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.inflight: dict[str, int] = {}

    def begin(self, sid: str) -> None:
        self.inflight[sid] = self.inflight.get(sid, 0) + 1
        self.last[sid] = time.monotonic()

    def end(self, sid: str) -> None:
        self.inflight[sid] -= 1
        if not self.inflight[sid]:
            del self.inflight[sid]
        self.last[sid] = time.monotonic()

    def forget(self, sid: str) -> None:
        self.last.pop(sid, None)

    def idle(self, timeout_s: float) -> list[str]:
        now = time.monotonic()
        out = [s for s, t in self.last.items() if now - t > timeout_s and s not in self.inflight]
        for sid in out:
            del self.last[sid]
        return out


@dataclass
class Call:
    """One validated request, ready for the engine."""

    session_id: str
    prompt: list[int]
    params: SamplingParams
    last_step: bool  # end the session after this turn
    last_tool: str | None  # the tool the agent ran since its previous call (a marker)
    this_tool: str | None  # the tool this call's answer leads to (a marker)
    fns: dict[str, Any]  # functions a reply may call (empty: plain text)
    forced: bool = False  # a grammar makes the reply exactly one call of `fns`
    parallel: bool = True  # several calls in one reply (`parallel_tool_calls`)
    salt: str = ""  # KV is shared across sessions only between calls of one salt
    activity: Activity | None = None  # told when the request starts and ends


async def _generate(eng: LiveEngine, call: Call) -> AsyncGenerator[Chunk, None]:
    if call.activity is not None:
        call.activity.begin(call.session_id)
    try:
        next_tool = None if call.last_step else (call.this_tool or "unknown")
        async for chunk in eng.generate(
            call.session_id, call.prompt, call.params, call.last_tool, next_tool, call.salt
        ):
            if chunk.finish_reason == "abort":
                raise APIError(
                    503,
                    "the engine aborted the request (its session was ended, or the batch "
                    "failed); retry",
                    code="aborted",
                    headers={"Retry-After": "1"},
                )
            if chunk.finish_reason == "stalled":
                raise APIError(
                    503,
                    chunk.error or "the engine could not schedule the call",
                    code="stalled",
                    headers={"Retry-After": "5"},
                )
            if chunk.finish_reason == "dead_end":
                raise APIError(400, chunk.error or "sampling cannot go on", code="grammar_failed")
            yield chunk
    except ValueError as e:
        raise APIError(400, str(e)) from None
    except Overloaded as e:
        raise overloaded(e) from None
    finally:
        if call.activity is not None:
            call.activity.end(call.session_id)
        if call.last_step:
            # The LLM side ends now; the idle timeout (or DELETE) still ends the rest, such as
            # the workspace of a final tool step.
            eng.end_session(call.session_id)


def overloaded(e: Overloaded) -> APIError:
    code = "queue_full" if e.status == 429 else "admission_timeout"
    return APIError(e.status, e.message, code=code, headers={"Retry-After": str(e.retry_after_s)})


def _usage(last: Chunk) -> dict[str, Any]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
    }


def _finish_reason(last: Chunk, calls: list[dict[str, Any]] | None) -> str:
    if last.finish_reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


async def _collect(eng: LiveEngine, call: Call) -> tuple[str, list[int], list[TokenLogprob], Chunk]:
    text, ids, last = "", [], None
    lps: list[TokenLogprob] = []
    async for chunk in _generate(eng, call):
        text += chunk.text
        ids += chunk.token_ids
        lps += chunk.logprobs
        last = chunk
    assert last is not None and last.finish_reason is not None
    return text, ids, lps, last


def _asked(call: Call) -> bool:
    return call.params.logprobs is not None


def _ids(body: ChatRequest | CompletionRequest, ids: list[int]) -> dict[str, Any]:
    return {"token_ids": ids} if body.return_token_ids else {}


def _head(kind: str, eng: LiveEngine) -> dict[str, Any]:
    prefix = "chatcmpl-" if kind.startswith("chat") else "cmpl-"
    return {
        "id": prefix + uuid.uuid4().hex,
        "object": kind,
        "created": int(time.time()),
        "model": eng.model.name,
    }


async def chat_full(eng: LiveEngine, body: ChatRequest, call: Call) -> dict[str, Any]:
    text, ids, lps, last = await _collect(eng, call)
    if call.fns:  # as the stream reads it: a forced call cut short by max_tokens is still a
        # call (its arguments truncated, finish_reason "length"), as OpenAI returns it
        parser = toolcalls.CallStream(call.fns, call.forced, call.parallel)
        deltas = parser.feed(text) + parser.finish()
        calls = parser.calls
        said = "".join(d.get("content", "") for d in deltas).strip()
        content = (said or None) if calls else text
    else:
        content, calls = text, None
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    logprobs = whole(eng.model, _asked(call), True, lps)  # a tool call's tokens too
    choice = {"index": 0, "message": message, "logprobs": logprobs, **_ids(body, ids)}
    return {
        **_head("chat.completion", eng),
        "session_id": call.session_id,
        "choices": [{**choice, "finish_reason": _finish_reason(last, calls)}],
        "usage": _usage(last),
    }


async def completion_full(eng: LiveEngine, body: CompletionRequest, call: Call) -> dict[str, Any]:
    text, ids, lps, last = await _collect(eng, call)
    logprobs = whole(eng.model, _asked(call), False, lps)
    choice = {"index": 0, "text": text, "logprobs": logprobs, **_ids(body, ids)}
    return {
        **_head("text_completion", eng),
        "session_id": call.session_id,
        "choices": [{**choice, "finish_reason": _finish_reason(last, None)}],
        "usage": _usage(last),
    }


async def accepted(eng: LiveEngine, call: Call) -> AsyncGenerator[Chunk, None]:
    """The call's chunks, once the engine took it: a stream's refusal (a full queue, a bad
    request) raises here, before its headers go out."""
    chunks = _generate(eng, call)
    try:
        await anext(chunks)  # the engine's empty first chunk
    except BaseException:
        await chunks.aclose()
        raise
    return chunks


async def chat_stream(
    eng: LiveEngine, body: ChatRequest, call: Call, chunks: AsyncGenerator[Chunk, None]
) -> AsyncGenerator[dict[str, Any], None]:
    head = _head("chat.completion.chunk", eng)
    first = {"role": "assistant", "content": ""}
    yield {**head, "choices": [{"index": 0, "delta": first, "finish_reason": None}]}
    parser = toolcalls.CallStream(call.fns, call.forced, call.parallel) if call.fns else None
    # Each event carries the logprobs of the tokens whose text it sends, or, held with a tool
    # call's text, of those before it.
    lps = StreamLogprobs(eng.model, _asked(call), chat=True)
    last = None
    try:
        async for chunk in chunks:
            last = chunk
            lps.add(chunk.logprobs)
            if not chunk.text and (parser or not lps.pending):
                continue
            for delta in parser.feed(chunk.text) if parser else [{"content": chunk.text}]:
                choice = {"index": 0, "delta": delta, **lps.take(), "finish_reason": None}
                yield {**head, "choices": [choice]}
    finally:
        await chunks.aclose()  # a client that left: abort the request
    assert last is not None
    for delta in parser.finish() if parser else []:
        yield {
            **head,
            "choices": [{"index": 0, "delta": delta, **lps.take(), "finish_reason": None}],
        }
    reason = _finish_reason(last, parser.calls if parser else None)
    end = {"index": 0, "delta": {}, **(lps.take() if lps.pending else {}), "finish_reason": reason}
    yield {**head, "choices": [end]}
    if body.include_usage:
        yield {**head, "choices": [], "usage": _usage(last)}


async def completion_stream(
    eng: LiveEngine, body: CompletionRequest, call: Call, chunks: AsyncGenerator[Chunk, None]
) -> AsyncGenerator[dict[str, Any], None]:
    head = _head("text_completion", eng)
    lps = StreamLogprobs(eng.model, _asked(call), chat=False)
    last = None
    try:
        async for chunk in chunks:
            last = chunk
            lps.add(chunk.logprobs)
            if chunk.text or lps.pending or (body.return_token_ids and chunk.token_ids):
                choice = {"index": 0, "text": chunk.text, **lps.take(), "finish_reason": None}
                yield {**head, "choices": [{**choice, **_ids(body, chunk.token_ids)}]}
    finally:
        await chunks.aclose()
    assert last is not None
    reason = _finish_reason(last, None)
    yield {**head, "choices": [{"index": 0, "text": "", "finish_reason": reason}]}
    if body.include_usage:
        yield {**head, "choices": [], "usage": _usage(last)}


def sse(
    events: AsyncGenerator[dict[str, Any], None],
    call: Call,
    keepalive_s: float = 10.0,
    stopping: asyncio.Event | None = None,
) -> StreamingResponse:
    """Server-sent events ending in `data: [DONE]`; an error after the headers went out is sent
    as an OpenAI error event. While nothing comes (a session waiting for admission, a long
    prefill), a comment line every `keepalive_s` keeps proxies and clients from timing out.
    Once `stopping` is set (SIGTERM), a stream has a few seconds to end, then ends with a
    "shutdown" error event."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in keepalive(events, keepalive_s, stopping):
                if event is None:
                    yield b": keep-alive\n\n"
                else:
                    yield f"data: {json.dumps(event)}\n\n".encode()
        except Stopping:
            err = error_body(503, "the server is shutting down; retry", code="shutdown")
            yield f"data: {json.dumps(err)}\n\n".encode()
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n".encode()
        except Exception as e:  # a bug: say so in the stream, end it cleanly
            log.exception("stream failed")
            err = error_body(500, f"internal error: {type(e).__name__}: {e}")
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            await events.aclose()  # on a disconnect too: aborts the request in the engine
        yield b"data: [DONE]\n\n"

    headers = {"X-Session-ID": call.session_id, "Cache-Control": "no-cache"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
