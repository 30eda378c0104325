"""`ToolRuntime`: sessions' tool commands on a pool of CPU workers, each in its own workspace.

A run waits only for a free worker (first come, first served), then runs sandboxed (see
`mars.tools.sandbox`) and reports `ToolEnqueued`, `ToolStart` and `ToolEnd` on the event stream,
timed by the injected clock, so the scheduler sees the CPU phase of every session as it happens.

One `Supervisor` bounds every run's memory and processes and every workspace's disk, killing a
run past a limit; `ToolResult.killed` says which (and a line at the end of stderr, for clients
that only show the output). A workspace over its disk quota takes no run but one that only
deletes (`rm ...`, `rmdir ...`, nothing else on the line), so an agent can make room again.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import resource
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mars.core.clock import Clock, WallClock
from mars.core.events import Event, ToolEnd, ToolEnqueued, ToolStart
from mars.tools.category import categorize
from mars.tools.runner import Outcome, kill_uid, processes_of, run_process
from mars.tools.sandbox import Limits, Sandbox, check_sandbox, make_sandbox
from mars.tools.supervisor import Budget, Supervisor
from mars.tools.workspace import Workspace, Workspaces

MAX_TIMEOUT_S = 3600.0
MAX_COMMAND_CHARS = 64 << 10
# A command that can only delete: rm or rmdir and their arguments, globs and quotes allowed, but
# no `;`, `&`, `|`, redirection, `$`, backquote, parenthesis or newline that could run more.
_ONLY_DELETES = re.compile(r"\s*(rm|rmdir)(\s[^;&|<>$`()\n]*)?")


class ToolInputError(ValueError):
    """A run or seed request that cannot be served as given; `param` names the bad field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ToolCancelled(Exception):
    """The run was killed because its session ended or the runtime closed."""


class WorkspaceFull(ToolInputError):
    """The session's workspace is over its disk quota: only a run that deletes may start."""


@dataclass(frozen=True)
class ToolConfig:
    """The tool runtime's settings, fixed for its lifetime (`mars serve --tool-*`)."""

    workers: int | None = None  # None: one per CPU of `cpus`, else os.cpu_count()
    cpus: tuple[int, ...] | None = None  # pin tool processes to these CPUs
    limits: Limits = field(default_factory=Limits)
    unsafe: bool = False  # plain processes, no bubblewrap (`--unsafe-tools`)
    # None: a temporary directory, removed by close() (or by the next server, if this one is killed)
    workspace_root: Path | None = None
    max_timeout_s: float = MAX_TIMEOUT_S
    # Where workspaces may be seeded from (`--seed-root`); none: seeding is off, so API clients
    # cannot copy arbitrary server files into a workspace they can read.
    seed_roots: tuple[Path, ...] = ()

    def may_seed_from(self, source: Path) -> bool:
        real = source.resolve()
        return any(real.is_relative_to(root.resolve()) for root in self.seed_roots)

    def worker_count(self) -> int:
        return self.workers or (len(self.cpus) if self.cpus else os.cpu_count() or 1)


