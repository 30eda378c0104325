"""`mars sim --events` writes the live event schema in simulated time; `mars timeline` pairs any
events file into spans and draws it as PNG or HTML; `mars sweep` and `mars bench` link one run's
timeline per policy."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from factories import TRACES
from mars.bench.liveserver import unsafe_tools
from mars.cli import main
from mars.core.events import Event, EventBus
from mars.sched.registry import make_policy
from mars.sim.eventlog import EventLog
from mars.sim.experiment import SimSpec, load_specs
from mars.sim.run import Arrivals, SimConfig, Simulation
from mars.timeline.spans import Row, build, load
from sim_helpers import COST

ROOT = Path(__file__).resolve().parents[2]
needs_traces = pytest.mark.skipif(not TRACES.is_file(), reason=f"no trace file at {TRACES}")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What the simulator models of the live stream: every kind but an abort (no client leaves).
SIM_KINDS = {
    "session_arrived", "session_admitted", "session_done", "request_emit", "gpu_submit",
    "gpu_first_token", "gpu_end", "tool_enqueued", "tool_start", "tool_end", "admission_window",
}  # fmt: skip
TINY = [
    "--traces", str(TRACES), "--sessions", "8", "--token-scale", "0.3", "--time-scale", "2",
    "--tool-workers", "2", "--kv-scale", "0.1", "--rate", "0.5", "--no-progress",
]  # fmt: skip


def _event_classes() -> dict[str, type[Event]]:
    out: dict[str, type[Event]] = {}
    todo: list[type[Event]] = [Event]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        out[cls.kind] = cls
    return out


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_schema(records: list[dict[str, Any]]) -> None:
    """Every record is one event dataclass's fields, plus `event` and `ts`, of their types."""
    classes = _event_classes()
    for r in records:
        cls = classes[r["event"]]
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(r) == names | {"event", "ts"}, r
        assert isinstance(r["ts"], float | int)
        event = cls(**{k: r[k] for k in names})
        assert {**event.to_json(), "ts": r["ts"]} == r  # a round trip is the same record


