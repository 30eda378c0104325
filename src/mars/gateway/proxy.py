"""Forwarding one request to an upstream replica: the session extras added to its body, the
answer relayed (whole, or server-sent events chunk by chunk), failures turned into clear errors.

The extras go in `vllm_xargs` (`session_id`, `is_last_step`, `this_func_call`,
`last_func_call`), where vLLM hands them to its scheduler plug-in and where `mars serve` reads
them. Every upstream also gets the session in the `X-Session-ID` header; a vLLM upstream
(`--engine vllm`) gets it in the body's `session_id` too, the typed field vLLM >= 0.28 reads
into `Request.session_id` (other servers may refuse a field they do not know), and the call's
priority in `X-Vllm-Priority` when the gateway's policy gives one (`Extras.priority`). vLLM
publishes its scheduling policy nowhere, so the header is not sent on detection but to every
vLLM upstream: under `--scheduling-policy priority` it orders the queue (lower first), under
vLLM's default FCFS it is ignored (0.32 and 0.34 accept any priority there), and the MARS plug-in
writes its own ranks over it. Everything else in the client's body passes through unchanged.

A replica that refuses the connection is marked down and the request tries the next one
(nothing was sent yet). A 503 is back-pressure, not a failure: vLLM answers it when its queue
caps (`--max-num-queued-reqs`, `--max-num-queued-tokens`) are reached, before the request is
queued. The request waits (the upstream's `Retry-After`, else a doubling back-off) and is sent
again to the same replica, which holds the session's KV, for up to `busy_wait_s`; past that the
client gets a 503 with `Retry-After`. The replica is not counted as failing. Any other failure
is answered, never retried (the upstream may have started generating).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi.responses import Response, StreamingResponse

from mars.gateway.upstreams import Replica, Upstreams
from mars.server.protocol import APIError, error_body

MAX_ATTEMPTS = 3  # replicas one request may try when connections are refused
GIVE_UP_S = 8.0  # no new attempt after this long: a client hears of dead upstreams within 10 s
_TAIL = 16384  # bytes of a stream kept to find its usage
BUSY_WAIT_S = 30.0  # how long a call waits out an upstream's 503 (its queue caps) at most
_BACKOFF_S = (0.05, 1.0)  # first and longest wait between tries of a busy upstream


@dataclass(frozen=True)
class Extras:
    """What the gateway tells the upstream about the call's session."""

    session_id: str
    is_last_step: bool
    this_func_call: str | None
    last_func_call: str | None
    priority: int | None = None  # the policy's level for the call (lower first), if it has one

    def apply(self, body: dict[str, Any], vllm: bool = False) -> dict[str, Any]:
        """The body to forward; `vllm`: the upstream is vLLM, which also gets `session_id`."""
        xargs = dict(body.get("vllm_xargs") or {})
        xargs["session_id"] = self.session_id
        xargs["is_last_step"] = self.is_last_step
        for key in ("this_func_call", "last_func_call"):
            value = getattr(self, key)
            if value is not None:
                xargs[key] = value
        out = {**body, "vllm_xargs": xargs}
        if vllm:
            out["session_id"] = self.session_id
        return out

    def headers(self, vllm: bool = False) -> dict[str, str]:
        """The headers to forward: the session, and for vLLM the priority."""
        out = {"X-Session-ID": self.session_id}
        if vllm and self.priority is not None:
            out["X-Vllm-Priority"] = str(self.priority)
        return out


@dataclass
class Answer:
    """The upstream's answer as the client gets it, and the replica that gave it."""

    response: Response
    replica: Replica


