"""The unified event stream, served: every engine, control-plane and tool event (DESIGN.md section
2) as JSON lines in a file (`--events FILE`) and as server-sent events (`/v1/events`). Their
Prometheus counters (`mars:events_total`) are `mars.server.metrics`'.

`EventStream` is subscribed to the engine's bus, so it sees events in the order the engine thread
published them; it hands each one to asyncio subscribers through their loops. A slow subscriber
loses its oldest events (and is told how many), never the engine's time.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any, TypeVar

from fastapi.responses import StreamingResponse

from mars.core.events import Event

T = TypeVar("T")
SUBSCRIBER_BUFFER = 10_000  # events a subscriber may fall behind before it loses the oldest


class Subscriber:
    """One `/v1/events` client: a bounded queue on the client's event loop. `visible` (called
    on that loop, with each event's session id, "" for system-wide ones) hides other tenants'
    sessions: before the queue, so they cost this client no buffer and no drop count."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        session_id: str | None,
        visible: Callable[[str], bool] | None = None,
    ) -> None:
        self.loop, self.session_id, self.visible = loop, session_id, visible
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.dropped = 0

    def offer(self, record: dict[str, Any]) -> None:  # any thread
        if self.session_id is not None and record["session_id"] != self.session_id:
            return
        with suppress(RuntimeError):  # the client's loop is closed
            self.loop.call_soon_threadsafe(self._put, record)

    def _put(self, record: dict[str, Any]) -> None:
        if self.visible is not None and not self.visible(record["session_id"]):
            return
        if self.queue.qsize() >= SUBSCRIBER_BUFFER:
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(record)

    async def records(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            record = await self.queue.get()
            if self.dropped:
                yield {"event": "dropped", "count": self.dropped}
                self.dropped = 0
            yield record


class EventStream:
    """Bus handler fanning events out to a JSONL file and SSE subscribers."""

    def __init__(self, path: Path | None = None) -> None:
        self._file: IO[str] | None = None
        if path is not None:
            try:
                self._file = path.open("a", encoding="utf-8", buffering=1)
            except OSError as e:
                raise ValueError(f"--events {path}: cannot write ({e.strerror})") from None
        self._subscribers: set[Subscriber] = set()
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        record = {**event.to_json(), "ts": round(time.time(), 6)}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.offer(record)

    def subscribe(
        self, session_id: str | None = None, visible: Callable[[str], bool] | None = None
    ) -> Subscriber:
        sub = Subscriber(asyncio.get_running_loop(), session_id, visible)
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def sse(
        self,
        session_id: str | None,
        keepalive_s: float,
        visible: Callable[[str], bool] | None = None,
    ) -> StreamingResponse:
        """`/v1/events`: every event from now on (one session's with a session id; only those
        `visible` passes) as server-sent events, with keep-alive comments while nothing
        happens."""
        sub = self.subscribe(session_id, visible)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for record in keepalive(sub.records(), keepalive_s):
                    if record is None:
                        yield b": keep-alive\n\n"
                    else:
                        yield f"data: {json.dumps(record)}\n\n".encode()
            finally:
                self.unsubscribe(sub)

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Stopping(Exception):
    """The server is shutting down and the stream's grace has run out."""


async def keepalive(
    items: AsyncIterator[T],
    every_s: float,
    stop: asyncio.Event | None = None,
    grace_s: float = 4.0,
) -> AsyncIterator[T | None]:
    """`items`, with a None whenever `every_s` pass without one. Once `stop` is set, the items
    have `grace_s` more seconds to end, then `Stopping` is raised."""
    pending: asyncio.Future[T] | None = None
    stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
    deadline: float | None = None
    loop = asyncio.get_running_loop()
    try:
        while True:
            pending = asyncio.ensure_future(anext(items))
            while True:
                if deadline is None and stopped is not None and stopped.done():
                    deadline = loop.time() + grace_s
                wait = every_s if deadline is None else min(every_s, deadline - loop.time())
                if wait <= 0:
                    raise Stopping
                waits = {pending} if stopped is None or stopped.done() else {pending, stopped}
                done, _ = await asyncio.wait(waits, timeout=wait, return_when="FIRST_COMPLETED")
                if pending in done:
                    break
                if not done:
                    yield None
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if stopped is not None:
            stopped.cancel()
        if pending is not None and not pending.done():
            pending.cancel()  # the consumer left: cancel the wait (the request is aborted)
            with suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
