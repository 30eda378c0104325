"""`/metrics` in vLLM's names and Prometheus's conventions, through `prometheus_client`.

A dashboard or router written for vLLM (its Grafana dashboard, the gateway's signal) reads a
`mars serve` unchanged: `vllm:*` families with vLLM's types, labels and buckets
(`metrics_requests.py`, `metrics_engine.py`). Next to them, mars's own session-level view under
`mars:*` (here), with HELP text, `_total` counters, `_seconds` units and a `model_name` label.

Each app has its own `CollectorRegistry` (several apps live in one test process). Two sources:
- at scrape time, gauges and the engine's own cumulative counters from `stats()` (exact, and
  free between scrapes);
- the event bus, for what needs per-request or per-session state. Events are published on the
  engine thread, so a handler does a dictionary lookup and an `observe()`/`inc()` (each takes
  a lock of its own) and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from mars.core.events import (
    Event,
    KvEvict,
    KvOffload,
    KvRestore,
    KvRetain,
    SessionAdmitted,
    SessionDone,
    ToolEnd,
)
from mars.server.metrics_engine import EngineCollector
from mars.server.metrics_requests import LATENCY_BUCKETS, TTFT_BUCKETS, RequestMetrics

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format Prometheus 2 and 3 both read
# Admission waits, tool queue waits and tool runs are often milliseconds: TTFT's range.
WAIT_BUCKETS = TTFT_BUCKETS
# Tool categories come from clients (a tool's name): past this many, OVERFLOW (cardinality).
MAX_CATEGORIES = 32
OVERFLOW = "overflow"
# event -> (retention decision, host copy direction), None where it is not one
_KV: dict[type[Event], tuple[str | None, str | None]] = {
    KvRetain: ("retain", None),
    KvEvict: ("evict", None),
    KvOffload: ("offload", "offload"),
    KvRestore: (None, "restore"),
}


class SessionMetrics:
    """mars's session-level families, named `{prefix}...` (`mars:` in the server,
    `mars:gateway_` in the gateway); call it with every event of the bus."""

    def __init__(self, registry: CollectorRegistry, model_name: str, prefix: str = "mars:"):
        self._model = model_name
        labels = ["model_name"]

        def hist(name: str, doc: str, buckets: Sequence[float], *extra: str) -> Histogram:
            return Histogram(prefix + name, doc, [*labels, *extra], registry=registry,
                             buckets=buckets)  # fmt: skip

        def counter(name: str, doc: str, extra: str) -> Counter:
            return Counter(prefix + name, doc, [*labels, extra], registry=registry)

        self._latency = hist(
            "session_latency_seconds",
            "Session latency (done minus arrival, admission wait included), in seconds.",
            LATENCY_BUCKETS,
        ).labels(model_name)
        self._wait = hist(
            "admission_wait_seconds",
            "Time a new session waited in the admission queue, in seconds.",
            WAIT_BUCKETS,
        ).labels(model_name)
        self._tool_wait = hist(
            "tool_queue_wait_seconds",
            "Time a tool call waited for a tool worker, by tool category, in seconds.",
            WAIT_BUCKETS,
            "category",
        )
        self._tool_run = hist(
            "tool_run_seconds",
            "Tool run time (for a tool phase the server inferred, the time away), by tool "
            "category, in seconds.",
            WAIT_BUCKETS,
            "category",
        )
        sessions = counter(
            "sessions_finished_total",
            "Sessions that ended, by outcome (done, or rejected by the admission queue).",
            "outcome",
        )
        self._sessions = {o: sessions.labels(model_name, o) for o in ("done", "rejected")}
        self._events = counter(
            "events_total", "Events on the unified event stream, by kind.", "event"
        )
        self._event_children: dict[str, Counter] = {}
        decisions = counter(
            "kv_retention_decisions_total",
            "What became of a session's KV: retained on the GPU through its tool phase, "
            "offloaded to host memory, or evicted (lost, to be recomputed).",
            "decision",
        )
        decided = counter(
            "kv_retention_tokens_total", "Tokens of KV retained, offloaded or evicted.", "decision"
        )
        copies = counter(
            "kv_host_copies_total",
            "KV copies between the GPU and host memory, by direction (offload, restore).",
            "direction",
        )
        copied = counter(
            "kv_host_copy_tokens_total",
            "Tokens of KV copied between the GPU and host memory, by direction.",
            "direction",
        )
        # Created at zero, so a dashboard's rate() has a series before the first decision.
        self._kv: dict[type[Event], list[tuple[Counter, Counter]]] = {}
        for kind, (decision, direction) in _KV.items():
            pairs = self._kv.setdefault(kind, [])
            if decision is not None:
                pairs.append((decisions.labels(model_name, decision),
                              decided.labels(model_name, decision)))  # fmt: skip
            if direction is not None:
                pairs.append((copies.labels(model_name, direction),
                              copied.labels(model_name, direction)))  # fmt: skip
        self._tools: dict[str, tuple[Histogram, Histogram]] = {}

    def __call__(self, event: Event) -> None:
        child = self._event_children.get(event.kind)
        if child is None:
            child = self._event_children[event.kind] = self._events.labels(self._model, event.kind)
        child.inc()
        if isinstance(event, SessionAdmitted):
            self._wait.observe(event.wait_s)
        elif isinstance(event, SessionDone):
            self._sessions["rejected" if event.rejected else "done"].inc()
            if not event.rejected:
                self._latency.observe(event.latency_s)
        elif isinstance(event, ToolEnd):
            wait, run = self._tool(event.category)
            wait.observe(event.queue_wait_s)
            run.observe(event.duration_s)
        elif isinstance(event, KvRetain | KvEvict | KvOffload | KvRestore):
            for count, tokens in self._kv[type(event)]:
                count.inc()
                tokens.inc(event.tokens)

    def _tool(self, category: str) -> tuple[Histogram, Histogram]:
        pair = self._tools.get(category)
        if pair is None:
            if len(self._tools) >= MAX_CATEGORIES:
                category = OVERFLOW
            pair = self._tools.get(category) or (
                self._tool_wait.labels(self._model, category),
                self._tool_run.labels(self._model, category),
            )
            self._tools[category] = pair
        return pair


class ServerMetrics:
    """The registry behind `mars serve`'s `/metrics`. Subscribe the instance to the engine's
    bus (`bus.subscribe_all`); `stats` (`LiveEngine.stats`) is read at every scrape."""

    def __init__(
        self,
        stats: Callable[[], Mapping[str, object]],
        model_name: str,
        policy: str,
        max_model_len: int,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestMetrics(self.registry, model_name, max_model_len)
        self.sessions = SessionMetrics(self.registry, model_name)
        self.registry.register(EngineCollector(stats, model_name, policy))

    def __call__(self, event: Event) -> None:
        self.requests(event)
        self.sessions(event)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