class Proxy:
    def __init__(
        self,
        upstreams: Upstreams,
        client: httpx.AsyncClient,
        timeout_s: float,
        busy_wait_s: float = BUSY_WAIT_S,
    ) -> None:
        self.upstreams, self._client, self.timeout_s = upstreams, client, timeout_s
        self.busy_wait_s = busy_wait_s

    async def forward(
        self,
        path: str,
        body: dict[str, Any],
        extras: Extras,
        done: Callable[[dict[str, Any] | None, bool], None],
    ) -> Answer:
        """Send the call to the session's replica and relay its answer. `done(usage, ok)` is
        called once the answer is complete (after the last chunk of a stream)."""
        vllm = self.upstreams.flavor == "vllm"
        payload = extras.apply(body, vllm)
        stream = bool(body.get("stream"))
        replica, upstream = await self._send(path, payload, extras, vllm)
        headers = {"X-Session-ID": extras.session_id, "X-MARS-Upstream": replica.url}
        if not stream or not upstream.is_success:
            try:
                content = await upstream.aread()
            except httpx.HTTPError as e:
                done(None, False)
                raise self._broken(replica, e) from None
            finally:
                await upstream.aclose()
            response = _relay_whole(replica, upstream, content, headers)
            done(answer_usage(content) if upstream.is_success else None, upstream.is_success)
            return Answer(response, replica)
        headers["Cache-Control"] = "no-cache"
        media = upstream.headers.get("content-type", "text/event-stream")
        relay = self._relay_stream(replica, upstream, done)
        return Answer(StreamingResponse(relay, media_type=media, headers=headers), replica)

    async def _send(
        self, path: str, payload: dict[str, Any], extras: Extras, vllm: bool
    ) -> tuple[Replica, httpx.Response]:
        """The upstream's answer, once it is not a 503 (see the module docstring)."""
        started, delay = time.monotonic(), _BACKOFF_S[0]
        while True:
            replica, upstream = await self._connect(path, payload, extras, vllm)
            if upstream.status_code != 503:
                replica.requests += 1
                return replica, upstream
            await upstream.aread()
            await upstream.aclose()
            wait = _retry_after(upstream) or delay
            waited = time.monotonic() - started
            if waited + wait > self.busy_wait_s:
                retry = max(1, round(wait))
                raise APIError(
                    503,
                    f"upstream {replica.url} is at capacity (it answered 503, as vLLM does at "
                    f"its --max-num-queued-reqs / --max-num-queued-tokens) for {waited:.1f} s; "
                    f"retry in {retry} s",
                    code="upstream_busy",
                    headers={"Retry-After": str(retry)},
                )
            replica.busy += 1
            await asyncio.sleep(wait)
            delay = min(_BACKOFF_S[1], delay * 2)

    async def _connect(
        self, path: str, payload: dict[str, Any], extras: Extras, vllm: bool
    ) -> tuple[Replica, httpx.Response]:
        """Send to the session's replica; on a refused connection, to the next one."""
        tried: list[str] = []
        started = time.monotonic()
        session_id = extras.session_id
        for _ in range(MAX_ATTEMPTS):
            replica = self.upstreams.route(session_id)
            late = time.monotonic() - started + self.upstreams.probe_timeout_s > GIVE_UP_S
            if replica is None or (tried and late):
                break
            request = self._client.build_request(
                "POST",
                replica.url + path,
                json=payload,
                headers=extras.headers(vllm),
                timeout=self._timeout(),
            )
            try:
                upstream = await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                self.upstreams.failed(replica, f"cannot connect: {e or type(e).__name__}", True)
                tried.append(replica.url)
                continue
            except httpx.HTTPError as e:
                raise self._broken(replica, e) from None
            return replica, upstream
        waited = time.monotonic() - started
        what = f"tried {', '.join(tried)} in {waited:.1f} s" if tried else "none is up"
        raise APIError(
            502 if tried else 503,
            f"no upstream could take the request ({what}): {self.upstreams.describe()}; "
            "check that the servers given with --upstream are running",
            code="upstream_unavailable",
            headers={"Retry-After": "5"},
        )

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_s, connect=self.upstreams.probe_timeout_s)

    def _broken(self, replica: Replica, e: httpx.HTTPError) -> APIError:
        """The upstream failed after the connection was made: count it, say how."""
        self.upstreams.failed(replica, f"{type(e).__name__}: {e or 'no detail'}")
        if isinstance(e, httpx.TimeoutException):
            return APIError(
                504,
                f"upstream {replica.url} sent nothing for {self.timeout_s:g} s; raise "
                "--upstream-timeout if its generations are that slow",
                code="upstream_timeout",
            )
        return APIError(
            502,
            f"upstream {replica.url} failed mid-answer ({type(e).__name__}: {e}); retry",
            code="upstream_error",
            headers={"Retry-After": "1"},
        )

    async def _relay_stream(
        self,
        replica: Replica,
        upstream: httpx.Response,
        done: Callable[[dict[str, Any] | None, bool], None],
    ) -> AsyncIterator[bytes]:
        tail, ok = b"", False
        try:
            async for chunk in upstream.aiter_raw():
                tail = (tail + chunk)[-_TAIL:]
                yield chunk
            ok = True
        except httpx.HTTPError as e:
            error = self._broken(replica, e)
            yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
        finally:
            await upstream.aclose()
            done(stream_usage(tail), ok)


def _relay_whole(
    replica: Replica, upstream: httpx.Response, content: bytes, headers: dict[str, str]
) -> Response:
    media = upstream.headers.get("content-type", "application/json")
    if upstream.is_success or media.startswith("application/json"):
        return Response(content, upstream.status_code, headers=headers, media_type=media)
    # A proxy's HTML page or plain text: wrap it so clients get an OpenAI-style error.
    detail = content.decode(errors="replace").strip().replace("\n", " ")[:300]
    message = f"upstream {replica.url} answered {upstream.status_code}: {detail}"
    body = json.dumps(error_body(upstream.status_code, message, code="upstream_error"))
    return Response(body, upstream.status_code, headers=headers, media_type="application/json")


def _retry_after(upstream: httpx.Response) -> float | None:
    """The upstream's `Retry-After` in seconds (capped at 5), if it gave a number."""
    try:
        seconds = float(upstream.headers.get("retry-after", ""))
    except ValueError:
        return None
    return min(5.0, seconds) if seconds >= 0 else None


def answer_usage(content: bytes) -> dict[str, Any] | None:
    try:
        usage = json.loads(content).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def stream_usage(tail: bytes) -> dict[str, Any] | None:
    """The usage of the stream's last event that has one (`stream_options.include_usage`)."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            return answer_usage(line[6:])
    return None
