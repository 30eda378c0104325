"""What a Prometheus scrape costs: `GET /metrics` answer time of a `mars serve` with 64 sessions'
requests in flight (decoding, or waiting for a batch slot), side by side with an idle server
started with the same options; the two are scraped in turn, alternating which goes first. The
ratio is the loaded server's median over the idle one's (the engine thread's steps share the
process with the scrape); the absolute times are what Prometheus waits; the exposition's size is
printed too (its families do not grow with sessions: no per-session label).

Usage: .venv/bin/python scripts/bench_metrics.py [--sessions 64] [--scrapes 60]
       [--out out/bench_metrics.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mars.bench.liveserver import mars_server

ROOT = Path(__file__).resolve().parents[1]
GOAL_MS = 50.0
MAX_TOKENS = 512  # long enough to stay in flight through the scrapes
MAX_SEQUENCES = 63  # llama.cpp's 64 sequences, less the engine's scratch one


@contextmanager
def server(sessions: int) -> Iterator[str]:
    """A fresh `mars serve` with KV and slots for `sessions` (the rest wait for a slot)."""
    kv = sessions * (MAX_TOKENS + 64)
    batch = min(sessions, MAX_SEQUENCES)
    args = ["--policy", "fcfs", "--kv-tokens", str(kv), "--max-sessions", str(batch)]
    os.environ.pop("MARS_API_KEY", None)  # the scrapes send no key
    with (
        tempfile.TemporaryDirectory() as tmp,
        mars_server([*args, "--threads", "2"], Path(tmp) / "serve.log") as base,
    ):
        yield base


def load(base: str, sessions: int, stop: threading.Event) -> threading.Thread:
    """`sessions` streaming completions (one per session) that run until `stop`."""

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": f"Session {i}: tell a long story.", "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "stream": True, "session_id": f"bench-{i}"}  # fmt: skip
        async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
            async for _ in r.aiter_lines():
                if stop.is_set():
                    return  # closing the stream aborts the request

    async def all_() -> None:
        limits = httpx.Limits(max_connections=sessions + 4)
        async with httpx.AsyncClient(timeout=None, limits=limits) as client:
            await asyncio.gather(*(one(client, i) for i in range(sessions)))

    thread = threading.Thread(target=lambda: asyncio.run(all_()), daemon=True)
    thread.start()
    return thread


def value(text: str, name: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return float(s.value)
    return 0.0


def scrape(client: httpx.Client, base: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = client.get(f"{base}/metrics")
    ms = (time.perf_counter() - t0) * 1e3
    r.raise_for_status()
    return ms, len(r.content)


def summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=10)
    return {"median_ms": statistics.median(times), "p90_ms": q[-1], "max_ms": max(times)}


def run(args: argparse.Namespace) -> dict[str, object]:
    stop = threading.Event()
    with server(args.sessions) as idle, server(args.sessions) as busy, httpx.Client() as client:
        loader = load(busy, args.sessions, stop)
        try:
            deadline = time.monotonic() + 120
            while True:
                text = client.get(f"{busy}/metrics").text
                running = value(text, "vllm:num_requests_running")
                in_flight = running + value(text, "vllm:num_requests_waiting")
                in_flight += value(text, "mars:admission_queued_sessions")
                if in_flight >= args.sessions and value(text, "vllm:generation_tokens_total"):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {in_flight:g} of {args.sessions} sessions in flight")
                time.sleep(0.2)
            times: dict[str, list[float]] = {"idle": [], "busy": []}
            size = {"idle": 0, "busy": 0}
            for i in range(args.scrapes):
                order = [("idle", idle), ("busy", busy)]
                for name, base in order if i % 2 else order[::-1]:
                    ms, size[name] = scrape(client, base)
                    times[name].append(ms)
            text = client.get(f"{busy}/metrics").text
            still = value(text, "vllm:num_requests_running")
        finally:
            stop.set()
            loader.join(30)
    result = {name: {**summary(t), "bytes": size[name]} for name, t in times.items()}
    ratio = result["busy"]["median_ms"] / result["idle"]["median_ms"]
    return {
        "sessions": args.sessions,
        "running_at_start": running,
        "running_at_end": still,
        "scrapes": args.scrapes,
        "goal_ms": GOAL_MS,
        "ratio_median": ratio,
        **result,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--scrapes", type=int, default=60)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench_metrics.json")
    args = p.parse_args()
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    busy, idle = res["busy"], res["idle"]
    assert isinstance(busy, dict) and isinstance(idle, dict)
    print(f"{'server':<8}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}{'bytes':>9}")
    for name, row in (("idle", idle), ("busy", busy)):
        print(f"{name:<8}{row['median_ms']:>11.2f}{row['p90_ms']:>9.2f}"
              f"{row['max_ms']:>9.2f}{row['bytes']:>9}")  # fmt: skip
    verdict = "under" if busy["p90_ms"] < GOAL_MS else "OVER"
    print(
        f"/metrics with {res['sessions']} sessions in flight ({res['running_at_start']:g} "
        f"running): median {busy['median_ms']:.2f} ms, p90 {busy['p90_ms']:.2f} ms "
        f"({verdict} the {GOAL_MS:g} ms goal), {res['ratio_median']:.2f}x idle "
        f"({idle['median_ms']:.2f} ms); {args.out}"
    )


if __name__ == "__main__":
    main()
