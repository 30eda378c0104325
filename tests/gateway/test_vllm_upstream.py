"""The gateway in front of a vLLM-like upstream: a small FastAPI app on a real port that answers
as vLLM's OpenAI server does (its `/metrics` names, its 503 when a queue cap is reached) and
records what it was sent. The session reaches it as vLLM >= 0.28 reads it (body `session_id`,
`X-Session-ID`), the policy's level as `X-Vllm-Priority`, and its 503s are waited out as
back-pressure, never counted against the replica."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from mars.gateway.app import GatewayConfig, create_gateway
from mars.gateway.proxy import Extras, Proxy
from mars.gateway.upstreams import Flavor, Upstreams
from mars.server.protocol import APIError
from serving import free_port

METRICS = 'vllm:kv_cache_usage_perc{engine="0"} 0.1\nvllm:num_requests_waiting{engine="0"} 0\n'
# vLLM's QueueOverflowError as its server answers it (vllm/exceptions.py, error_response.py).
BUSY = {
    "error": {
        "message": "The engine is currently busy and cannot accept new requests. Please try "
        "again later or on a different instance.",
        "type": "Service Unavailable",
        "param": None,
        "code": 503,
    }
}


@dataclass
class FakeVllm:
    """What the upstream was sent, and how many of the next calls it refuses with 503."""

    busy: int = 0
    seen: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(METRICS)

        @app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            self.seen.append((dict(request.headers), await request.json()))
            if self.busy:
                self.busy -= 1
                return JSONResponse(BUSY, 503)
            usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            return JSONResponse({"object": "text_completion", "choices": [], "usage": usage})

        return app


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """`app` on a free port in a thread, for as long as the block runs."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def fake() -> Iterator[tuple[FakeVllm, str]]:
    upstream = FakeVllm()
    with serve(upstream.app()) as url:
        yield upstream, url


@contextmanager
def gateway(url: str, policy: str = "mars") -> Iterator[str]:
    config = GatewayConfig(upstreams=(url,), flavor="vllm", policy=policy, scrape_s=0.2)
    with serve(create_gateway(config)) as base:
        yield base


def call(base: str, sid: str, **kw: Any) -> httpx.Response:
    body = {"prompt": "hello", "max_tokens": 2, "session_id": sid, **kw}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=60)


def test_vllm_gets_the_session_in_body_and_header_and_the_level_as_priority(fake) -> None:
    upstream, url = fake
    with gateway(url) as base:
        assert call(base, "s1").status_code == 200
        assert call(base, "s1", vllm_xargs={"is_last_step": True}).status_code == 200
    (h1, b1), (h2, b2) = upstream.seen
    assert b1["session_id"] == b2["session_id"] == "s1"
    assert b1["vllm_xargs"]["session_id"] == "s1"
    assert h1["x-session-id"] == h2["x-session-id"] == "s1"
    # mars: a session's first call is level 1, its continuation level 0 (served first).
    assert (h1["x-vllm-priority"], h2["x-vllm-priority"]) == ("1", "0")


def test_a_policy_without_levels_sends_no_priority(fake) -> None:
    upstream, url = fake
    with gateway(url, policy="fcfs") as base:
        assert call(base, "s1").status_code == 200
    headers, body = upstream.seen[0]
    assert "x-vllm-priority" not in headers and body["session_id"] == "s1"


async def forward(url: str, flavor: Flavor, busy_wait_s: float = 5.0) -> tuple[Any, Upstreams]:
    async with httpx.AsyncClient() as client:
        ups = Upstreams([url], flavor, client)
        await ups.check_all()
        proxy = Proxy(ups, client, 30.0, busy_wait_s=busy_wait_s)
        extras = Extras("s1", False, None, None, priority=1)
        try:
            answer = await proxy.forward("/v1/completions", {"prompt": "x"}, extras, _done)
            return answer.response, ups
        except APIError as e:
            return e, ups


def _done(usage: dict[str, Any] | None, ok: bool) -> None:
    pass


def test_other_upstreams_get_the_header_only(fake) -> None:
    upstream, url = fake
    response, _ = asyncio.run(forward(url, "openai"))
    assert response.status_code == 200
    headers, body = upstream.seen[0]
    assert headers["x-session-id"] == "s1" and "x-vllm-priority" not in headers
    assert "session_id" not in body and body["vllm_xargs"]["session_id"] == "s1"


def test_a_503_from_a_queue_cap_is_waited_out_not_a_dead_replica(fake) -> None:
    upstream, url = fake
    upstream.busy = 3
    with gateway(url) as base:
        r = call(base, "s1")
        table = httpx.get(f"{base}/v1/upstreams", timeout=10).json()["data"][0]
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert r.status_code == 200 and len(upstream.seen) == 4  # 3 refused, then served
    assert f'mars:gateway_upstream_busy_total{{upstream="{url}"}} 3.0' in metrics
    assert table["up"] and table["failures"] == 0 and table["requests"] == 1


def test_an_upstream_that_stays_busy_gets_a_503_with_retry_after(fake) -> None:
    upstream, url = fake
    upstream.busy = 1000
    error, ups = asyncio.run(forward(url, "vllm", busy_wait_s=0.3))
    assert isinstance(error, APIError) and error.status == 503
    assert error.body()["error"]["code"] == "upstream_busy"
    assert error.headers is not None and "Retry-After" in error.headers
    assert 2 <= len(upstream.seen) < 20  # tried again, with a back-off
    replica = ups.replicas[0]
    assert replica.up and replica.failures == 0
