"""Run one command line to completion under a timeout, with capped output, killing its whole tree.

The process starts in its own session (so its own process group); at the timeout, or when the
caller is cancelled, the group gets SIGKILL. In a sandbox that kills bwrap, whose pid 1 dies with
it and takes the whole pid namespace along; in unsafe mode the group is all there is, so a tool
that calls `setsid` itself escapes it (`kill_uid` at the session's end catches it when each
session has its own uid). While it runs, a `supervise` callback (`Supervisor.watch`) may bound
its memory, processes and disk and kill it earlier; `Outcome.killed` then says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mars.tools.supervisor import Watch

_CHUNK = 1 << 16
_GRACE_S = 1.0  # how long output may still arrive after the process died


@dataclass(frozen=True)
class Outcome:
    """How a process ended. `exit_code` follows the shell: 128 + N when killed by signal N."""

    stdout: bytes
    stderr: bytes
    exit_code: int
    timed_out: bool
    truncated: bool  # stdout or stderr went past the cap
    killed: str | None = None  # why it was killed (a limit, the timeout), or None: it ended


async def run_process(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    timeout_s: float,
    output_cap: int,
    uid: int | None = None,
    supervise: Callable[[int], Watch] | None = None,
) -> Outcome:
    """Run `argv` (as `uid` when given, which needs root) and wait at most `timeout_s`;
    `supervise(pid)` starts watching the process's limits."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
        user=uid,
        group=uid,
        extra_groups=[] if uid is not None else None,
    )
    assert proc.stdout is not None and proc.stderr is not None
    watch = supervise(proc.pid) if supervise is not None else None
    readers = [
        asyncio.ensure_future(_drain(proc.stdout, output_cap)),
        asyncio.ensure_future(_drain(proc.stderr, output_cap)),
    ]
    timed_out = False
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            timed_out = True
    finally:
        # Also after a normal exit: in unsafe mode, background children may still hold the pipes.
        _kill_group(proc.pid)
        await proc.wait()
        if watch is not None:
            watch.release()
        _, pending = await asyncio.wait(readers, timeout=_GRACE_S)
        for task in pending:
            task.cancel()
    (out, out_cut), (err, err_cut) = (
        t.result() if not t.cancelled() else (b"", True) for t in readers
    )
    code = proc.returncode if proc.returncode is not None else -signal.SIGKILL
    killed = watch.reason if watch is not None else None
    if killed is None and timed_out:
        killed = f"timeout: the run took longer than {timeout_s:g} s"
    code = code if code >= 0 else 128 - code
    return Outcome(out, err, code, timed_out, out_cut or err_cut, killed)


async def _drain(stream: asyncio.StreamReader, cap: int) -> tuple[bytes, bool]:
    """Read `stream` to its end, keeping the first `cap` bytes: the writer never blocks."""
    kept = bytearray()
    cut = False
    while chunk := await stream.read(_CHUNK):
        room = cap - len(kept)
        if room > 0:
            kept += chunk[:room]
        cut = cut or len(chunk) > room
    return bytes(kept), cut


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def processes_of(uid: int) -> list[int]:
    """The live (not zombie) pids whose real uid is `uid`, read from /proc."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            zombie = fields["State"].split()[0] in ("Z", "X")
            if not zombie and int(fields["Uid"].split()[0]) == uid:
                pids.append(int(entry.name))
        except (OSError, ValueError, KeyError, IndexError):
            continue  # the process ended while we looked
    return pids


def kill_uid(uid: int, rounds: int = 20) -> bool:
    """SIGKILL every process of `uid`, again while some remain (a fork may race the scan).

    Only for uids that mars gave to one session. True when none is left.
    """
    for _ in range(rounds):
        pids = processes_of(uid)
        if not pids:
            return True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return not processes_of(uid)
