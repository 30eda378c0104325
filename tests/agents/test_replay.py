"""The replay agent against a real `mars serve` subprocess with the default small model: prompts
grow as the trace says (the server's prefix cache hits from turn 2 on), outputs have the trace's
lengths, tools run through the tools API, and requests the admission queue turns away are retried
after Retry-After."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not importable: run ./scripts/setup.sh --dev",
    exc_type=ImportError,
)

from factories import TRACES
from mars.agents.cpuwork import CpuCalibration
from mars.agents.probe import tools_api_status
from mars.agents.prompts import PromptBuilder
from mars.agents.replay import ReplayConfig, ReplayOutcome, replay
from mars.bench.liveserver import mars_server, unsafe_tools
from mars.sim.workload import SessionSpec, ToolSpec, TurnSpec, WorkloadConfig, build_workload

pytestmark = pytest.mark.skipif(not TRACES.is_file(), reason=f"no trace file at {TRACES}")
SERVE = ["--kv-tokens", "4096", "--threads", "2", *unsafe_tools()]
# Measured once on the test host would cost 2 s; the tests only need runs that exit 0.
CPU = CpuCalibration(iterations_per_s=2e7, startup_s=0.02)


def workload(sessions: int, turns: int) -> list[SessionSpec]:
    """The first `turns` calls of a seeded sample, tools 20 ms each (two of them CPU-heavy)."""
    specs = build_workload(TRACES, WorkloadConfig(sessions, seed=3, token_scale=0.01))
    tools = (ToolSpec("test", True, 0.02, "measured"), ToolSpec("view", False, 0.02, "measured"))
    out = []
    for s in specs:
        short = [replace(t, tools=tools) for t in s.turns[:turns]]
        out.append(replace(s, turns=tuple(short)))
    return out


def run(specs: list[SessionSpec], **config: object) -> ReplayOutcome:
    return asyncio.run(replay(specs, ReplayConfig(**config)))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with mars_server(SERVE, log) as base:
        yield base


@pytest.fixture(scope="module")
def tools_api(server: str) -> bool:
    """Whether this server runs tools (POST /v1/sessions/{id}/tools)."""
    return asyncio.run(tools_api_status(server)) == 200


def test_prompts_follow_the_trace_without_a_server() -> None:
    spec = SessionSpec(
        "s", "t", (TurnSpec(10, 3, 0, ()), TurnSpec(20, 2, 13, ()), TurnSpec(14, 1, 10, ()))
    )
    b = PromptBuilder(spec)
    p0 = b.prompt(spec.turns[0])
    b.answered(p0, spec.turns[0], [7, 8, 9])
    p1 = b.prompt(spec.turns[1])
    assert len(p1) == 20 and p1[:13] == [*p0, 7, 8, 9]  # appended: all of prompt + output
    b.answered(p1, spec.turns[1], None)  # no ids from the server: a filler of 2 tokens
    p2 = b.prompt(spec.turns[2])
    assert len(p2) == 14 and p2[:10] == p0 and p2[10:] != p1[10:14]  # elided: first prompt
    assert PromptBuilder(spec).prompt(spec.turns[0]) == p0  # seeded per session


def test_replay_grows_prompts_and_hits_the_prefix_cache(server: str, tools_api: bool) -> None:
    specs = workload(sessions=2, turns=3)
    out = run(
        specs, base_url=server, concurrency=2, tools="api" if tools_api else "client", cpu=CPU
    )
    assert out.failed == 0, [r.error for r in out.records]
    for spec, rec in zip(specs, out.records, strict=True):
        assert rec.done_s is not None and rec.arrival_s is not None
        assert [t.prompt_tokens for t in rec.turns] == [t.prompt_tokens for t in spec.turns]
        assert [t.output_tokens for t in rec.turns] == [t.output_tokens for t in spec.turns]
        assert rec.turns[0].cached_tokens == 0
        for turn, done in zip(spec.turns[1:], rec.turns[1:], strict=True):
            assert turn.reuse_tokens > 0
            # The previous prompt is reused; its output is a filler unless the server sends ids.
            assert 0 < done.cached_tokens <= turn.reuse_tokens
        assert len(rec.tools) == 2 * len(spec.turns)
        if tools_api:
            assert all(t.exit_code == 0 and t.run_s > 0 for t in rec.tools)
        result = rec.result(ideal_s=1.0)
        assert result.latency_s is not None and result.output_tokens == spec.total_output_tokens


def test_a_tool_that_fails_ends_its_session_as_failed(server: str, tools_api: bool) -> None:
    if not tools_api:
        pytest.skip("this server has no tools API yet (POST /v1/sessions/{id}/tools)")
    (spec,) = workload(sessions=1, turns=1)
    bad = replace(
        spec, turns=(replace(spec.turns[0], tools=(ToolSpec("test", True, 0.01, "measured"),)),)
    )
    broken = CpuCalibration(1.0, 0.0, python="/nonexistent/python3")
    out = run([bad], base_url=server, concurrency=1, cpu=broken)
    assert out.failed == 1 and out.records[0].done_s is None and out.records[0].error


def test_sessions_too_long_for_the_server_are_rejected_up_front(server: str) -> None:
    specs = workload(sessions=1, turns=1)
    out = run(specs, base_url=server, rate=100.0, tools="client", max_context=1)
    rec = out.records[0]
    assert rec.rejected and not rec.turns and out.failed == 0
    assert rec.result(None).rejected


def test_turned_away_requests_are_retried_after_retry_after(tmp_path: Path) -> None:
    # One session admitted at a time (an AIMD window fixed at 1) and one waiting: the third
    # session's first call gets 429 with Retry-After until a place in the queue frees.
    args = [*SERVE, "--policy", "mars", "--max-queued", "1"]
    for setting in ("window_start=1", "window_min=1", "window_inc=0"):
        args += ["--set", setting]
    specs = workload(sessions=3, turns=2)
    with mars_server(args, tmp_path / "serve.log") as base:
        out = run(specs, base_url=base, concurrency=3, tools="client")
    assert out.failed == 0, [r.error for r in out.records]
    assert all(r.done_s is not None for r in out.records)
    assert sum(t.retries for r in out.records for t in r.turns) >= 1