@dataclass(frozen=True)
class ToolResult:
    stdout: str
    stderr: str
    exit_code: int  # 128 + N when killed by signal N (137 at a timeout or a limit)
    timed_out: bool
    # Why mars killed the run, e.g. "memory limit: the run held 2.1 GiB, over its 2.0 GiB
    # (--tool-memory-mb)", "process limit: ...", "disk quota: ...", "timeout: ..."; None: it ended.
    killed: str | None
    truncated: bool  # stdout or stderr was cut at the output cap
    queue_wait_s: float  # waiting for a worker
    run_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ToolRuntime:
    def __init__(
        self,
        config: ToolConfig | None = None,
        clock: Clock | None = None,
        publish: Callable[[Event], None] | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.config = config = config or ToolConfig()
        cpus = list(config.cpus) if config.cpus is not None else None
        self.sandbox = sandbox or make_sandbox(config.limits, config.unsafe, cpus)
        self.clock: Clock = clock or WallClock()
        self.publish = publish
        self.workers = config.worker_count()
        self.busy = 0  # workers running a tool
        limits = config.limits
        self.workspaces = Workspaces(config.workspace_root, max_seed_bytes=limits.disk_bytes)
        self.supervisor = Supervisor(limits.disk_bytes, limits.disk_files)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._running: dict[str, set[asyncio.Task[Outcome]]] = {}
        self._seeding: dict[str, asyncio.Event] = {}
        self._closed = False

    @property
    def queued(self) -> int:
        """Runs waiting for a worker."""
        return len(self._waiters)

    async def run(
        self, session_id: str, command: str, timeout_s: float = 30.0, name: str | None = None
    ) -> ToolResult:
        """Run `command` with `sh -c` in the session's workspace (created on first use)."""
        self._check(session_id, command, timeout_s, name)
        category = name or categorize(command)
        while session_id in self._seeding:
            await self._seeding[session_id].wait()
        ws = self.workspaces.open(session_id)
        deletes = _ONLY_DELETES.fullmatch(command) is not None
        if not deletes:
            await self._check_quota(session_id, ws)
        enqueued = self.clock.now()
        self._emit(ToolEnqueued(enqueued, session_id, category, cpu_heavy=True))
        await self._acquire()
        try:
            if self._closed or self.workspaces.get(session_id) is not ws:
                raise ToolCancelled(f"session {session_id!r} ended before its tool started")
            started = self.clock.now()
            self._emit(ToolStart(started, session_id, category))
            try:
                outcome = await self._spawn(session_id, ws, command, timeout_s, deletes)
            finally:
                ended = self.clock.now()
                self._emit(
                    ToolEnd(ended, session_id, category, ended - started, started - enqueued)
                )
        finally:
            self._release()
        stderr = outcome.stderr.decode(errors="replace")
        if outcome.killed is not None and not outcome.timed_out:
            sep = "\n" if stderr and not stderr.endswith("\n") else ""
            stderr += f"{sep}mars killed this run: {outcome.killed}\n"
        return ToolResult(
            outcome.stdout.decode(errors="replace"),
            stderr,
            outcome.exit_code,
            outcome.timed_out,
            outcome.killed,
            outcome.truncated,
            started - enqueued,
            ended - started,
        )

    async def seed(self, session_id: str, source: Path) -> Workspace:
        """Copy a directory or extract an archive into the session's workspace."""
        if self._closed:
            raise ToolCancelled("the tool runtime is shut down")
        if self._running.get(session_id) or session_id in self._seeding:
            raise ToolInputError(
                f"session {session_id!r} has tools running or a seed in progress: "
                "seed its workspace before or between tool runs",
                param="session_id",
            )
        done = self._seeding[session_id] = asyncio.Event()
        try:
            ws = self.workspaces.open(session_id)
            if ws.uid is not None:  # unsafe mode: a tool may have left a daemon behind
                await asyncio.to_thread(kill_uid, ws.uid)
            seeded = await asyncio.to_thread(self.workspaces.seed, session_id, source)
            self.supervisor.forget(seeded.path)  # measured afresh at the next run
            return seeded
        finally:
            del self._seeding[session_id]
            done.set()

    async def end_session(self, session_id: str) -> bool:
        """Kill the session's running tools and delete its workspace; False if it had none."""
        tasks = self._running.pop(session_id, set())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ws = self.workspaces.get(session_id)
        if ws is None:
            return False
        if ws.uid is not None:
            await asyncio.to_thread(kill_uid, ws.uid)
        await asyncio.to_thread(self.workspaces.remove, session_id)
        self.supervisor.forget(ws.path)
        return True

    def check(self) -> None:
        """Start one sandbox now, so a host that cannot run them fails with the fix at start-up."""
        probe = "mars-start-up-check"
        ws = self.workspaces.open(probe)
        try:
            check_sandbox(self.sandbox, ws.path, ws.uid, self._nproc(ws))
        finally:
            self.workspaces.remove(probe)

    def session_processes(self, session_id: str) -> list[int]:
        """Host pids running as the session's uid (empty without per-session uids)."""
        ws = self.workspaces.get(session_id)
        return processes_of(ws.uid) if ws is not None and ws.uid is not None else []

    async def close(self) -> None:
        """Kill every running tool, fail queued ones, and delete the workspaces."""
        self._closed = True
        for session_id in list(self._running):
            await self.end_session(session_id)
        while self._waiters:  # each sees `_closed` once it holds a worker, and gives it back
            slot = self._waiters.popleft()
            if not slot.done():
                self.busy += 1
                slot.set_result(None)
        for ws in self.workspaces.opened():
            if ws.uid is not None:
                await asyncio.to_thread(kill_uid, ws.uid)
        await asyncio.to_thread(self.workspaces.close)
        await asyncio.to_thread(self.supervisor.close)

    # ---- internals ------------------------------------------------------------------------------
    async def _check_quota(self, session_id: str, ws: Workspace) -> None:
        used = self.supervisor.last_disk(ws.path)
        if used is None or self.supervisor.over_quota(used) is not None:
            # Never walked, or over at the last walk: files may have been deleted since.
            used = await asyncio.to_thread(self.supervisor.measure, ws.path)
        over = self.supervisor.over_quota(used)
        if over is not None:
            raise WorkspaceFull(
                f"session {session_id!r}: {over}: delete files first with a run that only "
                "deletes (`rm ...` or `rmdir ...` alone on the line, the only runs it takes "
                f"now), or delete the workspace (DELETE /v1/sessions/{session_id}/workspace)"
            )

    async def _spawn(
        self, session_id: str, ws: Workspace, command: str, timeout: float, deletes: bool
    ) -> Outcome:
        argv = self.sandbox.argv(ws.path, command, self._nproc(ws))
        lim = self.sandbox.limits
        budget = Budget(lim.memory_bytes, lim.processes, self.sandbox.tmpfs, disk=not deletes)
        task = asyncio.ensure_future(
            run_process(
                argv,
                ws.path,
                self.sandbox.env(ws.path),
                timeout,
                lim.output_bytes,
                ws.uid,
                lambda pid: self.supervisor.watch(pid, budget, ws.path),
            )
        )
        running = self._running.setdefault(session_id, set())
        running.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our caller was cancelled, not the tool
            raise ToolCancelled(f"session {session_id!r} ended while the tool ran") from None
        finally:
            running.discard(task)
            if not running and self._running.get(session_id) is running:
                del self._running[session_id]

    def _nproc(self, ws: Workspace) -> int:
        """RLIMIT_NPROC for a run: it counts every process of the uid, not just the tool's.

        Twice the run's limit: the supervisor kills a run past `processes`, and the kernel stops
        a fork bomb at twice that between two of its ticks (and bounds a session's runs together).
        """
        limit = 2 * self.sandbox.limits.processes
        if ws.uid is None:  # the server's own uid: its other processes count too
            limit += len(processes_of(os.getuid()))
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        return limit if hard == resource.RLIM_INFINITY else min(limit, hard)

    async def _acquire(self) -> None:
        if self.busy < self.workers and not self._waiters:
            self.busy += 1
            return
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await slot  # `_release` hands its worker over: `busy` stays counted
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self._release()  # handed a worker just as we were cancelled: pass it on
            else:
                self._waiters.remove(slot)
            raise

    def _release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.busy -= 1

    def _emit(self, event: Event) -> None:
        if self.publish is not None:
            self.publish(event)

    def _check(self, session_id: str, command: str, timeout_s: float, name: str | None) -> None:
        if self._closed:
            raise ToolCancelled("the tool runtime is shut down")
        if not session_id:
            raise ToolInputError("the session id is empty", param="session_id")
        if not command.strip():
            raise ToolInputError("the command is empty: give a shell command", param="command")
        if len(command) > MAX_COMMAND_CHARS or "\0" in command:
            raise ToolInputError(
                f"the command must be text without NUL bytes, at most {MAX_COMMAND_CHARS} "
                "characters: put long scripts in a file in the workspace",
                param="command",
            )
        limit = self.config.max_timeout_s
        if not (math.isfinite(timeout_s) and 0 < timeout_s <= limit):
            raise ToolInputError(
                f"timeout_s must be a number of seconds in (0, {limit:g}], got {timeout_s}",
                param="timeout_s",
            )
        if name is not None and not name.strip():
            raise ToolInputError("name is empty: leave it out to derive it from the command")
