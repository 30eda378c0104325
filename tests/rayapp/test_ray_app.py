"""`mars serve --ray local --replicas 2`: the Ray Serve app on a local head limited to this
machine's cores, two replicas of the embedded engine behind `MarsRequestRouter` and the global
control actor. A short trace replay (tools through the tools API) keeps its sessions on their
replica, with the prefix hit rate of one `mars serve`; the admission window holds across the
replicas; a replica killed mid-run fails only the call in flight, clearly, and its sessions go
on on a live replica (last: it kills one).

Heavy (a Ray head, two engines): run with MARS_RAY=1, as `scripts/test.sh`'s Ray stage does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("MARS_RAY") != "1":
    pytest.skip(
        "the Ray app's tests run with MARS_RAY=1 (scripts/test.sh)", allow_module_level=True
    )
pytest.importorskip("ray.serve", reason="Ray Serve is not installed: ./scripts/setup.sh --dev")

import httpx

from factories import TRACES
from mars.agents.cpuwork import CpuCalibration
from mars.agents.replay import ReplayConfig, ReplayOutcome, replay
from mars.bench.liveserver import free_port, mars_server, unsafe_tools
from mars.sim.workload import SessionSpec, ToolSpec, WorkloadConfig, build_workload

# One window of 2 sessions for the whole app: the window test needs it; the others fit in it.
WINDOW = ("--set", "window_start=2", "--set", "window_min=2", "--set", "window_inc=0")
SERVE = ["--policy", "mars", "--kv-tokens", "4096", *unsafe_tools()]
APP = [*SERVE, *WINDOW, "--set", "dormant_floor_s=1e9", "--sse-keepalive", "0.2"]
CPU = CpuCalibration(iterations_per_s=2e7, startup_s=0.02)  # the tools need only exit 0
START_S = 240.0


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("ray") / "app.log"
    port = free_port()
    cmd = [sys.executable, "-m", "mars", "serve", "--ray", "local", "--replicas", "2"]
    with log.open("w") as out:
        # Its own process group: a signal meant for it must not reach pytest, nor the reverse.
        proc = subprocess.Popen(
            [*cmd, "--port", str(port), *APP],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while len(up(base)) < 2:
            assert proc.poll() is None, f"mars serve --ray exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no 2 replicas in {START_S} s: {log}"
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Its replicas' engines got the window flags: none may outlive the app.
        engines = subprocess.run(
            ["pgrep", "-f", "--", "mars serve.*window_start=2"], text=True, capture_output=True
        )
        assert not engines.stdout, f"engines left behind: {engines.stdout}"


def up(base: str) -> list[dict[str, Any]]:
    try:
        state = httpx.get(f"{base}/v1/upstreams", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return []
    return [r for r in state.get("data", []) if r["up"]]


def state(base: str) -> dict[str, Any]:
    out: dict[str, Any] = httpx.get(f"{base}/v1/upstreams", timeout=10).json()
    return out


def chat(base: str, sid: str, turn: int, **body: Any) -> httpx.Response:
    messages = [
        {"role": "system", "content": "You are a careful coding agent. " * 12},
        {"role": "user", "content": f"Session {sid}: fix the failing test."},
    ]
    for i in range(turn):
        messages += [
            {"role": "assistant", "content": f"Step {i}: ran the tests."},
            {"role": "user", "content": f"Observation {i}: 1 failed."},
        ]
    payload = {"model": "mars", "messages": messages, "max_tokens": 4, **body}
    headers = {"X-Session-ID": sid}
    return httpx.post(f"{base}/v1/chat/completions", json=payload, headers=headers, timeout=120)


def workload() -> list[SessionSpec]:
    specs = build_workload(TRACES, WorkloadConfig(4, seed=5, token_scale=0.01))
    tools = (ToolSpec("test", True, 0.02, "measured"),)
    return [replace(s, turns=tuple(replace(t, tools=tools) for t in s.turns[:4])) for s in specs]


def hit_rate(outcome: ReplayOutcome) -> float:
    assert outcome.failed == 0, [r.error for r in outcome.records]
    turns = [t for r in outcome.records for t in r.turns]
    return sum(t.cached_tokens for t in turns) / sum(t.prompt_tokens for t in turns)


def run(base: str) -> ReplayOutcome:
    config = ReplayConfig(base, concurrency=2, tools="api", cpu=CPU, seed=1)
    return asyncio.run(replay(workload(), config))


@pytest.mark.skipif(not TRACES.is_file(), reason=f"no trace file at {TRACES}")
def test_a_trace_replay_keeps_sessions_on_their_replica(app: str, tmp_path: Path) -> None:
    outcome = run(app)
    ray_hits = hit_rate(outcome)
    with mars_server(SERVE, tmp_path / "one.log") as one:
        one_hits = hit_rate(run(one))
    # Every call after a session's first found its history on the replica it went to.
    for record in outcome.records:
        assert all(t.cached_tokens > 0 for t in record.turns[1:]), record
    assert one_hits > 0.3
    assert ray_hits >= 0.9 * one_hits, (ray_hits, one_hits)
    assert state(app)["moved"] == 0
    tools = [t for r in outcome.records for t in r.tools]
    assert tools and all(t.exit_code == 0 for t in tools)  # the tools API, through the front


def test_the_window_holds_across_replicas(app: str) -> None:
    first, second = chat(app, "w1", 0), chat(app, "w2", 0)
    assert first.status_code == second.status_code == 200, first.text
    # A new session goes where pressure is lowest: the two are on different replicas.
    assert first.headers["x-mars-replica"] != second.headers["x-mars-replica"]
    lines: list[str] = []

    def third() -> None:
        body = {"model": "mars", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream(
            "POST",
            f"{app}/v1/chat/completions",
            json={**body, "max_tokens": 3},
            headers={"X-Session-ID": "w3"},
            timeout=60,
        ) as r:
            lines.extend(r.iter_lines())

    waiter = threading.Thread(target=third)
    waiter.start()
    deadline = time.monotonic() + 20
    while state(app)["queued"] != 1:
        assert time.monotonic() < deadline, state(app)
        time.sleep(0.2)
    # Each replica has one session and room for many: the global window of 2 holds the third.
    now = state(app)
    assert now["active"] == 2 and now["window"] == 2
    time.sleep(1.0)
    assert waiter.is_alive() and ": keep-alive" in lines
    assert httpx.delete(f"{app}/v1/sessions/w1", timeout=10).status_code == 200
    waiter.join(60)
    assert [x for x in lines if x][-1] == "data: [DONE]", lines
    assert '"content"' in "".join(lines), lines
    assert state(app)["peak_active"] == 2
    for sid in ("w2", "w3"):
        httpx.delete(f"{app}/v1/sessions/{sid}", timeout=10)


def test_a_killed_replica_fails_only_its_call_in_flight(app: str) -> None:
    assert chat(app, "k1", 0).status_code == 200
    assert chat(app, "k2", 0).status_code == 200
    placed = state(app)["sessions"]
    victim = placed["k1"]
    assert placed["k2"] != victim
    pid = next(r["pid"] for r in state(app)["data"] if r["id"] == victim)
    lines: list[str] = []

    def long_stream() -> None:
        body = {"stream": True, "max_tokens": 2000, "ignore_eos": True}
        messages = [{"role": "user", "content": "Write a long story."}]
        with httpx.stream(
            "POST",
            f"{app}/v1/chat/completions",
            json={"model": "mars", "messages": messages, **body},
            headers={"X-Session-ID": "k1"},
            timeout=60,
        ) as r:
            lines.extend(r.iter_lines())

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    time.sleep(2.0)
    os.kill(pid, signal.SIGKILL)  # the replica's Ray actor: its engine goes with it
    streamer.join(60)
    text = "".join(lines)
    assert '"content"' in text and "replica_died" in text, text[-2000:]
    assert [x for x in lines if x][-1] == "data: [DONE]"
    # The session goes on on a live replica (a cold prefill there); the other never noticed.
    again = chat(app, "k1", 1)
    assert again.status_code == 200, again.text
    assert again.headers["x-mars-replica"] != victim
    other = chat(app, "k2", 1)
    assert other.status_code == 200
    assert other.headers["x-mars-replica"] == placed["k2"]
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert state(app)["moved"] == 1
    for sid in ("k1", "k2"):
        httpx.delete(f"{app}/v1/sessions/{sid}", timeout=10)
