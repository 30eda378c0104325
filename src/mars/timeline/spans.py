"""Events (the JSON lines of `mars serve --events` or `mars sim --events`) paired into spans.

A session row holds, in its events' `time` (seconds: simulated, or since the server started):
its admission wait (`session_arrived` -> `session_admitted`); per LLM call its wait (`request_emit`
-> first `gpu_submit`), prefill (-> `gpu_first_token`), decode (-> `gpu_end`) and any preempted
stretch (`gpu_preempt` -> the next `gpu_submit`); per tool run its queue and its run, from the
`tool_end`'s `duration_s` and `queue_wait_s` (a live server that only infers a tool phase from the
gap between calls sends no `tool_start`). Spans still open when the file ends (a server stopped
mid-run) end at the last event, marked unfinished.

No event carries a KV gauge, so KV use is derived: tokens held by calls on the GPU (the cached
prefix from `gpu_submit`, the prompt from the first token, prompt and output at the end) and by
sessions a policy pinned through a tool (`kv_retain`, until their next call or their end; an
unpin sends no event, so a pin released early still counts). Evictions, offloads and restores are
kept as instants. The admission window is `admission_window`'s (window, active), where a policy
keeps one.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mars.core.errors import UsageError

PHASES = ("admission", "call wait", "prefill", "decode", "preempted", "tool queue", "tool run")
HINT = "give a JSONL file that `mars serve --events FILE` or `mars sim --events FILE` wrote"


@dataclass(frozen=True, slots=True)
class Span:
    start: float
    end: float
    phase: str  # one of PHASES
    label: str  # hover text: what ran, its tokens

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(slots=True)
class Call:
    """One LLM call's instants (None: not seen)."""

    request_id: str
    emit: float
    prompt_tokens: int = 0
    reuse_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    submit: float | None = None
    first_token: float | None = None
    end: float | None = None
    preempts: list[list[float]] = field(default_factory=list)  # [preempted at, resubmitted at]


@dataclass(slots=True)
class Row:
    session_id: str
    arrived: float | None = None
    admitted: float | None = None
    done: float | None = None
    rejected: bool = False
    calls: list[Call] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)

    @property
    def first_seen(self) -> float:
        times = [self.arrived, *(c.emit for c in self.calls), *(s.start for s in self.spans)]
        return min((t for t in times if t is not None), default=0.0)


@dataclass(slots=True)
class Timeline:
    source: str  # the file it was read from
    rows: list[Row]  # in order of arrival
    start: float
    end: float
    kinds: Counter[str]
    kv: list[tuple[float, int]]  # (time, tokens held), a step function
    kv_instants: dict[str, list[tuple[float, int]]]  # kv_evict/offload/restore: (time, tokens)
    window: list[tuple[float, int, int]]  # (time, window, active)
    simulated: bool  # every record's `ts` is its `time` (`mars sim --events`)
    notes: list[str] = field(default_factory=list)

    def first(self, n: int | None) -> tuple[list[Row], str]:
        """The first `n` rows by arrival (all for None), and a note saying so if cut."""
        if n is None or n >= len(self.rows):
            return self.rows, f"{len(self.rows)} sessions"
        return self.rows[:n], f"first {n} of {len(self.rows)} sessions by arrival (--sessions)"


