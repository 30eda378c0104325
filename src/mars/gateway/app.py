"""The gateway's HTTP front: the same OpenAI-compatible routes as `mars serve`, answered by
upstream servers behind the MARS control plane.

A call is validated with the embedded server's request models, given its session (the embedded
server's rules, `mars.server.sessions`), held until the policy admits the session
(`control.py`), routed to the session's replica (`upstreams.py`) and forwarded (`proxy.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mars.control.admission import AdmissionLimits
from mars.core.clock import WallClock
from mars.core.events import EventBus
from mars.gateway.calls import CallInfo, Calls
from mars.gateway.control import Control
from mars.gateway.dashboard import gateway_gauges, upstream_rows
from mars.gateway.metrics import GatewayMetrics
from mars.gateway.proxy import Proxy
from mars.gateway.upstreams import Flavor, Upstreams
from mars.sched.registry import make_policy
from mars.server.app import _Guard, install_error_handlers
from mars.server.dashboard import dashboard_router
from mars.server.eventstream import EventStream
from mars.server.metrics import CONTENT_TYPE
from mars.server.protocol import APIError, ChatRequest, CompletionRequest
from mars.server.responses import Activity
from mars.server.tenants import Keys

log = logging.getLogger("mars.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    upstreams: tuple[str, ...]
    flavor: Flavor = "openai"
    policy: str = "mars"
    settings: tuple[tuple[str, str], ...] = ()
    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    api_key: str | None = None  # what the gateway's clients must send
    upstream_api_key: str | None = None  # what the gateway sends to the upstreams
    upstream_timeout_s: float = 600.0  # seconds without a byte from the upstream
    connect_timeout_s: float = 3.0
    scrape_s: float = 0.5
    idle_timeout_s: float = 900.0
    keepalive_s: float = 10.0
    events: EventStream | None = None


@dataclass
class _State:
    upstreams: Upstreams
    control: Control
    proxy: Proxy
    client: httpx.AsyncClient
    calls: Calls


def create_gateway(config: GatewayConfig) -> FastAPI:
    events = config.events or EventStream()
    activity = Activity()
    state: dict[str, _State] = {}

    def view() -> tuple[Control, Upstreams] | None:
        s = state.get("s")
        return None if s is None else (s.control, s.upstreams)

    metrics_ = GatewayMetrics(view)  # /metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        key = config.upstream_api_key
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1000), headers=auth)
        upstreams = Upstreams(
            list(config.upstreams), config.flavor, client, config.scrape_s, config.connect_timeout_s
        )
        bus = EventBus()
        bus.subscribe_all(events)
        bus.subscribe_all(metrics_)
        policy = make_policy(config.policy, dict(config.settings))
        control = Control(policy, upstreams, config.limits, WallClock(), bus)
        proxy = Proxy(upstreams, client, config.upstream_timeout_s)
        calls = Calls(control, proxy, activity, config.keepalive_s)
        state["s"] = _State(upstreams, control, proxy, client, calls)
        await upstreams.check_all()
        log.warning("upstreams: %s", upstreams.describe())
        tasks = [
            asyncio.create_task(upstreams.run()),
            asyncio.create_task(control.run()),
            asyncio.create_task(_reap_idle(control, activity, config.idle_timeout_s)),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await client.aclose()
            events.close()

    app = FastAPI(title="mars gateway", lifespan=lifespan)
    app.add_middleware(_Guard, keys=Keys({config.api_key: False}) if config.api_key else None)

    install_error_handlers(app)

    def gauges() -> dict[str, Any]:
        return gateway_gauges(state["s"].control, state["s"].upstreams)

    app.include_router(dashboard_router(gauges))

    @app.get("/health")
    async def health() -> JSONResponse:
        s = state["s"]
        up = s.upstreams.healthy()
        body = {
            "status": "ok" if up else "no upstream is up",
            "upstreams": {
                r.url: "up" if r.up else f"down: {r.error}" for r in s.upstreams.replicas
            },
        }
        return JSONResponse(body, 200 if up else 503)

    @app.get("/v1/upstreams")
    async def upstream_table() -> dict[str, Any]:
        s = state["s"]
        rows = upstream_rows(s.upstreams)
        placed = {sid: r.url for sid in s.control.sessions if (r := s.upstreams.placed(sid))}
        return {"object": "list", "data": rows, "sessions": placed}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(metrics_.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        s = state["s"]
        for replica in s.upstreams.healthy():
            try:
                r = await s.client.get(replica.url + "/v1/models", timeout=10)
            except httpx.HTTPError as e:
                s.upstreams.failed(replica, f"GET /v1/models failed: {type(e).__name__}")
                continue
            media = r.headers.get("content-type", "application/json")
            return Response(r.content, r.status_code, media_type=media)
        raise APIError(503, f"no upstream is up: {s.upstreams.describe()}", code="no_upstream")

    @app.get("/v1/events")
    async def event_stream(session_id: str | None = None) -> StreamingResponse:
        """Server-sent events: every event from now on (one session's with ?session_id=)."""
        return events.sse(session_id, config.keepalive_s)

    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str) -> dict[str, Any]:
        s = state["s"]
        replica = s.upstreams.placed(session_id)
        if replica is not None and replica.up:  # mars serve ends it there too; others say 404
            with suppress(httpx.HTTPError):
                await s.client.delete(f"{replica.url}/v1/sessions/{session_id}", timeout=10)
        s.control.end(session_id)
        activity.forget(session_id)
        return {"id": session_id, "object": "session", "deleted": True}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await state["s"].calls.handle(body, request, CallInfo.chat(body))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await state["s"].calls.handle(body, request, CallInfo.completion(body))

    return app


async def _reap_idle(control: Control, activity: Activity, timeout_s: float) -> None:
    """End sessions that have sent nothing for `timeout_s`."""
    while True:
        await asyncio.sleep(min(10.0, timeout_s / 2))
        for sid in activity.idle(timeout_s):
            control.end(sid)


def run_gateway(config: GatewayConfig, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        create_gateway(config),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=5,
        loop="asyncio",  # as mars serve's (mars.server.cli)
    )
