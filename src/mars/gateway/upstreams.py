"""The upstream replicas: their health, the GPU signal scraped from their `/metrics`, and routing.

Every `scrape_s` each replica's `/metrics` is read (falling back to `/health`, then `/v1/models`,
for servers without one); the page is kept for the gateway's own `/metrics` to pass on. The
signal: KV usage, waiting and running requests, and KV capacity when the server says it, in
vLLM's names (`vllm:kv_cache_usage_perc` or, before v0.10, `vllm:gpu_cache_usage_perc`,
`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:cache_config_info`), which a
`mars serve` upstream publishes too; its waiting requests add its admission queue
(`mars:admission_queued_sessions`). A server that publishes none of them has an unknown signal
and is routed to by session count alone.

A replica is down when it refuses connections, when its probe answers an error, or after
`MAX_FAILURES` timeouts or broken answers in a row; the next probe that succeeds brings it back.

Routing is sticky: a session stays on the replica that holds its KV. A new session, or one whose
replica went down (its next turn is a cold prefill elsewhere), goes where pressure is lowest:
KV usage (in 5 % steps, so noise does not decide), then waiting requests, then sessions placed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import httpx

from mars.control.placement import pressure

Flavor = Literal["vllm", "openai"]
MAX_FAILURES = 3  # timeouts or broken answers in a row before a replica is marked down

_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # the first found
_WAITING = ("vllm:num_requests_waiting", "mars:admission_queued_sessions")  # summed
_RUNNING = ("vllm:num_requests_running",)
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
log = logging.getLogger("mars.gateway")


@dataclass(frozen=True, slots=True)
class Signal:
    """One replica's GPU signal; None where the server does not publish it."""

    kv_usage: float | None = None  # fraction of the KV cache in use, 0..1
    kv_tokens: int | None = None  # KV capacity, tokens
    waiting: int | None = None  # requests queued in the engine (and its admission queue)
    running: int | None = None  # requests in the engine's batch

    @property
    def free_tokens(self) -> int | None:
        if self.kv_tokens is None:
            return None
        return int(self.kv_tokens * (1.0 - (self.kv_usage or 0.0)))


def parse_metrics(text: str) -> Signal:
    """The signal in a Prometheus text page, vLLM's or a `mars serve`'s (it publishes vLLM's
    names). Series of several engines (labels) are summed, usage is averaged."""
    values: dict[str, list[float]] = {}
    kv_tokens: int | None = None
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        name, labels, raw = m.groups()
        try:
            value = float(raw)
        except ValueError:
            continue
        if not math.isfinite(value):
            continue
        values.setdefault(name, []).append(value)
        if name == "vllm:cache_config_info" and labels:
            info = dict(_LABEL.findall(labels))
            if info.get("num_gpu_blocks", "").isdigit() and info.get("block_size", "").isdigit():
                kv_tokens = int(info["num_gpu_blocks"]) * int(info["block_size"])

    def total(names: tuple[str, ...]) -> float | None:
        found = [sum(values[n]) for n in names if n in values]
        return sum(found) if found else None

    usage = next((sum(values[n]) / len(values[n]) for n in _USAGE if n in values), None)
    waiting, running = total(_WAITING), total(_RUNNING)
    return Signal(
        None if usage is None else min(1.0, max(0.0, usage)),
        kv_tokens,
        None if waiting is None else int(waiting),
        None if running is None else int(running),
    )


@dataclass(eq=False)
class Replica:
    """One upstream server and what the gateway knows of it."""

    url: str
    up: bool = False
    signal: Signal = field(default_factory=Signal)
    error: str | None = "not checked yet"  # why it is down (or its last failure)
    failures: int = 0  # failures in a row
    sessions: int = 0  # sessions routed here (sticky)
    requests: int = 0  # requests forwarded (counter)
    busy: int = 0  # its 503s (queue caps) waited out, counter
    failures_total: int = 0  # counter
    metrics_text: str = ""  # its last `/metrics` page ("" if it has none)

    def pressure(self) -> tuple[int, int, int]:
        return pressure(self.signal.kv_usage or 0.0, self.signal.waiting or 0, self.sessions)


