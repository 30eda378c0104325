"""The gateway in front of real upstreams: two `mars serve` replicas, and `mars serve --engine
openai --upstream ...` processes in front of them. Sessions stick to a replica and new ones
spread, streams are relayed, the session extras reach the upstream, a tiny window queues and
refuses, dead upstreams get a clear answer fast, and a killed replica's sessions go on
elsewhere (last: it kills one of the shared replicas)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not importable: run ./scripts/setup.sh --dev",
    exc_type=ImportError,
)
import httpx
from prometheus_client.parser import text_string_to_metric_families

from serving import ROOT, free_port


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    base: str


def start(*args: str, healthy: tuple[int, ...] = (200,), port: int | None = None) -> Proc:
    """`mars serve ARGS` on a free port, once /health answers one of `healthy`."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "mars", "serve", "--port", str(port), *args]
    env = {k: v for k, v in os.environ.items() if k != "MARS_API_KEY"}
    # Output to a file: a pipe nobody reads fills up (a line per request) and blocks the server.
    out = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process; gone with it)
    popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc = Proc(popen, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while True:
        if popen.poll() is not None:
            out.seek(0)
            raise AssertionError(out.read())
        with suppress(httpx.HTTPError):
            if httpx.get(f"{proc.base}/health", timeout=1).status_code in healthy:
                return proc
        if time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"{cmd} did not start in 60 s")
        time.sleep(0.1)


def stop(proc: Proc) -> None:
    proc.popen.terminate()
    proc.popen.wait(timeout=30)


def gateway(upstreams: list[str], *extra: str) -> Proc:
    ups = [a for url in upstreams for a in ("--upstream", url)]
    return start("--engine", "openai", *ups, *extra, healthy=(200, 503))


REPLICA = ("--kv-tokens", "8192", "--threads", "1")


@pytest.fixture(scope="module")
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        for _ in range(2):
            started.append(start(*REPLICA))
        yield started
    finally:
        for proc in started:
            stop(proc)


@pytest.fixture(scope="module")
def replicas(procs: list[Proc]) -> list[str]:
    return [p.base for p in procs]


@pytest.fixture(scope="module")
def gw(replicas: list[str]) -> Iterator[str]:
    proc = gateway(replicas, "--policy", "mars")
    yield proc.base
    stop(proc)


def complete(base: str, sid: str | None, prompt: Any, n: int = 3, **kw: Any) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": n, "min_tokens": n, "ignore_eos": True, **kw}
    if sid is not None:
        body["session_id"] = sid
    return httpx.post(f"{base}/v1/completions", json=body, timeout=60)


def placed(base: str) -> dict[str, str]:
    table: dict[str, str] = httpx.get(f"{base}/v1/upstreams", timeout=10).json()["sessions"]
    return table


def upstream_sessions(url: str) -> int:
    return int(httpx.get(f"{url}/v1/kv_cache_stats", timeout=10).json()["sessions"])


