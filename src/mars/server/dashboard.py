"""`GET /dashboard`: a live page of the unified event stream, for `mars serve` and the gateway.

The page (`static/dashboard.html` and `dashboard.js`, vanilla JS drawing on a canvas, no build
step, nothing fetched from elsewhere) holds no data of its own, so it is served without an API
key: it asks for the key, keeps it in `sessionStorage` and sends it as `Authorization: Bearer`
on its two data requests, which the guard checks like any other route:

- `/v1/events`, read with `fetch()` streaming (an `EventSource` cannot send headers): the session
  timelines, KV pins and host copies, tool runs. A tenant sees only its own sessions' events.
- `/v1/dashboard`, polled each second: the gauges (`gauges` below), system-wide figures that
  `/v1/kv_cache_stats` (server) and `/metrics` already show to any key holder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

if TYPE_CHECKING:
    from mars.engine.live import LiveEngine
    from mars.tools.runtime import ToolRuntime

PAGES = ("/dashboard", "/dashboard.js")  # public: static files without any server data
# The page runs only its own script and talks only to this origin; nothing may frame it.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _static(name: str) -> bytes:
    return files("mars.server").joinpath("static", name).read_bytes()


def dashboard_router(gauges: Callable[[], dict[str, Any]]) -> APIRouter:
    """The page, its script, and `/v1/dashboard` answering `gauges()`: a dict with `kind`
    ("server" or "gateway") and the figures the page draws (see `dashboard.js`, `applyGauges`)."""
    router = APIRouter()
    page, script = _static("dashboard.html"), _static("dashboard.js")

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_HEADERS)

    @router.get("/dashboard.js", include_in_schema=False)
    async def dashboard_js() -> Response:
        return Response(script, media_type="text/javascript; charset=utf-8", headers=_HEADERS)

    @router.get("/v1/dashboard")
    async def dashboard_gauges() -> JSONResponse:
        return JSONResponse({"ts": time.time(), **gauges()}, headers={"Cache-Control": "no-store"})

    return router


def server_gauges(engine: LiveEngine, tools: ToolRuntime | None) -> dict[str, Any]:
    """`mars serve`'s figures: the engine's stats (`/v1/kv_cache_stats`), the admission window
    by its short names, and the tool workers (None when the tools API is off)."""
    stats = engine.stats()
    queued = stats["admission_queued"]
    workers = None
    if tools is not None:
        workers = {"workers": tools.workers, "busy": tools.busy, "queued": tools.queued}
    return {
        **stats,
        "kind": "server",
        "policy": engine.policy_name,
        "window": stats["admission_window"],
        "active": stats["sessions"] - queued,
        "queued": queued,
        "tools": workers,
    }
