"""The supervisor: one thread that bounds every running tool's memory, processes and disk, and
SIGKILLs a run that goes past one of them, saying why.

Rlimits are per process (RLIMIT_AS, RLIMIT_FSIZE) or per uid (RLIMIT_NPROC), so three processes
of 1.5 GiB each fit under a 2 GiB RLIMIT_AS. A cgroup v2 would count per run, but needs a
delegated v2 hierarchy this host does not have (`sandbox.cgroup_v2_available` only detects one).
Instead, every `interval_s` (0.1 s) one scan of `/proc` serves all running tools (see
`mars.tools.usage` for what is read):

- processes: a run holding more than `Budget.processes` (bwrap's own two included) is killed;
- memory: the resident memory of the run's processes plus what its private tmpfs mounts hold;
  over `Budget.memory_bytes`, the proportional figure (PSS) decides, then the run is killed. A run
  over a quarter of its limit has its memory read again every `_NEAR_S` (0.02 s) between scans,
  from the processes the last scan found (a few us each, where a scan costs ~15 us per host
  process);
- disk: each workspace with a run (and once more after its last run ended) is walked, a slice of
  at most `_SLICE_S` per scan, again `max(_WALK_EVERY_S, 20 x the walk's CPU time)` after the
  last walk ended, or sooner (still 20x) when the filesystem grew by more than the workspace's
  room (one `statvfs` a scan), so walking costs at most ~5% of a core. Past `disk_bytes` or
  `disk_files`, every run in it is killed, except runs that only delete (`Budget.disk` False).

A kill is SIGKILL to the run's process group and to each of its processes: in the sandbox the
group is bwrap, whose pid 1 dies with it and ends the pid namespace; in unsafe mode the processes
that left the group (`setsid`) die by pid. What a run does between two checks is not seen: it
may overshoot a limit by what it allocates or writes meanwhile (see the README's figures).

Measured on 2 cores with ~90 host processes: the thread costs ~2.5% of a core while any tool runs
(one thread for all runs), ~6% while a 30,000-file workspace is walked; no start-up cost a run of
`true` shows (24 ms either way).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mars.tools.usage import (
    DiskUsage,
    children_of,
    disk_usage,
    filesystem_used,
    format_bytes,
    proportional_bytes,
    resident_bytes,
    run_members,
    scan_processes,
    start_time,
    tmpfs_bytes,
    walk_disk,
)

_SLICE_S = 0.01  # disk walking per workspace per tick
_WALK_EVERY_S = 0.5  # the shortest time between two walks of one workspace
_PSS_EVERY_S = 0.5  # after PSS cleared a run whose resident sum is over, trust it this long
_NEAR_S = 0.02  # memory is read this often (not the process list) for runs over 1/4 of it


@dataclass(frozen=True)
class Budget:
    """What one run may hold at once."""

    memory_bytes: int  # resident, all its processes together, plus its private tmpfs mounts
    processes: int
    tmpfs: tuple[str, ...] = ()  # mount points inside the sandbox that hold memory
    disk: bool = True  # False: a run that only deletes, allowed in a workspace over quota


@dataclass
class Watch:
    """One running tool, as the supervisor sees it. `reason` is set before the kill it explains."""

    root: int  # the pid the runner started (bwrap, or sh in unsafe mode); its process group
    budget: Budget
    workspace: Path | None
    release: Callable[[], None] = field(repr=False)  # the run ended: never kill it again
    reason: str | None = None
    members: dict[int, int] = field(default_factory=dict)  # pid to start time
    active: bool = True
    pss_trusted_until: float = 0.0
    scanned: bool = False
    near: bool = False  # over a quarter of its memory limit: read its memory every _NEAR_S
    sandbox_init: int | None = None  # bwrap's pid 1, whose root holds the sandbox's mounts


@dataclass
class _Disk:
    """One workspace's disk figure and the walk that renews it."""

    path: Path
    used: DiskUsage | None = None  # the last complete walk
    runs: int = 0
    walk: Generator[None, None, DiskUsage] | None = None
    walk_cpu_s: float = 0.0
    walk_started: float = 0.0
    next_at: float = 0.0  # the next walk, as the cost rule allows
    soon_at: float = 0.0  # the next walk when the filesystem grew, as the cost rule allows
    fs_used: int = 0  # the filesystem's figure when the last walk started
    stale_since: float = 0.0  # a walk that started before this must not set `used`
    last_run_ended: float | None = None  # walk once more after this, then rest


