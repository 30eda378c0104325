"""The tool runtime: the worker queue, its events, input checks, pinning, unsafe mode, endings."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
from pathlib import Path

import pytest
from tools_helpers import ROOT_USER, host_pids, needs_bwrap, tool_runtime

from mars.core.errors import UsageError
from mars.core.events import Event, ToolEnd, ToolEnqueued, ToolStart
from mars.tools.cpus import format_cpu_list, parse_cpu_list
from mars.tools.runner import processes_of
from mars.tools.runtime import ToolCancelled, ToolInputError, ToolResult
from mars.tools.sandbox import cgroup_v2_available
from mars.tools.workspace import OWNER


@needs_bwrap
def test_runs_wait_only_for_a_worker_first_come_first_served() -> None:
    events: list[Event] = []

    async def scenario() -> None:
        async with tool_runtime(events, workers=2) as rt:
            runs = [asyncio.create_task(rt.run(f"s{i}", "sleep 1", 10)) for i in range(4)]
            await asyncio.sleep(0.3)
            assert (rt.workers, rt.busy, rt.queued) == (2, 2, 2)
            done = await asyncio.gather(*runs)
            results.update(zip([f"s{i}" for i in range(4)], done, strict=True))
            assert (rt.busy, rt.queued) == (0, 0)

    results: dict[str, ToolResult] = {}
    asyncio.run(scenario())
    kinds = [type(e) for e in events]
    assert kinds.count(ToolEnqueued) == kinds.count(ToolStart) == kinds.count(ToolEnd) == 4
    # A run joins the queue once its workspace's first disk walk (a thread) is back, so the
    # order of arrival is the order of `ToolEnqueued`, not of the calls.
    arrived = [e.session_id for e in events if isinstance(e, ToolEnqueued)]
    starts = [e.session_id for e in events if isinstance(e, ToolStart)]
    assert starts == arrived  # the queue is first come, first served
    waits = [results[s].queue_wait_s for s in arrived]
    assert waits[0] < 0.2 and waits[1] < 0.2
    assert 0.9 < waits[2] < 1.6 and 0.9 < waits[3] < 1.6
    assert all(0.95 < r.run_s < 1.6 and r.exit_code == 0 for r in results.values())
    ends = {e.session_id: e for e in events if isinstance(e, ToolEnd)}
    assert ends["s3"].queue_wait_s == pytest.approx(_wait_from_events(events, "s3"), abs=1e-9)
    assert all(e.category == "other" for e in events if isinstance(e, ToolStart))


def _wait_from_events(events: list[Event], session_id: str) -> float:
    enq = next(e.time for e in events if isinstance(e, ToolEnqueued) and e.session_id == session_id)
    start = next(e.time for e in events if isinstance(e, ToolStart) and e.session_id == session_id)
    return start - enq


@needs_bwrap
def test_the_category_comes_from_the_command_unless_named() -> None:
    events: list[Event] = []

    async def scenario() -> None:
        async with tool_runtime(events) as rt:
            await rt.run("c", "python3 -m pytest --version", 20)
            await rt.run("c", "ls", 5, name="view-files")

    asyncio.run(scenario())
    enqueued = [e for e in events if isinstance(e, ToolEnqueued)]
    assert [(e.category, e.cpu_heavy) for e in enqueued] == [("test", True), ("view-files", True)]


@pytest.mark.parametrize(
    ("command", "timeout_s", "param"),
    [
        ("", 5.0, "command"),
        ("   ", 5.0, "command"),
        ("echo \0", 5.0, "command"),
        ("x" * 70_000, 5.0, "command"),
        ("ls", 0.0, "timeout_s"),
        ("ls", -1.0, "timeout_s"),
        ("ls", math.inf, "timeout_s"),
        ("ls", math.nan, "timeout_s"),
        ("ls", 3601.0, "timeout_s"),
    ],
)
def test_bad_runs_are_refused_with_the_field_to_fix(
    command: str, timeout_s: float, param: str
) -> None:
    async def scenario() -> None:
        async with tool_runtime(unsafe=True) as rt:
            with pytest.raises(ToolInputError) as info:
                await rt.run("v", command, timeout_s)
            assert info.value.param == param
            assert rt.workspaces.get("v") is None  # refused before anything was created

    asyncio.run(scenario())


@needs_bwrap
def test_end_session_kills_its_tools_and_removes_the_workspace() -> None:
    async def scenario() -> None:
        async with tool_runtime() as rt:
            await rt.run("e", "mkdir -p d/locked && touch d/locked/f && chmod 000 d/locked d", 5)
            running = asyncio.create_task(rt.run("e", "sleep 32.5", 20))
            other = await rt.run("keep", "echo x > f", 5)
            assert other.exit_code == 0
            while len(host_pids("sleep 32.5")) < 2:
                await asyncio.sleep(0.05)
            ws = rt.workspaces.get("e")
            assert ws is not None
            assert await rt.end_session("e")
            with pytest.raises(ToolCancelled):
                await running
            assert not ws.path.exists() and host_pids("sleep 32.5") == []
            kept = rt.workspaces.get("keep")
            assert kept is not None and (kept.path / "f").is_file()
            assert not await rt.end_session("e")  # already gone
            again = await rt.run("e", "ls -A | wc -l", 5)  # a new, empty workspace
            assert again.stdout.strip() == "0"

    asyncio.run(scenario())


def test_unsafe_mode_runs_in_the_workspace_with_limits_and_kills_the_tree() -> None:
    async def scenario() -> None:
        async with tool_runtime(unsafe=True) as rt:
            r = await rt.run("u", "pwd; ulimit -c; ulimit -v", 5)
            ws = rt.workspaces.get("u")
            assert ws is not None
            assert r.stdout.split() == [str(ws.path), "0", str(2 << 20)]
            hung = await rt.run("u", "sleep 1003.75 & sleep 1004.75", 0.5)
            assert hung.timed_out and hung.exit_code == 137
            await asyncio.sleep(0.1)
            assert host_pids("sleep 1003.75", "sleep 1004.75") == []
            if ROOT_USER:  # a daemon that left the process group dies with its session's uid
                daemon = "setsid sleep 1005.75 > /dev/null 2>&1 < /dev/null & sleep 0.3"
                await rt.run("u", daemon, 5)
                assert ws.uid is not None and processes_of(ws.uid)
                await rt.end_session("u")
                assert host_pids("sleep 1005.75") == []

    asyncio.run(scenario())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs to show")
def test_tool_processes_are_pinned_to_the_tool_cpus() -> None:
    last = max(os.sched_getaffinity(0))

    async def scenario() -> None:
        async with tool_runtime(unsafe=True, cpus=(last,)) as rt:
            assert rt.workers == 1
            r = await rt.run("p", "grep Cpus_allowed_list /proc/self/status", 5)
            assert r.stdout.split()[-1] == str(last)

    asyncio.run(scenario())


def test_cpu_lists_parse_and_name_what_is_wrong() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus
    assert parse_cpu_list(f" {cpus[0]} ") == [cpus[0]]
    assert format_cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    for bad, words in (("", "expected numbers"), ("a-b", "expected numbers"), ("3-1", "LOW-HIGH")):
        with pytest.raises(UsageError, match=words):
            parse_cpu_list(bad)
    with pytest.raises(UsageError, match="no CPU 4096 here"):
        parse_cpu_list("4096")


def test_cgroup_v2_detection_answers_without_failing() -> None:
    cgroup = Path("/proc/self/cgroup").read_text()
    if any(":memory:" in line for line in cgroup.splitlines()):
        assert not cgroup_v2_available()  # a v1 memory controller: rlimits only
    else:
        assert isinstance(cgroup_v2_available(), bool)


@pytest.mark.parametrize("unsafe", [False, True])
def test_the_start_up_check_starts_one_tool_and_leaves_no_workspace(unsafe: bool) -> None:
    if not unsafe and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")

    async def scenario() -> None:
        async with tool_runtime(unsafe=unsafe) as rt:
            rt.check()
            root = rt.workspaces.root
            assert rt.workspaces.opened() == [] and list(root.iterdir()) == [root / OWNER]

    asyncio.run(scenario())
