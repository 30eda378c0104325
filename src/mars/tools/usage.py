"""What a tool run holds, read from the host: its processes, their memory, its workspace's disk.

Everything here reads `/proc` or walks a directory and decides nothing; `supervisor` sets limits
on the figures. Each reader tolerates what vanishes while it reads (a process that ended, a file
deleted mid-walk): the figure is then a little stale, never an error.

- Processes: one scan of `/proc/*/stat` gives every process's parent and start time (the start
  time tells a reused pid apart). A run's processes are the descendants of its root pid, plus
  those of the root's session and those seen before that are still alive: a process whose parent
  exited is reparented outside the tree (to the host's init in unsafe mode) and must still count.
  In the sandbox the pid namespace's init, a descendant, inherits them. (`/proc/PID/task/*/
  children` would avoid the full scan, but needs CONFIG_PROC_CHILDREN, which some kernels lack.)
- Memory: `statm`'s resident size is cheap (~15 us a process) and counts shared pages once per
  process, so it can only overstate; `smaps_rollup`'s proportional size (PSS) splits shared pages
  between their users but walks the page tables (~3.5 ms for 300 MiB). The supervisor reads PSS
  only when the cheap sum is over the limit. Tmpfs mounts private to the sandbox (`/tmp`,
  `/dev/shm`) hold memory no process's figure shows: `statvfs` through `/proc/PID/root` reads them.
- Disk: a walk of the workspace summing allocated blocks (`st_blocks`, hard links once), as a
  generator that yields after each directory so the supervisor can spread a big walk over time.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Proc:
    ppid: int
    session: int  # the session id: a run's root starts its own, which a process keeps unless it
    # calls setsid, even once its parent exited
    start: int  # clock ticks after boot: a pid reused by another process has another start


def scan_processes() -> dict[int, Proc]:
    """Every process on the host (zombies included: they still hold a pid), by pid."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                line = f.read()
        except OSError:
            continue  # it ended while we looked
        fields = line.rsplit(b")", 1)[1].split()  # after the command name, which may hold ")"
        table[int(name)] = Proc(int(fields[1]), int(fields[3]), int(fields[19]))
    return table


def start_time(pid: int) -> int | None:
    """The process's start time (as in `Proc`), or None when it has ended."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def children_of(table: dict[int, Proc]) -> dict[int, list[int]]:
    """Each parent's child pids."""
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    return children


def run_members(
    table: dict[int, Proc], children: dict[int, list[int]], root: int, known: dict[int, int]
) -> dict[int, int]:
    """The run's processes (pid to start time): `root`, those of its session, those in `known`
    (an earlier answer) that still live, and every descendant of these."""
    found: dict[int, int] = {}
    todo = [root] + [
        pid for pid, start in known.items() if pid in table and table[pid].start == start
    ]
    todo += [pid for pid, proc in table.items() if proc.session == root]
    while todo:
        pid = todo.pop()
        if pid in found or pid not in table:
            continue
        found[pid] = table[pid].start
        todo += children.get(pid, ())
    return found


def resident_bytes(pids: Iterable[int]) -> int:
    """The sum of the processes' resident sizes: an upper bound of the memory they hold."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def proportional_bytes(pids: Iterable[int]) -> int:
    """The sum of the processes' proportional set sizes (PSS): shared pages counted once."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) << 10
                        break
        except (OSError, IndexError, ValueError):
            continue
    return total


def tmpfs_bytes(pid: int, mounts: Iterable[str]) -> int:
    """What the `mounts` (paths inside the root of process `pid`) hold: only once `pid` has a
    root of its own (bwrap's pid 1 starts in the host's) and each is a mount of its own."""
    root = f"/proc/{pid}/root"
    try:
        inside, host = os.stat(root), os.stat("/")
        if (inside.st_dev, inside.st_ino) == (host.st_dev, host.st_ino):
            return 0  # not set up yet: these paths would be the host's
        total = 0
        for mount in mounts:
            if os.stat(root + mount).st_dev != inside.st_dev:
                st = os.statvfs(root + mount)
                total += (st.f_blocks - st.f_bfree) * st.f_frsize
        return total
    except OSError:
        return 0  # it ended, or is not ours to read


@dataclass(frozen=True)
class DiskUsage:
    bytes: int  # allocated, not apparent: a sparse file counts what it holds
    entries: int  # files, directories, links... each one an inode
    unreadable: str | None = None  # a directory the walk could not enter, and why
    cut: bool = False  # the walk stopped at its entry limit: more entries than `entries`


def walk_disk(top: Path, max_entries: int) -> Generator[None, None, DiskUsage]:
    """Walk `top`, yielding after each directory; the generator's value is the usage.

    A directory the walk cannot open ends it with `unreadable` set: what it holds is unknown.
    When the server owns the tree (no per-session uids), a tool could hide files in a directory
    it made unreadable (mode 000), so the walk gives the owner read and search back first.
    """
    used = entries = 0
    links: set[tuple[int, int]] = set()
    stack = [str(top)]
    while stack:
        path = stack.pop()
        try:
            names = _list_dir(path)
        except FileNotFoundError:
            continue  # deleted while we walked
        except OSError as e:
            return DiskUsage(used, entries, f"{path}: {e.strerror}")
        for entry in names:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            entries += 1
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            elif st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in links:
                    continue
                links.add(key)
            used += st.st_blocks * 512
        if entries > max_entries:
            return DiskUsage(used, entries, cut=True)
        yield
    return DiskUsage(used, entries)


def disk_usage(top: Path, max_entries: int) -> DiskUsage:
    """`walk_disk` at once."""
    walk = walk_disk(top, max_entries)
    while True:
        try:
            next(walk)
        except StopIteration as done:
            usage: DiskUsage = done.value
            return usage


def filesystem_used(path: Path) -> int:
    """Bytes in use on the filesystem holding `path`: a cheap sign that something wrote a lot."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def format_bytes(n: float) -> str:
    """`1.5 GiB`, `300.0 MiB`, `12.0 KiB`: what a limit message shows."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _list_dir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except PermissionError:
        if os.geteuid() == 0:
            raise
    # Our own directory, made unreadable: O_PATH opens it without read permission and without
    # following a link swapped in its place; chmod through /proc/self/fd then changes that inode.
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    finally:
        os.close(fd)
    with os.scandir(path) as it:
        return list(it)
