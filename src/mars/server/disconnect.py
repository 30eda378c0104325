"""Cancel a plain (not streamed) request's work when its client disconnects: nobody would read
the answer, and the work may hold scarce resources (an engine slot, a tool worker)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextlib import suppress
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


async def unless_gone(request: Request, work: Awaitable[T]) -> T | None:
    """The result of `work`, or None when the client disconnected first; `work` is then
    cancelled, and awaited, so whatever it holds is freed before this returns."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()


async def disconnected(request: Request) -> None:
    """Return once the client has gone (the body was read already: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