def read_events(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of an events file, and notes on what was skipped; UsageError naming the file
    and what to do when it is missing or not an events file."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory; {HINT}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"events file {path} not found; {HINT}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read events file {path} ({e}); {HINT}") from None
    lines = text.splitlines()
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and records:  # a server stopped mid-write
                notes.append(f"line {n} cut short, skipped")
                continue
            raise UsageError(f"{path} line {n} is not JSON ({e.msg}); {HINT}") from None
        if not isinstance(record, dict) or not isinstance(record.get("event"), str):
            raise UsageError(f'{path} line {n} is not an event (no "event" field); {HINT}')
        if record["event"] == "dropped":  # an SSE client's loss marker, not an event
            continue
        if not isinstance(record.get("time"), int | float):
            raise UsageError(f'{path} line {n}: event without a numeric "time"; {HINT}')
        records.append(record)
    if not records:
        raise UsageError(f"{path} holds no events; {HINT}")
    return records, notes


def load(path: Path) -> Timeline:
    records, notes = read_events(path)
    timeline = build(records, str(path))
    timeline.notes[:0] = notes
    return timeline


def build(records: list[dict[str, Any]], source: str = "") -> Timeline:
    """Pair `records` (in the order they were written) into rows of spans."""
    b = _Builder()
    for r in records:
        b.add(r)
    return b.finish(source)


class _Builder:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.calls: dict[str, Call] = {}
        self.tools_open: dict[str, list[tuple[float, str]]] = {}  # tool_start without an end
        self.held: dict[str, int] = {}  # session -> KV tokens held (derived)
        self.total = 0
        self.kv: list[tuple[float, int]] = []
        self.instants: dict[str, list[tuple[float, int]]] = {}
        self.window: list[tuple[float, int, int]] = []
        self.kinds: Counter[str] = Counter()
        self.start = float("inf")
        self.end = float("-inf")
        self.simulated = True

    def row(self, sid: str) -> Row:
        row = self.rows.get(sid)
        if row is None:
            row = self.rows[sid] = Row(sid)
        return row

    def hold(self, t: float, sid: str, tokens: int) -> None:
        self.total += tokens - self.held.get(sid, 0)
        self.held[sid] = tokens
        if self.kv and self.kv[-1][0] == t:
            self.kv[-1] = (t, self.total)
        else:
            self.kv.append((t, self.total))

    def add(self, r: dict[str, Any]) -> None:
        kind, t, sid = r["event"], float(r["time"]), str(r.get("session_id", ""))
        self.kinds[kind] += 1
        if r.get("ts", t) != t:
            self.simulated = False
        self.start, self.end = min(self.start, t), max(self.end, t)
        if kind == "admission_window":
            self.window.append((t, int(r.get("window", 0)), int(r.get("active", 0))))
        elif kind == "session_arrived":
            self.row(sid).arrived = t
        elif kind == "session_admitted":
            row = self.row(sid)
            row.admitted = t
            if row.arrived is None:
                row.arrived = t - float(r.get("wait_s", 0.0))
        elif kind == "session_done":
            row = self.row(sid)
            row.done, row.rejected = t, bool(r.get("rejected", False))
            self.hold(t, sid, 0)
        elif kind in ("request_emit", "gpu_submit", "gpu_first_token", "gpu_end", "gpu_preempt"):
            self.call_event(kind, t, sid, r)
        elif kind == "tool_start":
            self.tools_open.setdefault(sid, []).append((t, str(r.get("category", "?"))))
        elif kind == "tool_end":
            self.tool_end(t, sid, r)
        elif kind == "kv_retain":
            self.hold(t, sid, int(r.get("tokens", 0)))
        elif kind in ("kv_evict", "kv_offload", "kv_restore"):
            self.instants.setdefault(kind, []).append((t, int(r.get("tokens", 0))))

    def call_event(self, kind: str, t: float, sid: str, r: dict[str, Any]) -> None:
        rid = str(r.get("request_id", ""))
        call = self.calls.get(rid)
        if call is None:  # a call emitted before the file began: from its first event on
            call = self.calls[rid] = Call(rid, t)
            self.row(sid).calls.append(call)
        if kind == "request_emit":
            call.emit = t
            call.prompt_tokens = int(r.get("prompt_tokens", 0))
            call.reuse_tokens = int(r.get("reuse_tokens", 0))
        elif kind == "gpu_submit":
            if call.submit is None:
                call.submit, call.cached_tokens = t, int(r.get("cached_tokens", 0))
            elif call.preempts and len(call.preempts[-1]) == 1:
                call.preempts[-1].append(t)
            self.hold(t, sid, int(r.get("cached_tokens", 0)))
        elif kind == "gpu_first_token":
            call.first_token = t
            self.hold(t, sid, call.prompt_tokens)
        elif kind == "gpu_preempt":
            call.preempts.append([t])
            self.hold(t, sid, 0)
        else:
            call.end, call.output_tokens = t, int(r.get("output_tokens", 0))
            self.hold(t, sid, 0)  # its KV is cached (evictable) now, unless a kv_retain follows

    def tool_end(self, t: float, sid: str, r: dict[str, Any]) -> None:
        category = str(r.get("category", "?"))
        run_s = max(0.0, float(r.get("duration_s", 0.0)))
        wait_s = max(0.0, float(r.get("queue_wait_s", 0.0)))
        opened = self.tools_open.get(sid)
        if opened:
            for i, (_, cat) in enumerate(opened):
                if cat == category:
                    del opened[i]
                    break
        row = self.row(sid)
        started = t - run_s
        if wait_s > 0:
            queued = f"{category}: queued {wait_s:.3g} s for a worker"
            row.spans.append(Span(started - wait_s, started, "tool queue", queued))
        row.spans.append(Span(started, t, "tool run", f"{category}: ran {run_s:.3g} s"))

    def finish(self, source: str) -> Timeline:
        end = self.end
        notes: list[str] = []
        unfinished = 0
        for sid, opened in self.tools_open.items():
            for t, category in opened:
                self.row(sid).spans.append(Span(t, end, "tool run", f"{category}: unfinished"))
                unfinished += 1
        for row in self.rows.values():
            if row.arrived is not None and row.admitted is not None:
                wait = row.admitted - row.arrived
                row.spans.append(
                    Span(row.arrived, row.admitted, "admission", f"waited {wait:.3g} s")
                )
            elif row.arrived is not None and row.done is None and not row.calls:
                row.spans.append(Span(row.arrived, end, "admission", "still waiting"))
                unfinished += 1
            for i, call in enumerate(row.calls):
                unfinished += _call_spans(row, i, call, end)
            row.spans.sort(key=lambda s: (s.start, PHASES.index(s.phase)))
        if unfinished:
            notes.append(f"{unfinished} spans still open at the file's end (drawn to it)")
        rows = sorted((r for r in self.rows.values() if r.session_id), key=lambda r: r.first_seen)
        start = self.start if self.start != float("inf") else 0.0
        return Timeline(
            source,
            rows,
            start,
            max(end, start),
            self.kinds,
            self.kv,
            self.instants,
            self.window,
            self.simulated,
            notes,
        )


def _call_spans(row: Row, i: int, call: Call, end: float) -> int:
    """Add call `i`'s spans to `row`; how many were still open."""
    tokens = f"prompt {call.prompt_tokens}, cached {call.cached_tokens}"
    name = f"call {i + 1}"
    marks = [call.emit, call.submit, call.first_token, call.end]
    phases = ("call wait", "prefill", "decode")
    texts = (
        f"{name}: waited for the engine ({tokens})",
        f"{name}: prefill ({tokens})",
        f"{name}: decode ({call.output_tokens} tokens)",
    )
    open_spans = 0
    for k, phase in enumerate(phases):
        a, b = marks[k], marks[k + 1]
        if a is None:
            break
        if b is None:
            row.spans.append(Span(a, end, phase, texts[k] + ", unfinished"))
            open_spans += 1
            break
        row.spans.append(Span(a, b, phase, texts[k]))
    for p in call.preempts:
        back = p[1] if len(p) > 1 else end
        row.spans.append(Span(p[0], back, "preempted", f"{name}: preempted, waiting to resume"))
    return open_spans


def decimate(
    points: list[tuple[float, int]], start: float, end: float, bins: int = 2000
) -> list[tuple[float, int]]:
    """At most about `bins` points of a step function or of instants, one per time bin: the bin's
    largest value, so a peak narrower than a pixel is still drawn."""
    if len(points) <= 2 * bins:
        return points
    width = max(end - start, 1e-9) / bins
    out: list[tuple[float, int]] = []
    current = -1
    for t, v in points:
        b = int((t - start) / width)
        if b != current:
            out.append((t, v))
            current = b
        elif v > out[-1][1]:
            out[-1] = (out[-1][0], v)
    return out