def wait_for(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def end(base: str, *sids: str) -> None:
    for sid in sids:
        assert httpx.delete(f"{base}/v1/sessions/{sid}", timeout=10).status_code == 200


def test_sessions_stick_to_a_replica_and_new_ones_spread(gw: str, replicas: list[str]) -> None:
    prompt = list(range(10, 60))
    first = complete(gw, "s1", prompt)
    assert first.status_code == 200, first.text
    home = first.headers["x-mars-upstream"]
    other = complete(gw, "s2", [7, 7, 7])
    assert other.headers["x-mars-upstream"] != home  # equal pressure: the emptier replica
    grown = prompt + [5] * 3 + list(range(70, 80))
    second = complete(gw, "s1", grown)
    assert second.headers["x-mars-upstream"] == home
    # The replica still held the session's KV: its prefix was a cache hit there.
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(prompt)
    assert placed(gw) == {"s1": home, "s2": other.headers["x-mars-upstream"]}
    metrics = httpx.get(f"{gw}/metrics", timeout=10).text
    assert f'mars:gateway_upstream_up{{upstream="{replicas[0]}"}} 1.0' in metrics
    assert "mars:gateway_admission_window_sessions " in metrics
    assert "mars:gateway_upstream_kv_cache_usage_perc{" in metrics
    assert 'mars:gateway_events_total{event="session_admitted",' in metrics
    # Each upstream's own page is passed on, labelled with it, in valid exposition format.
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    running = families["vllm:num_requests_running"].samples
    assert {s.labels["upstream"] for s in running} == set(replicas)
    end(gw, "s1", "s2")
    assert placed(gw) == {}


def test_streams_are_relayed_and_extras_reach_the_upstream(gw: str) -> None:
    # No session id: the gateway's fingerprint (of the text) travels in vllm_xargs, so the
    # upstream (which would fingerprint the tokens) answers with the gateway's id.
    plain = complete(gw, None, "Once upon a time")
    assert plain.json()["session_id"] == plain.headers["x-session-id"].strip()
    end(gw, plain.headers["x-session-id"])
    body = {"prompt": [1, 2, 3], "max_tokens": 4, "min_tokens": 4, "stream": True}
    body |= {"session_id": "st", "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gw}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        upstream = r.headers["x-mars-upstream"]
    assert len(lines) >= 4 and lines[-1] == "data: [DONE]"
    assert '"usage"' in lines[-2]
    assert upstream_sessions(upstream) >= 1
    before = upstream_sessions(upstream)
    # is_last_step as a header: the gateway puts it in vllm_xargs; the upstream ends the session.
    last = httpx.post(
        f"{gw}/v1/completions",
        json={"prompt": [1, 2, 3, 9], "max_tokens": 2, "session_id": "st"},
        headers={"X-MARS-Is-Last-Step": "true"},
        timeout=60,
    )
    assert last.status_code == 200 and last.headers["x-mars-upstream"] == upstream
    wait_for(lambda: upstream_sessions(upstream) == before - 1)
    assert "st" not in placed(gw)


def test_a_client_that_leaves_cancels_the_upstream_request(gw: str, replicas: list[str]) -> None:
    body = {"prompt": [5, 6], "max_tokens": 6000, "min_tokens": 6000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw}/v1/completions", json={**body, "session_id": "gone"}, timeout=1.0)

    def stats(key: str) -> int:
        return sum(httpx.get(f"{u}/v1/kv_cache_stats", timeout=10).json()[key] for u in replicas)

    wait_for(lambda: stats("running") == 0, timeout=10)  # aborted upstream, not run to 6000
    assert "gone" not in placed(gw)  # a first call that failed leaves no session behind


def test_upstream_errors_are_relayed_with_their_status(gw: str) -> None:
    r = httpx.post(
        f"{gw}/v1/completions", json={"prompt": [1], "max_tokens": 2, "model": "nope"}, timeout=30
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    bad = httpx.post(f"{gw}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert bad.status_code == 422 and "messages" in bad.json()["error"]["message"]
    assert httpx.get(f"{gw}/v1/models", timeout=30).json()["data"][0]["id"]


def test_a_tiny_window_queues_then_refuses(replicas: list[str]) -> None:
    tiny = gateway(
        replicas,
        *("--policy", "mars", "--set", "window_start=1", "--set", "window_min=1"),
        *("--set", "window_inc=0", "--set", "dormant_floor_s=1e9"),
        *("--max-queued", "2", "--queue-timeout", "2"),
        *("--sse-keepalive", "0.2"),
    )
    base = tiny.base
    try:
        assert complete(base, "holder", [1, 2, 3]).status_code == 200  # holds the window
        late: list[tuple[httpx.Response, float]] = []
        lines: list[str] = []

        def wait() -> None:
            t0 = time.monotonic()
            late.append((complete(base, "waiter", [4, 5]), time.monotonic() - t0))

        def stream() -> None:
            body = {"prompt": [7, 8], "max_tokens": 2, "stream": True, "session_id": "streamer"}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
                assert r.status_code == 200
                lines.extend(r.iter_lines())

        waiters = [threading.Thread(target=wait), threading.Thread(target=stream)]
        for i, waiter in enumerate(waiters, 1):
            waiter.start()
            queued = f"mars:gateway_admission_queued_sessions {i}.0"
            wait_for(lambda q=queued: q in httpx.get(f"{base}/metrics", timeout=10).text)
        refused = complete(base, "refused", [6])
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        for waiter in waiters:
            waiter.join(30)
        ((response, waited),) = late
        assert response.status_code == 503 and 1.5 < waited < 8, response.text
        assert response.json()["error"]["code"] == "admission_timeout"
        # The waiting stream was kept alive, then told in the stream.
        assert ": keep-alive" in lines and "admission_timeout" in "".join(lines), lines
        assert [line for line in lines if line][-1] == "data: [DONE]"
        end(base, "holder")
        assert complete(base, "after", [8, 8]).status_code == 200
    finally:
        stop(tiny)


def test_all_upstreams_down_is_answered_fast_and_clearly() -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    down = gateway(dead)
    base = down.base
    try:
        t0 = time.monotonic()
        r = complete(base, "x", [1, 2])
        assert time.monotonic() - t0 < 10
        assert r.status_code in (502, 503) and r.headers["retry-after"]
        message = r.json()["error"]["message"]
        assert all(f"{url}: down (cannot connect" in message for url in dead), message
        assert "--upstream" in message
        assert httpx.get(f"{base}/health", timeout=10).status_code == 503
    finally:
        stop(down)


def test_a_killed_replicas_sessions_go_on_elsewhere(gw: str, procs: list[Proc]) -> None:
    """Last in the module: it kills a shared replica."""
    one, two = (complete(gw, sid, [3, 1, 4, 1, 5]) for sid in ("k1", "k2"))
    homes = {one.headers["x-mars-upstream"], two.headers["x-mars-upstream"]}
    assert homes == {p.base for p in procs}
    victim = one.headers["x-mars-upstream"]
    stop(next(p for p in procs if p.base == victim))
    again = complete(gw, "k1", [3, 1, 4, 1, 5, 9, 2, 6])
    assert again.status_code == 200, again.text
    assert again.headers["x-mars-upstream"] != victim  # a cold prefill on the survivor
    assert placed(gw)["k1"] != victim
    metrics = httpx.get(f"{gw}/metrics", timeout=10).text
    assert f'mars:gateway_upstream_up{{upstream="{victim}"}} 0.0' in metrics
    assert "mars:gateway_sessions_moved_total 1.0" in metrics
    # The replica restarts (the session table is the gateway's): it is back once healthy, and
    # takes the next new session (it has none).
    index = next(i for i, p in enumerate(procs) if p.base == victim)
    procs[index] = start(*REPLICA, port=int(victim.rsplit(":", 1)[1]))
    wait_for(lambda: f'up{{upstream="{victim}"}} 1.0' in httpx.get(f"{gw}/metrics").text)
    assert complete(gw, "k3", [2, 7]).headers["x-mars-upstream"] == victim
