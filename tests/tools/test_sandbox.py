"""Nothing a session runs reaches outside its workspace: real bubblewrap, real processes, no mocks.

Each test plays an escape or an abuse (reading or writing elsewhere, signalling another session,
the network, a hang, a fork bomb, a memory hog, a flood of output) and checks the host afterwards.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from tools_helpers import ROOT_USER, host_pids, needs_bwrap, needs_root, tool_runtime

from mars.tools.runner import processes_of
from mars.tools.runtime import ToolCancelled
from mars.tools.sandbox import Limits

pytestmark = needs_bwrap


def test_a_session_cannot_read_another_sessions_workspace() -> None:
    async def scenario() -> None:
        async with tool_runtime() as rt:
            a = await rt.run("a", "echo secret-of-a > secret.txt && pwd", 10)
            assert a.exit_code == 0 and a.stdout == "/work\n"
            a_path = rt.workspaces.get("a")
            assert a_path is not None and (a_path.path / "secret.txt").is_file()
            root = rt.workspaces.root
            for attempt in (
                f"cat {a_path.path}/secret.txt",
                f"ls {root}",
                "cat /work/../*/secret.txt",
                "ls / /work/.. /tmp; find / -name secret.txt 2>/dev/null",
                "grep -rs secret-of-a / --exclude-dir=usr --exclude-dir=proc 2>/dev/null",
            ):
                b = await rt.run("b", attempt, 10)
                assert "secret-of-a" not in b.stdout + b.stderr, attempt
                assert a_path.path.name not in b.stdout, attempt

    asyncio.run(scenario())


def test_writes_outside_the_workspace_fail_or_stay_inside_the_sandbox() -> None:
    with tempfile.TemporaryDirectory() as host_dir:

        async def scenario() -> None:
            async with tool_runtime() as rt:
                root = rt.workspaces.root
                targets = [
                    "/usr/escape",
                    "/escape",
                    f"{host_dir}/escape",
                    f"{root}/escape",
                    "/work/../escape",
                    "/proc/sys/kernel/hostname",
                ]
                for target in targets:
                    r = await rt.run("w", f"echo x > {target}", 10)
                    assert r.exit_code != 0, (target, r)
                # The sandbox's /tmp is its own: writing there leaves the host's untouched.
                r = await rt.run("w", "echo x > /tmp/escape && cat /tmp/escape", 10)
                assert r.stdout == "x\n"
                assert not Path("/tmp/escape").exists()
                assert not (root / "escape").exists() and not Path(host_dir, "escape").exists()
                assert not Path("/usr/escape").exists() and not Path("/escape").exists()

        asyncio.run(scenario())


def test_a_session_cannot_signal_another_sessions_process() -> None:
    async def scenario() -> None:
        async with tool_runtime() as rt:
            long = asyncio.create_task(rt.run("a", "sleep 31.5", 20))
            for _ in range(100):
                pids = host_pids("sleep 31.5")
                if len(pids) >= 3:  # bwrap, its pid 1, the sleep
                    break
                await asyncio.sleep(0.05)
            sleep_pid = max(pids)
            tries = await rt.run("b", f"kill -9 {sleep_pid}; kill -9 -1; echo sent", 10)
            assert tries.exit_code == 0 and "sent" in tries.stdout
            assert set(host_pids("sleep 31.5")) == set(pids), "session b killed a's sleep"
            assert not long.done()
            await rt.end_session("a")
            assert host_pids("sleep 31.5") == []
            with pytest.raises(ToolCancelled, match="ended while the tool ran"):
                await long

    asyncio.run(scenario())


def test_the_network_is_unreachable() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.1)
        port = server.getsockname()[1]
        connect = (
            'python3 -c "import socket,sys; s=socket.socket(); s.settimeout(2); '
            "s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')\""
        )

        async def scenario() -> None:
            async with tool_runtime() as rt:
                for host, to in (("127.0.0.1", port), ("1.1.1.1", 53), ("8.8.8.8", 443)):
                    r = await rt.run("n", f"{connect} {host} {to}", 10)
                    assert r.exit_code != 0 and "connected" not in r.stdout, (host, r)
                    assert "Error" in r.stderr  # refused or unreachable, not a timeout
                r = await rt.run("n", "cat /proc/net/dev | tail -n +3", 10)
                assert all(line.split(":")[0].strip() == "lo" for line in r.stdout.splitlines())

        asyncio.run(scenario())
        try:
            server.accept()
            raise AssertionError("a tool reached a host port")
        except TimeoutError:
            pass


def test_a_hanging_tool_is_killed_at_its_timeout_and_leaves_nothing_behind() -> None:
    async def scenario() -> None:
        async with tool_runtime() as rt:
            start = time.monotonic()
            r = await rt.run("h", "sleep 1000.75 & sleep 1001.75", 1)
            assert r.timed_out and r.exit_code == 137
            assert 1.0 <= time.monotonic() - start < 3
            assert 1.0 <= r.run_s < 3
            for _ in range(40):
                if not host_pids("sleep 1000.75", "sleep 1001.75"):
                    break
                await asyncio.sleep(0.05)
            assert host_pids("sleep 1000.75", "sleep 1001.75") == []
            ws = rt.workspaces.get("h")
            assert ws is not None
            if ws.uid is not None:
                assert processes_of(ws.uid) == []
            again = await rt.run("h", "echo alive", 5)
            assert (again.stdout, again.exit_code, again.timed_out) == ("alive\n", 0, False)

    asyncio.run(scenario())


def test_a_fork_bomb_is_contained() -> None:
    async def scenario() -> None:
        async with tool_runtime() as rt:
            # Each copy stays alive (`sleep`), so the count climbs to RLIMIT_NPROC: the supervisor
            # kills the run past its 256 processes, or the kernel's limit holds until the timeout.
            # (dash refuses `:` as a function name, so the classic `:(){ :|:& };:` never forks.)
            r = await rt.run("bomb", "f(){ f|f & sleep 30.5; }; f", 3)
            assert r.timed_out or r.exit_code != 0
            assert r.killed is None or r.killed.startswith(("process limit", "timeout")), r
            for _ in range(40):
                if not host_pids("sleep 30.5"):
                    break
                await asyncio.sleep(0.05)
            assert host_pids("sleep 30.5") == []
            ws = rt.workspaces.get("bomb")
            assert ws is not None
            if ws.uid is not None:
                for _ in range(40):
                    if not processes_of(ws.uid):
                        break
                    await asyncio.sleep(0.05)
                assert processes_of(ws.uid) == []
            ok = await rt.run("other", "echo fine", 5)
            assert ok.stdout == "fine\n"

    asyncio.run(scenario())
    assert subprocess.run(["true"], check=False).returncode == 0  # the host still forks


def test_a_memory_hog_fails_alone() -> None:
    async def scenario() -> None:
        async with tool_runtime(limits=Limits(memory_bytes=1 << 30)) as rt:
            r = await rt.run("m", "python3 -c 'b = bytearray(8 << 30); print(len(b))'", 20)
            assert r.exit_code != 0 and "MemoryError" in r.stderr
            fine = await rt.run("m", "python3 -c 'b = bytearray(64 << 20); print(len(b))'", 20)
            assert fine.stdout == f"{64 << 20}\n"

    asyncio.run(scenario())


def test_output_is_capped_and_a_flood_does_not_block() -> None:
    async def scenario() -> None:
        async with tool_runtime(limits=Limits(output_bytes=1000)) as rt:
            r = await rt.run("o", "head -c 50000000 /dev/zero | tr '\\0' a; echo err >&2", 20)
            assert r.exit_code == 0 and not r.timed_out and r.truncated
            assert r.stdout == "a" * 1000 and r.stderr == "err\n"
            small = await rt.run("o", "echo short", 5)
            assert not small.truncated

    asyncio.run(scenario())


@needs_root
def test_sessions_have_their_own_uid_and_private_directories() -> None:
    async def scenario() -> None:
        async with tool_runtime() as rt:
            a = await rt.run("a", "id -u", 5)
            b = await rt.run("b", "id -u", 5)
            assert a.stdout != b.stdout and int(a.stdout) >= 200_000
            ws = rt.workspaces.get("a")
            assert ws is not None and ws.path.stat().st_uid == int(a.stdout)
            assert ws.path.stat().st_mode & 0o777 == 0o700

    assert ROOT_USER
    asyncio.run(scenario())
