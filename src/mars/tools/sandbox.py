"""The command line that runs one tool command sandboxed, and the limits it runs under.

A tool runs as `prlimit [taskset] bwrap ... sh -c COMMAND`:

- `prlimit` sets hard resource limits that the sandbox inherits: processes (RLIMIT_NPROC, counted
  per uid, so each session has its own uid when mars runs as root; at twice the run's limit, the
  kernel's backstop to the supervisor's count), address space (RLIMIT_AS),
  file size (RLIMIT_FSIZE) and no core dumps. Binaries, not a `preexec_fn`: the server has threads,
  and Python code between fork and exec may deadlock on a lock another thread held.
- `taskset -c LIST` pins the tool's processes when `--tool-cpus` is given.
- `bwrap` (bubblewrap, unprivileged user namespaces) gives the tool a read-only root and `/usr`,
  its workspace at `/work`, a private size-capped `/tmp`, and new user, pid, network, ipc, uts
  and cgroup namespaces: no network, no other process in sight, and when bwrap dies its pid 1
  dies with it (`--die-with-parent`), which ends every process in the namespace.
- `/dev` is bwrap's: a tmpfs holding bind mounts of null, zero, full, random, urandom and tty,
  remounted read-only (writes to those devices still work: a read-only mount stops new files,
  not device I/O), with a private size-capped tmpfs at `/dev/shm` (POSIX shared memory and
  semaphores need one). Without `--size` (bwrap before 0.8) `/tmp` is uncapped and `/dev/shm`
  read-only.

What holds per run rather than per process is `mars.tools.supervisor`'s: the memory of all the
run's processes together (`Limits.memory_bytes` again, plus what `/tmp` and `/dev/shm` hold), its
process count, and its workspace's disk (`disk_bytes`, `disk_files`). A cgroup v2 would do this in
the kernel, but needs a delegated, writable v2 hierarchy with the memory and pids controllers:
`cgroup_v2_available` detects one, and nothing uses it yet, because no host here has one to test
it on (hosts with a v1 memory controller, like many containers, have none).

Unsafe mode (`--unsafe-tools`, no bwrap): the same limits, supervisor and process-group kill, run
in the workspace directory with no isolation beyond the uid (so the disk quota counts only the
workspace: the uid may write wherever it can).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mars.core.errors import UsageError
from mars.tools.cpus import format_cpu_list

INSTALL_HINT = (
    "install bubblewrap (apt-get install bubblewrap) or start `mars serve` with --unsafe-tools"
)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The few /etc entries programs need to start: Debian's `alternatives` symlinks (awk, editor, ...)
# and the dynamic loader's cache. No passwd, no resolv.conf (there is no network).
_ETC = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")
_TOP = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


@dataclass(frozen=True)
class Limits:
    """What one tool run may use; see the module docstring for what enforces each."""

    # The run's resident memory, all processes together (supervisor), and each process's
    # address space (RLIMIT_AS), which fails an allocation at once instead of killing the run.
    memory_bytes: int = 2 << 30
    processes: int = 256  # processes of one run (supervisor); RLIMIT_NPROC, per uid, at twice
    file_bytes: int = 1 << 30  # largest file a tool may write (RLIMIT_FSIZE)
    tmp_bytes: int = 256 << 20  # size of the sandbox's private /tmp (memory-backed)
    shm_bytes: int = 64 << 20  # size of the sandbox's private /dev/shm (memory-backed)
    disk_bytes: int = 1 << 30  # what a workspace may hold on disk (supervisor)
    disk_files: int = 500_000  # entries a workspace may hold: also bounds the cost of a walk
    output_bytes: int = 64 << 10  # stdout and stderr kept, each; the rest is read and dropped


@dataclass(frozen=True)
class Sandbox:
    """How tools are started: resolved binaries and limits, fixed for the server's lifetime."""

    limits: Limits
    bwrap: str | None  # None: unsafe mode, a plain subprocess in the workspace
    prlimit: str
    taskset: str | None = None  # set when `cpus` is
    cpus: tuple[int, ...] | None = None
    tmp_size_flag: bool = False  # this bwrap knows `--size` (0.8.0 and later)

    @property
    def isolated(self) -> bool:
        return self.bwrap is not None

    @property
    def tmpfs(self) -> tuple[str, ...]:
        """The sandbox's own memory-backed mounts, which the run's memory figure includes."""
        return ("/tmp", "/dev/shm") if self.isolated and self.tmp_size_flag else ()

    def argv(self, workspace: Path, command: str, processes: int | None = None) -> list[str]:
        """The full command line for `command`, run in `workspace` (its host path).

        `processes` overrides the RLIMIT_NPROC value: without per-session uids the limit must
        also cover the processes the user already runs.
        """
        lim = self.limits
        argv = [
            self.prlimit,
            f"--nproc={processes or lim.processes}",
            f"--as={lim.memory_bytes}",
            f"--fsize={lim.file_bytes}",
            "--core=0",
            "--",
        ]
        if self.cpus is not None and self.taskset is not None:
            argv += [self.taskset, "-c", format_cpu_list(list(self.cpus))]
        if self.bwrap is None:
            return [*argv, "/bin/sh", "-c", command]
        return [*argv, self.bwrap, *self._bwrap_args(workspace), "/bin/sh", "-c", command]

    def env(self, workspace: Path) -> dict[str, str]:
        """The environment of the started process (bwrap clears it again inside)."""
        home = "/work" if self.isolated else str(workspace)
        return {"PATH": PATH, "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8"}

    def _bwrap_args(self, workspace: Path) -> list[str]:
        args = ["--ro-bind", "/usr", "/usr"]
        for top in _TOP:
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        for path in _ETC:
            args += ["--ro-bind-try", path, path]
        args += ["--proc", "/proc", "--dev", "/dev"]
        if self.tmp_size_flag:
            args += ["--size", str(self.limits.shm_bytes), "--tmpfs", "/dev/shm"]
            args += ["--size", str(self.limits.tmp_bytes)]
        args += ["--tmpfs", "/tmp", "--bind", str(workspace), "/work"]
        # bwrap's root and /dev are tmpfs with no size limit: read-only (not recursively), so only
        # /tmp, /dev/shm and /work take writes.
        args += ["--remount-ro", "/dev", "--remount-ro", "/"]
        args += ["--unshare-all", "--die-with-parent", "--new-session", "--chdir", "/work"]
        args += ["--clearenv", "--setenv", "PATH", PATH, "--setenv", "HOME", "/work"]
        args += ["--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8", "--"]
        return args


