"""vLLM's per-request families for `/metrics`, fed from the event bus: latency histograms with
vLLM's names, label set (`model_name`, `engine`) and buckets (`vllm/v1/metrics/loggers.py`), and
`vllm:request_success_total`. A request's times come from its events: `request_emit` (arrival,
admission hold included), its first `gpu_submit` (scheduled; a resubmit after a preemption keeps
the first), `gpu_first_token` and `gpu_end`.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from mars.core.events import Event, GpuEnd, GpuFirstToken, GpuSubmit, RequestEmit

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# GpuEnd says only whether a request was aborted: a stop string and a length limit are "stop".
FINISHED_REASONS = ("stop", "abort")
MAX_TRACKED = 100_000  # requests remembered until gpu_end (an abort while waiting sends none)


def buckets_1_2_5(max_value: int) -> tuple[float, ...]:
    """vLLM's `build_1_2_5_buckets`: 1, 2, 5, 10, 20, 50, ... up to `max_value`."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


@dataclass(slots=True)
class _InFlight:
    arrival: float
    prompt_tokens: int
    scheduled: float | None = None
    first_token: float | None = None


class WeightedHistogram(Collector):
    """A histogram that takes one value `n` times at once, published under each of `names`
    ((name, HELP) pairs). vLLM observes every gap between two tokens; the bus says only when a
    request's first token came and when it ended, so each of its gaps is their mean: `_sum`
    and `_count` are exact, the buckets approximate."""

    def __init__(
        self,
        names: Sequence[tuple[str, str]],
        labels: Mapping[str, str],
        buckets: Sequence[float],
    ) -> None:
        self.names, self.labels, self.bounds = tuple(names), dict(labels), tuple(buckets)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, n: int = 1) -> None:
        i = bisect.bisect_left(self.bounds, value)  # the first bound >= value: its "le"
        with self._lock:
            self._counts[i] += n
            self._sum += value * n

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        for name, doc in self.names:
            fam = HistogramMetricFamily(name, doc, labels=list(self.labels))
            fam.add_metric(list(self.labels.values()), cumulative, total)
            yield fam


class RequestMetrics:
    """vLLM's request families in `registry`; call it with every event of the bus."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int) -> None:
        names, values = ("model_name", "engine"), (model_name, "0")

        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, names, registry=registry, buckets=buckets).labels(*values)

        self._ttft = hist(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self._e2e = hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            LATENCY_BUCKETS,
        )
        self._queue = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            LATENCY_BUCKETS,
        )
        self._inference = hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            LATENCY_BUCKETS,
        )
        self._prefill = hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            LATENCY_BUCKETS,
        )
        self._decode = hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            LATENCY_BUCKETS,
        )
        self._tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            TOKEN_BUCKETS,
        )
        lengths = buckets_1_2_5(max_model_len)
        self._prompt_len = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", lengths
        )
        self._output_len = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", lengths
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=registry,
        )
        self._success = {r: success.labels(*values, r) for r in FINISHED_REASONS}
        # vLLM still publishes the gaps under their pre-0.9 name too, which the Grafana
        # dashboard in its examples reads.
        gaps = [
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
            ("vllm:time_per_output_token_seconds",
             "Histogram of time per output token in seconds. "
             "DEPRECATED: Use vllm:inter_token_latency_seconds instead."),
        ]  # fmt: skip
        self._itl = WeightedHistogram(gaps, dict(zip(names, values, strict=True)), TOKEN_BUCKETS)
        registry.register(self._itl)
        self._lock = threading.Lock()
        self._flight: dict[str, _InFlight] = {}
        self._handlers: dict[type[Event], Callable[[Event], None]] = {
            RequestEmit: self._emit, GpuSubmit: self._submit,
            GpuFirstToken: self._first_token, GpuEnd: self._end,
        }  # fmt: skip

    def __call__(self, event: Event) -> None:
        handle = self._handlers.get(type(event))
        if handle is not None:
            handle(event)

    def _emit(self, e: Event) -> None:
        assert isinstance(e, RequestEmit)
        with self._lock:
            if len(self._flight) >= MAX_TRACKED:
                del self._flight[next(iter(self._flight))]  # the oldest: aborted while waiting
            self._flight[e.request_id] = _InFlight(e.time, e.prompt_tokens)

    def _submit(self, e: Event) -> None:
        assert isinstance(e, GpuSubmit)
        with self._lock:
            req = self._flight.get(e.request_id)
            if req is None or req.scheduled is not None:
                return
            req.scheduled = e.time
        self._queue.observe(e.time - req.arrival)

    def _first_token(self, e: Event) -> None:
        assert isinstance(e, GpuFirstToken)
        with self._lock:
            req = self._flight.get(e.request_id)
            if req is None:
                return
            req.first_token = e.time
        self._ttft.observe(e.time - req.arrival)

    def _end(self, e: Event) -> None:
        assert isinstance(e, GpuEnd)
        with self._lock:
            req = self._flight.pop(e.request_id, None)
        self._success["abort" if e.aborted else "stop"].inc()
        if req is None or e.aborted:
            return  # an aborted request's times say when its client left, not the engine
        self._e2e.observe(e.time - req.arrival)
        self._prompt_len.observe(req.prompt_tokens)
        self._output_len.observe(e.output_tokens)
        if req.scheduled is not None:
            self._inference.observe(e.time - req.scheduled)
            if req.first_token is not None:
                self._prefill.observe(req.first_token - req.scheduled)
        if req.first_token is not None:
            decode = e.time - req.first_token
            self._decode.observe(decode)
            if e.output_tokens > 1:
                gap = decode / (e.output_tokens - 1)
                self._tpot.observe(gap)
                self._itl.observe(gap, e.output_tokens - 1)