class Supervisor:
    """Watches runs from a daemon thread started with the first one; `close()` ends it."""

    def __init__(self, disk_bytes: int, disk_files: int, interval_s: float = 0.1) -> None:
        self.disk_bytes = disk_bytes
        self.disk_files = disk_files
        self.interval_s = interval_s
        self.cpu_s = 0.0  # CPU time the thread spent, all runs together
        self.ticks = 0
        self._cond = threading.Condition()
        self._watches: list[Watch] = []
        self._disks: dict[Path, _Disk] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, root: int, budget: Budget, workspace: Path | None = None) -> Watch:
        """Start bounding the run whose first process is `root`; call `release()` once it ended,
        so no kill can reach a reused pid."""
        with self._cond:
            watch = Watch(root, budget, workspace, release=lambda: self._release(watch))
            self._watches.append(watch)
            if workspace is not None:
                self._disk(workspace).runs += 1
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="mars-tools", daemon=True)
                self._thread.start()
            self._cond.notify()
        return watch

    def last_disk(self, workspace: Path) -> DiskUsage | None:
        """The workspace's usage at its last walk, or None when it has not been walked."""
        with self._cond:
            found = self._disks.get(workspace)
            return found.used if found is not None else None

    def measure(self, workspace: Path) -> DiskUsage:
        """Walk the workspace now (in the caller's thread) and keep the figure."""
        fs_used = filesystem_used(workspace)
        used = disk_usage(workspace, self.disk_files)
        with self._cond:
            disk = self._disk(workspace)
            disk.used, disk.fs_used = used, fs_used
        return used

    def over_quota(self, used: DiskUsage) -> str | None:
        """What is over in `used`, in words, or None when it fits."""
        if used.unreadable is not None:
            return f"cannot measure the workspace ({used.unreadable})"
        if used.cut or used.entries > self.disk_files:
            return f"the workspace holds more than {self.disk_files} files, its limit"
        if used.bytes > self.disk_bytes:
            return (
                f"the workspace holds {format_bytes(used.bytes)}, over its "
                f"{format_bytes(self.disk_bytes)} quota (--tool-disk-mb)"
            )
        return None

    def forget(self, workspace: Path) -> None:
        """The workspace was removed or reseeded: measure it afresh next time."""
        with self._cond:
            self._disks.pop(workspace, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    # ---- the thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        full_at = 0.0  # the next scan of /proc (and of the disks)
        while True:
            with self._cond:
                while not self._closed and not self._watches and not self._lingering():
                    self._cond.wait()
                if self._closed:
                    return
                watches = list(self._watches)
                disks = [d for d in self._disks.values() if d.runs or d.last_run_ended is not None]
                fresh = any(not w.scanned for w in watches)  # started since the last scan
            started = time.thread_time()
            now = time.monotonic()
            if now >= full_at or fresh:
                full_at = now + self.interval_s
                if watches:
                    self._scan(watches)
                for disk in disks:
                    self._check_disk(disk)
            else:
                for w in watches:
                    if w.near:
                        self._check_memory(w, w.members)
            self.cpu_s += time.thread_time() - started
            self.ticks += 1
            near = any(w.near for w in watches)
            wait = full_at - time.monotonic()
            with self._cond:
                if not self._closed:
                    self._cond.wait(max(0.0, min(wait, _NEAR_S) if near else wait))

    def _scan(self, watches: list[Watch]) -> None:
        """Find each run's processes; kill those past their process or memory limit."""
        table = scan_processes()
        children = children_of(table)
        for w in watches:
            w.members, w.scanned = run_members(table, children, w.root, w.members), True
            count, limit = len(w.members), w.budget.processes
            if count > limit:
                self._kill(w, f"process limit: the run had {count} processes, over its {limit}")
                continue
            inner = [p for p in w.members if table[p].ppid == w.root]
            w.sandbox_init = inner[0] if inner else None
            self._check_memory(w, w.members)

    def _check_memory(self, w: Watch, pids: Iterable[int]) -> None:
        """Kill `w` when its processes `pids` and its tmpfs mounts hold more than its limit."""
        init, mounts = w.sandbox_init, w.budget.tmpfs
        tmp = tmpfs_bytes(init, mounts) if init is not None and mounts else 0
        held, cap = resident_bytes(pids) + tmp, w.budget.memory_bytes
        if held > cap:
            now = time.monotonic()
            if now < w.pss_trusted_until:
                return
            held = proportional_bytes(pids) + tmp
            if held <= cap:
                w.pss_trusted_until = now + _PSS_EVERY_S
        w.near = held > cap // 4
        if held > cap:
            self._kill(
                w,
                f"memory limit: the run held {format_bytes(held)}, over its "
                f"{format_bytes(cap)} (--tool-memory-mb)",
            )

    def _check_disk(self, disk: _Disk) -> None:
        now = time.monotonic()
        if disk.walk is None:
            room = self.disk_bytes - (disk.used.bytes if disk.used else 0)
            grew = filesystem_used(disk.path) - disk.fs_used > room
            if now < disk.next_at and not (grew and now >= disk.soon_at):
                return
            disk.walk = walk_disk(disk.path, self.disk_files)
            disk.walk_cpu_s, disk.walk_started = 0.0, now
            disk.fs_used = filesystem_used(disk.path)
        started = time.thread_time()
        try:
            while time.thread_time() - started < _SLICE_S:
                next(disk.walk)
        except StopIteration as done:
            used: DiskUsage = done.value
            disk.walk = None
        disk.walk_cpu_s += time.thread_time() - started
        if disk.walk is not None:
            return
        ended = time.monotonic()
        disk.next_at = ended + max(_WALK_EVERY_S, 20 * disk.walk_cpu_s)
        disk.soon_at = ended + 20 * disk.walk_cpu_s
        with self._cond:
            if disk.stale_since <= disk.walk_started:
                disk.used = used
            if disk.runs == 0 and (disk.last_run_ended or 0) <= disk.walk_started:
                disk.last_run_ended = None  # this walk saw what the last run left: rest
        over = self.over_quota(used)
        if over is None:
            return
        with self._cond:
            victims = [w for w in self._watches if w.workspace == disk.path and w.budget.disk]
        for w in victims:
            self._kill(w, f"disk quota: {over}: delete files (rm) before the next run")

    def _kill(self, w: Watch, reason: str) -> None:
        with self._cond:
            if not w.active or w.reason is not None:
                return
            w.reason = reason
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(w.root, signal.SIGKILL)  # the runner reaps it only before release()
            for pid, start in w.members.items():
                # Members are up to a scan old: one that ended may have left its pid to another.
                if pid > 1 and pid != os.getpid() and start_time(pid) == start:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)

    def _release(self, w: Watch) -> None:
        with self._cond:
            if not w.active:
                return
            w.active = False
            self._watches.remove(w)
            if w.workspace is not None and w.workspace in self._disks:
                disk = self._disks[w.workspace]
                disk.runs -= 1
                if disk.runs == 0:
                    disk.last_run_ended = time.monotonic()
                room = self.disk_bytes - (disk.used.bytes if disk.used else 0)
                if filesystem_used(w.workspace) - disk.fs_used > room:
                    # It may have written past the quota since the last walk: measure anew.
                    disk.used, disk.stale_since = None, time.monotonic()

    def _disk(self, workspace: Path) -> _Disk:
        found = self._disks.get(workspace)
        if found is None:
            found = self._disks[workspace] = _Disk(workspace)
        return found

    def _lingering(self) -> bool:
        return any(d.last_run_ended is not None for d in self._disks.values())