def make_sandbox(limits: Limits, unsafe: bool, cpus: list[int] | None = None) -> Sandbox:
    """Resolve the binaries a sandbox needs; a `UsageError` names what is missing and the fix.

    With `unsafe`, bwrap is not used even when installed: the user asked for plain processes.
    """
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise UsageError("the tools API needs `prlimit` (util-linux): apt-get install util-linux")
    taskset = None
    if cpus is not None:
        taskset = shutil.which("taskset")
        if taskset is None:
            raise UsageError("--tool-cpus needs `taskset` (util-linux): apt-get install util-linux")
    bwrap = None if unsafe else shutil.which("bwrap")
    if not unsafe and bwrap is None:
        raise UsageError(f"the tools API needs bubblewrap: {INSTALL_HINT}")
    sized = bwrap is not None and "--size" in _bwrap_help(bwrap)
    cpu_tuple = tuple(cpus) if cpus is not None else None
    return Sandbox(limits, bwrap, prlimit, taskset, cpu_tuple, sized)


def check_sandbox(sandbox: Sandbox, scratch: Path, uid: int | None, processes: int) -> None:
    """Run `true` in the sandbox once, so a host without user namespaces fails at start-up."""
    proc = subprocess.run(
        sandbox.argv(scratch, "true", processes),
        cwd=scratch,
        env=sandbox.env(scratch),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        user=uid,
        group=uid,
        extra_groups=[] if uid is not None else None,
    )
    if proc.returncode != 0:
        why = proc.stderr.strip() or f"exit status {proc.returncode}"
        if not sandbox.isolated:
            raise UsageError(f"cannot start a tool process here: {why}")
        raise UsageError(
            f"bubblewrap cannot start a sandbox here ({why}); enable unprivileged user "
            "namespaces (sysctl kernel.unprivileged_userns_clone=1) or pass --unsafe-tools"
        )


def cgroup_v2_available() -> bool:
    """Whether this process sits in a writable cgroup v2 with the memory and pids controllers.

    Only a pure v2 hierarchy counts: `/proc/self/cgroup` has the single line `0::/path`. A v1
    memory controller (a `N:memory:/path` line) has none. Detection only: the supervisor bounds
    runs either way (see the module docstring).
    """
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return False
    if len(lines) != 1 or not lines[0].startswith("0::"):
        return False
    own = Path("/sys/fs/cgroup") / lines[0][3:].lstrip("/")
    try:
        controllers = (own / "cgroup.controllers").read_text().split()
    except OSError:
        return False
    return {"memory", "pids"} <= set(controllers) and os.access(own, os.W_OK)


def _bwrap_help(bwrap: str) -> str:
    try:
        proc = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout + proc.stderr