@needs_traces
def test_sim_events_are_the_live_schema_in_simulated_time(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    assert main(["sim", *TINY, "--policy", "mars", "--events", str(events)]) == 0
    records = _records(events)
    check_schema(records)
    kinds = {r["event"] for r in records}
    assert kinds >= SIM_KINDS, SIM_KINDS - kinds
    assert kinds & {"kv_evict", "kv_offload", "kv_restore", "kv_retain"}
    assert all(r["ts"] == r["time"] for r in records)  # simulated seconds, no wall clock
    times = [r["time"] for r in records]
    assert times == sorted(times)  # written in the order the bus published them
    # One seed, one file: the same bytes on a second run.
    again = tmp_path / "again.jsonl"
    assert main(["sim", *TINY, "--policy", "mars", "--events", str(again)]) == 0
    assert again.read_bytes() == events.read_bytes()


@needs_traces
def test_spans_add_up_to_what_the_simulator_measured(tmp_path: Path) -> None:
    spec = SimSpec(traces=str(TRACES), sessions=8, token_scale=0.3, rate=1.0)
    specs = load_specs(spec)
    bus, path = EventBus(), tmp_path / "events.jsonl"
    config = SimConfig(tool_workers=2, kv_tokens=60_000)
    with EventLog(path).attach(bus):
        sim = Simulation(specs, make_policy("mars", {}), COST, Arrivals(concurrency=4), config, bus)
        outcome = sim.run()
    timeline = load(path)
    rows = {r.session_id: r for r in timeline.rows}
    assert set(rows) == {r.session_id for r in outcome.records}
    assert any(s.phase == "tool queue" for r in rows.values() for s in r.spans)
    for rec in outcome.records:
        row = rows[rec.session_id]
        assert len(row.calls) == rec.turns
        for i, call in enumerate(row.calls):  # wait + prefill + decode is the call, emit to end
            parts = [s for s in row.spans if s.label.startswith(f"call {i + 1}:")]
            phases = [s for s in parts if s.phase != "preempted"]
            assert [s.phase for s in phases] == ["call wait", "prefill", "decode"]
            assert call.end is not None
            assert sum(s.seconds for s in phases) == pytest.approx(call.end - call.emit)

        def total(phase: str, row: Row = row) -> float:
            return sum(s.seconds for s in row.spans if s.phase == phase)

        assert total("call wait") == pytest.approx(rec.call_wait_s, abs=1e-6)
        assert total("prefill") == pytest.approx(rec.prefill_s, abs=1e-6)
        assert total("decode") == pytest.approx(rec.decode_s, abs=1e-6)
        assert rec.admitted_s is not None
        assert total("admission") == pytest.approx(rec.admitted_s - rec.arrival_s, abs=1e-9)
        assert row.done == rec.done_s


def test_pairing_of_hand_written_events() -> None:
    e = [
        {"event": "session_arrived", "time": 0.0, "session_id": "a"},
        {"event": "session_admitted", "time": 1.0, "session_id": "a", "wait_s": 1.0},
        {"event": "request_emit", "time": 1.0, "session_id": "a", "request_id": "a-0",
         "prompt_tokens": 100, "reuse_tokens": 0},
        {"event": "gpu_submit", "time": 1.5, "session_id": "a", "request_id": "a-0",
         "cached_tokens": 0},
        {"event": "gpu_preempt", "time": 2.0, "session_id": "a", "request_id": "a-0",
         "lost_tokens": 50},
        {"event": "gpu_submit", "time": 3.0, "session_id": "a", "request_id": "a-0",
         "cached_tokens": 32},
        {"event": "gpu_first_token", "time": 4.0, "session_id": "a", "request_id": "a-0"},
        {"event": "gpu_end", "time": 6.0, "session_id": "a", "request_id": "a-0",
         "output_tokens": 20},
        {"event": "kv_retain", "time": 6.0, "session_id": "a", "tokens": 120},
        {"event": "tool_end", "time": 10.0, "session_id": "a", "category": "test",
         "duration_s": 3.0, "queue_wait_s": 1.0},
        {"event": "request_emit", "time": 10.0, "session_id": "a", "request_id": "a-1",
         "prompt_tokens": 130, "reuse_tokens": 120},
        {"event": "session_arrived", "time": 5.0, "session_id": "b"},  # never admitted
    ]  # fmt: skip
    t = build(e)
    a, b = t.rows
    assert a.session_id == "a" and b.session_id == "b"
    spans = [(s.phase, s.start, s.end) for s in a.spans]
    assert spans == [
        ("admission", 0.0, 1.0),
        ("call wait", 1.0, 1.5),
        ("prefill", 1.5, 4.0),
        ("preempted", 2.0, 3.0),
        ("decode", 4.0, 6.0),
        ("tool queue", 6.0, 7.0),
        ("tool run", 7.0, 10.0),
        ("call wait", 10.0, 10.0),  # still waiting when the file ends: drawn to its end
    ]
    assert [(s.phase, s.start, s.end) for s in b.spans] == [("admission", 5.0, 10.0)]
    assert t.notes and "still open" in t.notes[0]
    # KV held (derived): the prompt from the first token, the pin after the end.
    assert (4.0, 100) in t.kv and (6.0, 120) in t.kv


@needs_traces
def test_timeline_draws_png_and_html(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    assert main(["sim", *TINY, "--policy", "mars", "--events", str(events)]) == 0
    png, page = tmp_path / "t.png", tmp_path / "t.html"
    assert main(["timeline", str(events), "-o", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and 10_000 < len(data) < 300_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 800 and height > 400
    assert main(["timeline", str(events), "-o", str(page)]) == 0
    html = page.read_text()
    sessions = {r["session_id"] for r in _records(events) if r["event"] == "session_arrived"}
    assert html.count("<g class='session'") == len(sessions) == 8
    for sid in sessions:
        assert f"data-session='{sid}'" in html
    bars = sum(len(r.spans) for r in load(events).rows)
    assert bars > 8 * 10 and html.count("</title></rect>") == bars  # hover text on every bar
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org", "")
    # Rows are capped, and the page says so.
    assert main(["timeline", str(events), "-o", str(page), "--sessions", "3"]) == 0
    html = page.read_text()
    assert html.count("<g class='session'") == 3 and "first 3 of 8 sessions" in html


def _mars(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mars", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("", "holds no events"),
        ("hello\n{}\n", "line 1 is not JSON"),
        ('{"time": 1}\n', 'no "event" field'),
        ('{"event": "gpu_end"}\n', 'numeric "time"'),
    ],
)
def test_bad_events_file_is_one_error_line(
    tmp_path: Path, content: str | None, message: str
) -> None:
    events = tmp_path / "events.jsonl"
    if content is not None:
        events.write_text(content)
    proc = _mars("timeline", str(events), "-o", str(tmp_path / "t.png"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("mars: error:") and str(events) in line and message in line, line
    assert "--events" in line  # what to give instead
    assert not (tmp_path / "t.png").exists()


def test_bad_output_name_is_an_error(tmp_path: Path) -> None:
    events = tmp_path / "e.jsonl"
    events.write_text('{"event": "session_arrived", "time": 0.0, "session_id": "a", "ts": 0}\n')
    proc = _mars("timeline", str(events), "-o", str(tmp_path / "t.svg"))
    assert proc.returncode == 2 and ".png or .html" in proc.stderr


@needs_traces
def test_sweep_report_links_a_timeline_per_policy(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = _mars(
        "sweep", "--traces", str(TRACES), "--policies", "fcfs,mars", "--rates", "0.05,0.2",
        "--sessions", "6", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = (out / "report.md").read_text()
    assert "## Timelines" in report
    for policy in ("fcfs", "mars"):
        png = out / f"timeline-{policy}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({png.name})" in report and f"](events-{policy}.jsonl)" in report
        records = _records(out / f"events-{policy}.jsonl")
        check_schema(records)
    # The run drawn is the highest rate's: its sessions arrive within 6 / 0.2 s or so.
    results = json.loads((out / "results.json").read_text())
    (mars,) = [r for r in results if r["policy"] == "mars" and r["rate"] == 0.2]
    arrivals = {s["session_id"]: s["arrival_s"] for s in mars["per_session"]}
    drawn = {r["session_id"]: r["time"] for r in records if r["event"] == "session_arrived"}
    assert drawn == pytest.approx(arrivals)


@needs_traces
def test_live_bench_events_draw_and_the_report_links_them(tmp_path: Path) -> None:
    """A real `mars serve` (the embedded default model) under `mars bench`: its events file is
    the schema the simulator writes, and `mars timeline` draws it."""
    pytest.importorskip("llama_cpp", exc_type=ImportError)
    out = tmp_path / "out"
    proc = _mars(
        "bench", "--traces", str(TRACES), "--policies", "mars", "--sessions", "2",
        "--concurrency", "2", "--token-scale", "0.005", "--time-scale", "0.01",
        "--client-tools", "--kv-tokens", "4096", "--out", str(out), "--no-progress",
        *unsafe_tools(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (events,) = out.glob("events-01-mars-seed0.jsonl")  # kept without --events: the timeline's
    records = _records(events)
    check_schema(records)
    assert any(r["ts"] != r["time"] for r in records)  # wall-clock ts: a live file
    kinds = {r["event"] for r in records}
    assert {"session_arrived", "request_emit", "gpu_first_token", "gpu_end", "tool_end"} <= kinds
    report = (out / "report.md").read_text()
    assert "## Timelines" in report and "](timeline-mars.png)" in report
    assert (out / "timeline-mars.png").read_bytes()[:8] == PNG_SIGNATURE
    timeline = load(events)
    assert not timeline.simulated
    replayed = {r["session_id"] for r in json.loads((out / "results.json").read_text())[0][
        "per_session"]}  # fmt: skip
    assert replayed <= {r.session_id for r in timeline.rows}
    page = tmp_path / "live.html"
    assert main(["timeline", str(events), "-o", str(page)]) == 0
    assert page.read_text().count("<g class='session'") == len(timeline.rows)
