"""Retention in the live engine: with KV for one session at a time, a session whose KV a
newcomer needs resumes warm under `mars` (offloaded to host memory at its tool call, restored
exactly) and cold under `fcfs` (its cached prefix was taken). The step-time model that prices
the choice is learned from the engine's own steps."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not importable: run ./scripts/setup.sh --dev",
    exc_type=ImportError,
)
httpx = pytest.importorskip("httpx", reason="httpx is a dev dependency: pip install -e .[dev]")

from factories import make_request  # noqa: E402
from mars.sched.plan import StepPlan  # noqa: E402
from mars.sched.timer import OnlineStepTimer  # noqa: E402
from serving import serve  # noqa: E402

TIGHT = ("--kv-tokens", "1024", "--batch-tokens", "256")


def _complete(base: str, sid: str, prompt: list[int]) -> dict[str, object]:
    body = {"prompt": prompt, "max_tokens": 4, "min_tokens": 4, "ignore_eos": True}
    body |= {"session_id": sid, "return_token_ids": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _resume_cached(base: str) -> int:
    """Cached tokens of session A's second call after B filled the KV in between."""
    a = [1000 + i for i in range(600)]
    first = _complete(base, "A", a)
    ids = first["choices"][0]["token_ids"]  # type: ignore[index]
    _complete(base, "B", [5000 + i for i in range(900)])  # needs most of A's blocks
    second = _complete(base, "A", [*a, *ids, 7, 8, 9])
    return int(second["usage"]["prompt_tokens_details"]["cached_tokens"])  # type: ignore[index]


@pytest.fixture(scope="module")
def fcfs() -> Iterator[str]:
    yield from serve(*TIGHT, "--policy", "fcfs")


@pytest.fixture(scope="module")
def mars() -> Iterator[str]:
    yield from serve(*TIGHT, "--policy", "mars")


def test_mars_resumes_warm_where_fcfs_recomputes(fcfs: str, mars: str) -> None:
    cold = _resume_cached(fcfs)
    warm = _resume_cached(mars)
    assert cold < 200, cold  # B took most of the prefix (LRU evicts tail first)
    assert warm >= 600, warm  # offloaded at the tool call, restored on return
    stats = httpx.get(f"{mars}/v1/kv_cache_stats", timeout=30).json()
    assert stats["offloads"] >= 1 and stats["restores"] >= 1, stats
    assert stats["restore_fallbacks"] == 0  # a real copy (defragmenting the cells first)


def test_online_timer_learns_the_steps_line() -> None:
    timer = OnlineStepTimer()
    for n in [8, 64, 256, 32, 128, 1, 200] * 60:
        plan = StepPlan(0)
        plan.add(make_request(prompt=n), n)
        timer.observe(plan, 0.01 + 0.002 * n)
    a, b = timer.line
    assert a == pytest.approx(0.01, rel=0.05) and b == pytest.approx(0.002, rel=0.05)
    assert timer.step_seconds(1, 500, 0, 0) == pytest.approx(1.01, rel=0.05)
    timer.observe_copy(10_000, 0.01)
    assert 0 < timer.transfer_seconds(2000) < 0.01
