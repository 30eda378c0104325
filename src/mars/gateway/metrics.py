"""The gateway's `/metrics`: its own admission and routing view (`mars:gateway_*`), its event
stream's session-level families (`mars:gateway_session_latency_seconds`, ...), and what each
upstream's own `/metrics` said at its last scrape, passed on with an `upstream` label.

The upstreams' pages are parsed when the gateway is scraped (not at every probe, which runs far
more often), once per page: a page that has not changed since is not parsed again. A family an
upstream publishes with a different type than an earlier one, or under a name the gateway uses
itself (a gateway in front of a gateway), is left out rather than making the page invalid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from mars.core.events import Event
from mars.gateway.control import Control
from mars.gateway.upstreams import Pool, Replica
from mars.server.metrics import SessionMetrics

PREFIX = "mars:gateway_"
log = logging.getLogger("mars.gateway")


class GatewayMetrics:
    """The registry behind the gateway's `/metrics`. Subscribe the instance to the gateway's
    bus; `view` gives the control plane and the upstreams (None before startup)."""

    def __init__(self, view: Callable[[], tuple[Control, Pool] | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        # The gateway serves no model of its own: its sessions carry model_name="gateway".
        self.sessions = SessionMetrics(self.registry, "gateway", PREFIX)
        self.registry.register(GatewayCollector(view))
        self.registry.register(Passthrough(view))

    def __call__(self, event: Event) -> None:
        self.sessions(event)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class GatewayCollector(Collector):
    """Admission (window, queue, admitted sessions, pooled KV usage) and one series per
    upstream (up, its signal, sessions placed, requests forwarded, failures)."""

    def __init__(self, view: Callable[[], tuple[Control, Pool] | None]) -> None:
        self._view = view

    def collect(self) -> Iterable[Metric]:
        view = self._view()
        if view is None:
            return
        control, upstreams = view
        window = getattr(control.policy, "window", None)
        gauges: list[tuple[str, str, float | None]] = [
            ("admission_window_sessions", "Sessions the admission policy lets in at once.",
             float(window) if isinstance(window, int | float) else None),
            ("admission_queued_sessions", "New sessions waiting in the admission queue.",
             len(control.queue)),
            ("sessions_active", "Sessions admitted and not yet ended.", control.active),
            ("kv_cache_usage_perc", "The upstreams' pooled KV-cache usage (1 means 100 percent).",
             control.kv.usage),
        ]  # fmt: skip
        for name, doc, value in gauges:
            if value is not None:
                yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        yield CounterMetricFamily(
            PREFIX + "sessions_moved_total",
            "Sessions moved off an upstream that went down (their next turn is a cold prefill).",
            value=upstreams.moved,
        )
        per: list[tuple[str, str, str, Callable[[Replica], float | None]]] = [
            ("up", "gauge", "Whether the upstream answers its probe (1) or is down (0).",
             lambda r: int(r.up)),
            ("kv_cache_usage_perc", "gauge", "The upstream's KV-cache usage, last scraped.",
             lambda r: r.signal.kv_usage),
            ("num_requests_waiting", "gauge", "The upstream's waiting requests, last scraped.",
             lambda r: r.signal.waiting),
            ("num_requests_running", "gauge", "The upstream's running requests, last scraped.",
             lambda r: r.signal.running),
            ("sessions", "gauge", "Sessions placed on the upstream.", lambda r: r.sessions),
            ("requests", "counter", "Requests forwarded to the upstream.", lambda r: r.requests),
            ("busy", "counter", "503s of the upstream (its queue caps) waited out on it.",
             lambda r: r.busy),
            ("failures", "counter", "Failed probes and forwarded requests.",
             lambda r: r.failures_total),
        ]  # fmt: skip
        for name, kind, doc, read in per:
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            fam = cls(PREFIX + "upstream_" + name, doc, labels=["upstream"])
            for r in upstreams.replicas:
                value = read(r)
                if value is not None:
                    fam.add_metric([r.url], value)
            yield fam


class Passthrough(Collector):
    """Each up upstream's last `/metrics` page, every sample labelled `upstream`; the same
    family from several upstreams is merged into one."""

    def __init__(self, view: Callable[[], tuple[Control, Pool] | None]) -> None:
        self._view = view
        self._parsed: dict[str, tuple[str, list[Metric]]] = {}  # url -> (page, its families)
        self._warned: set[str] = set()  # upstreams whose page did not parse (said once)

    def collect(self) -> Iterable[Metric]:
        view = self._view()
        if view is None:
            return
        merged: dict[str, Metric] = {}
        for replica in view[1].replicas:
            if not replica.up or not replica.metrics_text:
                continue
            for fam in self._families(replica):
                out = merged.get(fam.name)
                if out is None:
                    if fam.name.startswith(PREFIX):
                        continue  # a gateway upstream's own view: the names are ours
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                elif out.type != fam.type:
                    continue
                labels = {"upstream": replica.url}
                out.samples += [s._replace(labels={**s.labels, **labels}) for s in fam.samples]
        yield from merged.values()

    def _families(self, replica: Replica) -> list[Metric]:
        page = replica.metrics_text
        cached = self._parsed.get(replica.url)
        if cached is not None and cached[0] is page:
            return cached[1]
        try:
            fams = list(text_string_to_metric_families(page))
        except ValueError as e:  # not the text format: the upstream's signal is unknown too
            if replica.url not in self._warned:
                self._warned.add(replica.url)
                log.warning("upstream %s: its /metrics cannot be passed on: %s", replica.url, e)
            fams = []
        self._parsed[replica.url] = (page, fams)
        return fams
