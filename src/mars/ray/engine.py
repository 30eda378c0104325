"""One engine replica of a Ray app: a `mars serve` of its own, behind the replica's handle.

The replica starts `mars serve SERVE_ARGS` (`mars.bench.liveserver.mars_server`: the embedded
llama.cpp engine and its tools runtime, in a process that dies with the replica) on a free
loopback port, and relays calls to it: `forward` streams the server's answer back through Ray
(its status and headers first, then its bytes as they come). So a replica answers exactly as
`mars serve` does: the same OpenAI routes, session identity, tools API and events.

A thread reports the server's `/metrics` page to the control actor every `REPORT_S` (its KV and
queue signal, and the proof the replica is alive); `record_routing_stats` gives Ray the same
signal. `check_health` fails once the server process has exited, and Ray Serve replaces the
replica.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from mars.bench.liveserver import mars_server
from mars.gateway.upstreams import parse_metrics
from mars.ray.control import NAME, NAMESPACE, REPORT_S

# Hop-by-hop headers, and those the relay sets itself, are not passed on.
_DROP = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}


class MarsEngine:
    """The deployment's class (`serve.deployment` is applied in `mars.ray.app`)."""

    def __init__(self, serve_args: list[str], timeout_s: float = 600.0) -> None:
        import ray
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        log = Path(tempfile.mkdtemp(prefix="mars-ray-")) / "serve.log"
        self.log_path = log
        self._stop = threading.Event()
        # The server is started, and kept, by a thread of its own: it dies with the thread that
        # spawned it (PDEATHSIG), and Ray may construct a replica on a thread that then ends.
        started: queue.Queue[str | BaseException] = queue.Queue()
        self._keeper = threading.Thread(target=self._keep, args=(serve_args, started), daemon=True)
        self._keeper.start()
        base = started.get()
        if isinstance(base, BaseException):
            raise base
        self.base = base
        self._client = httpx.AsyncClient(base_url=self.base, timeout=httpx.Timeout(timeout_s))
        self._control = ray.get_actor(NAME, namespace=NAMESPACE)
        self._metrics = ""
        self._reporter = threading.Thread(target=self._report, daemon=True)
        self._reporter.start()

    def _keep(self, serve_args: list[str], started: queue.Queue[str | BaseException]) -> None:
        try:
            with mars_server(serve_args, self.log_path) as base:
                started.put(base)
                self._stop.wait()
        except BaseException as e:  # a bad option, a model that does not load: the replica's
            started.put(e)

    def _report(self) -> None:
        with httpx.Client(base_url=self.base, timeout=5.0) as client:
            while not self._stop.wait(REPORT_S):
                try:
                    self._metrics = client.get("/metrics").text
                except httpx.HTTPError:
                    continue  # the server is busy or gone: check_health tells Ray
                self._control.report.remote(self.replica_id, self._metrics, os.getpid())

    async def forward(
        self,
        method: str,
        path: str,
        query: str,
        body: bytes,
        headers: dict[str, str],
        session_id: str | None = None,
    ) -> AsyncIterator[dict[str, Any] | bytes]:
        """The server's answer to one call: {"status", "headers"} first, then its bytes.
        `session_id` is the router's (the server names the session from the call itself)."""
        sent = {k: v for k, v in headers.items() if k.lower() not in _DROP}
        url = path + (f"?{query}" if query else "")
        request = self._client.build_request(method, url, content=body, headers=sent)
        response = await self._client.send(request, stream=True)
        try:
            kept = {k: v for k, v in response.headers.items() if k.lower() not in _DROP}
            yield {"status": response.status_code, "headers": kept, "replica": self.replica_id}
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()

    def record_routing_stats(self) -> dict[str, Any]:
        signal = parse_metrics(self._metrics)
        return {"kv_usage": signal.kv_usage, "waiting": signal.waiting, "pid": os.getpid()}

    async def check_health(self) -> None:
        if not self._keeper.is_alive() or not self._reporter.is_alive():
            raise RuntimeError("the replica's reporter thread stopped")
        try:
            await self._client.get("/health", timeout=10.0)
        except httpx.HTTPError as e:
            raise RuntimeError(f"its mars serve does not answer ({e}); see {self.log_path}") from e

    def __del__(self) -> None:
        self._stop.set()
        self._keeper.join(40)