class Pool:
    """Replicas and the sessions placed on them: sticky routing, moves off a replica that is
    down. The gateway's `Upstreams` probes its replicas over HTTP; `mars.ray`'s replicas report
    their signal to the control actor instead."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self._sticky: dict[str, Replica] = {}
        self.moved = 0  # sessions moved off a replica that went down (counter)

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.up]

    def describe(self) -> str:
        """Each replica's state, for error bodies: `URL: down (why)`."""
        return "; ".join(f"{r.url}: {'up' if r.up else f'down ({r.error})'}" for r in self.replicas)

    # ---- routing --------------------------------------------------------------------------
    def route(self, session_id: str, among: set[str] | None = None) -> Replica | None:
        """The replica for the session's next request (one of `among`, by url, if given);
        None when every such replica is down."""
        current = self._sticky.get(session_id)
        usable = [r for r in self.healthy() if among is None or r.url in among]
        if current is not None and current in usable:
            return current
        if not usable:
            return None
        best = min(usable, key=Replica.pressure)
        if current is not None:
            current.sessions -= 1
            self.moved += 1
        best.sessions += 1
        self._sticky[session_id] = best
        return best

    def placed(self, session_id: str) -> Replica | None:
        return self._sticky.get(session_id)

    def forget(self, session_id: str) -> None:
        replica = self._sticky.pop(session_id, None)
        if replica is not None:
            replica.sessions -= 1


class Upstreams(Pool):
    """The pool of replicas: probes them, marks them up and down, routes sessions to them."""

    def __init__(
        self,
        urls: list[str],
        flavor: Flavor,
        client: httpx.AsyncClient,
        scrape_s: float = 0.5,
        probe_timeout_s: float = 3.0,
    ) -> None:
        if not urls:
            raise ValueError("give at least one upstream URL")
        super().__init__([Replica(url.rstrip("/")) for url in urls])
        self.flavor = flavor
        self._client = client
        self.scrape_s = scrape_s
        self.probe_timeout_s = probe_timeout_s  # connect (and probe) timeout

    # ---- health ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Probe every replica every `scrape_s` seconds, forever."""
        while True:
            await self.check_all()
            await asyncio.sleep(self.scrape_s)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def check(self, replica: Replica) -> None:
        try:
            for path in ("/metrics", "/health", "/v1/models"):
                r = await self._client.get(replica.url + path, timeout=self.probe_timeout_s)
                if r.status_code != 404:
                    break
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # unreachable: down now
            return self.failed(replica, f"cannot connect: {_reason(e)}", fatal=True)
        except httpx.HTTPError as e:
            return self.failed(replica, f"probe failed: {type(e).__name__} {_reason(e)}")
        if not r.is_success:
            detail = r.text.strip().replace("\n", " ")[:200]
            return self.failed(replica, f"GET {path} answered {r.status_code}: {detail}", True)
        replica.metrics_text = r.text if path == "/metrics" else ""
        self.succeeded(replica, parse_metrics(replica.metrics_text))

    def failed(self, replica: Replica, error: str, fatal: bool = False) -> None:
        """A probe or a forwarded request failed; `fatal` (refused, or an error answer from
        its health check) marks the replica down at once."""
        replica.error = error
        replica.failures += 1
        replica.failures_total += 1
        if replica.up and (fatal or replica.failures >= MAX_FAILURES):
            replica.up = False
            log.warning("upstream %s is down: %s", replica.url, error)

    def succeeded(self, replica: Replica, signal: Signal | None = None) -> None:
        if signal is not None:
            replica.signal = signal
        replica.failures = 0
        if not replica.up:
            replica.up, replica.error = True, None
            log.warning("upstream %s is up", replica.url)


def _reason(e: Exception) -> str:
    return str(e) or type(e).__name__
