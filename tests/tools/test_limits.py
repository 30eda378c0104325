"""Limits per run and per workspace, not per process: real processes, real bubblewrap, no mocks.

Each test goes past one limit the way issue 19 did (three processes that together hold too much,
a write into /dev, two files that together fill the workspace, many processes) and checks that
the run is killed with its reason, that nothing is left on the host, and that the host still
forks. Sizes stay small (at most ~1 GiB at once) so the tests fit a small machine.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from tools_helpers import host_pids, needs_bwrap, tool_runtime

from mars.tools.runtime import WorkspaceFull
from mars.tools.sandbox import Limits
from mars.tools.usage import disk_usage

# What a workspace of 40 MiB files past a 50 MiB quota reports: the walk may see one half-written.
OVER_QUOTA = r"disk quota: the workspace holds (5\d|[67]\d|80)\.\d MiB, over its 50\.0 MiB quota"
HOG = "python3 -c 'import time; b = bytearray(300 << 20); time.sleep({marker})'"


async def _gone(*markers: str) -> bool:
    for _ in range(40):
        if not host_pids(*markers):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.parametrize("unsafe", [False, pytest.param(True, id="unsafe")])
def test_processes_that_together_pass_the_memory_limit_are_killed(unsafe: bool) -> None:
    if not unsafe and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")

    async def scenario() -> None:
        async with tool_runtime(unsafe=unsafe, limits=Limits(memory_bytes=512 << 20)) as rt:
            one = await rt.run("m", HOG.format(marker="0.01"), 20)
            assert (one.exit_code, one.killed) == (0, None), one  # 300 MiB alone fits
            three = " ".join(f"{HOG.format(marker=30.125)} &" for _ in range(3)) + " wait"
            r = await rt.run("m", three, 20)
            assert r.exit_code == 137 and not r.timed_out and r.run_s < 5, r
            assert r.killed is not None and r.killed.startswith("memory limit: the run held ")
            assert r.killed.endswith("over its 512.0 MiB (--tool-memory-mb)")
            assert r.stderr.endswith(f"mars killed this run: {r.killed}\n")
            assert await _gone("time.sleep(30.125)")
            again = await rt.run("m", "echo alive", 5)
            assert (again.stdout, again.killed) == ("alive\n", None)

    asyncio.run(scenario())
    assert subprocess.run(["true"], check=False).returncode == 0


@needs_bwrap
def test_what_tmp_holds_counts_as_the_runs_memory() -> None:
    async def scenario() -> None:
        limits = Limits(memory_bytes=256 << 20, tmp_bytes=512 << 20)
        async with tool_runtime(limits=limits) as rt:
            if not rt.sandbox.tmpfs:
                pytest.skip("this bwrap has no --size: /tmp is not a mount of its own size")
            r = await rt.run("t", "head -c 300000000 /dev/zero > /tmp/x; sleep 30.25", 20)
            assert r.killed is not None and r.killed.startswith("memory limit"), r
            assert r.run_s < 5 and await _gone("sleep 30.25")

    asyncio.run(scenario())


@needs_bwrap
def test_dev_takes_no_files_and_dev_shm_is_capped() -> None:
    async def scenario() -> None:
        async with tool_runtime(limits=Limits(shm_bytes=16 << 20)) as rt:
            if not rt.sandbox.tmpfs:
                pytest.skip("this bwrap has no --size: /dev/shm is read-only instead")
            lock = "python3 -c 'import multiprocessing as m; m.Lock(); print(\"lock ok\")'"
            script = (
                f"{lock}; echo y > /dev/null && echo null ok; head -c 4 /dev/urandom | wc -c; "
                "head -c 104857600 /dev/zero > /dev/big; "
                "head -c 104857600 /dev/zero > /dev/shm/big; wc -c < /dev/shm/big"
            )
            r = await rt.run("d", script, 20)
            assert r.stdout.split("\n")[:3] == ["lock ok", "null ok", "4"], r
            assert int(r.stdout.split()[-1]) <= 16 << 20
            assert "/dev/big: Read-only file system" in r.stderr
            assert "No space left on device" in r.stderr and r.killed is None

    asyncio.run(scenario())
    assert not Path("/dev/big").exists()


@needs_bwrap
def test_a_workspace_past_its_quota_stops_the_run_and_takes_only_deletes() -> None:
    async def scenario() -> None:
        async with tool_runtime(limits=Limits(disk_bytes=50 << 20)) as rt:
            dd = "dd if=/dev/zero bs=1M count=40 status=none of="
            r = await rt.run("q", f"{dd}a && {dd}b && sleep 30.625", 20)
            assert r.exit_code == 137 and r.run_s < 5 and await _gone("sleep 30.625"), r
            # The walk may catch the workspace while b is still being written: 50-80 MiB.
            assert r.killed is not None and re.match(OVER_QUOTA, r.killed), r.killed
            assert "delete files" in r.killed and r.killed in r.stderr
            for refused in ("ls", "rm -f a; echo more > c", "rm -f a && touch c", "rm $(ls)"):
                with pytest.raises(WorkspaceFull, match="delete files first"):
                    await rt.run("q", refused, 5)
            elsewhere = await rt.run("other", "echo fine", 5)  # the quota is per workspace
            assert elsewhere.stdout == "fine\n"
            deleted = await rt.run("q", "rm -f a", 5)
            assert (deleted.exit_code, deleted.killed) == (0, None)
            assert (await rt.run("q", "ls", 5)).stdout == "b\n"
            # A run that writes past the quota and ends before a walk: the next run is refused.
            fast = await rt.run("q", f"{dd}c", 5)
            assert fast.killed is None or fast.killed.startswith("disk quota"), fast
            with pytest.raises(WorkspaceFull, match=OVER_QUOTA.removeprefix("disk quota: the ")):
                await rt.run("q", "ls", 5)
            await rt.run("q", "rm -f b c", 5)
            assert (await rt.run("q", "ls | wc -l", 5)).stdout == "0\n"

    asyncio.run(scenario())


@pytest.mark.parametrize("unsafe", [False, pytest.param(True, id="unsafe")])
def test_a_run_past_its_process_limit_is_killed(unsafe: bool) -> None:
    if not unsafe and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")

    async def scenario() -> None:
        async with tool_runtime(unsafe=unsafe, limits=Limits(processes=50)) as rt:
            r = await rt.run("p", "for i in $(seq 80); do sleep 30.375 & done; wait", 20)
            assert r.exit_code == 137 and r.run_s < 5, r
            assert r.killed is not None and r.killed.startswith("process limit: the run had ")
            assert r.killed.endswith("processes, over its 50")
            assert await _gone("sleep 30.375")
            # Another session: in unsafe mode the killed processes' zombies wait for the host's
            # init to reap them, and count against the session uid's RLIMIT_NPROC until then.
            fits = await rt.run("p2", "for i in $(seq 20); do sleep 0.2 & done; wait; echo ok", 10)
            assert (fits.stdout, fits.killed) == ("ok\n", None)

    asyncio.run(scenario())
    assert subprocess.run(["true"], check=False).returncode == 0


def test_disk_usage_counts_blocks_once_and_reads_what_a_tool_hid(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * (1 << 20))
    os.link(tmp_path / "f", tmp_path / "hard-link")
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(100 << 20)
    hidden = tmp_path / "d" / "e"
    hidden.mkdir(parents=True)
    (hidden / "g").write_bytes(b"y" * (1 << 20))
    hidden.parent.chmod(0)
    try:
        used = disk_usage(tmp_path, 100)
        assert used.unreadable is None and not used.cut
        assert used.entries == 6
        assert 2 << 20 <= used.bytes < 3 << 20  # f once, g, no sparse hole
        assert disk_usage(tmp_path, 3).cut
    finally:
        hidden.parent.chmod(0o700)
