"""Helper processes die with the process that started them, however it dies."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import time
from mars.engine.cpuload import cpu_load
with cpu_load(1) as pids:
    print(pids[0], flush=True)
    time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "zombie" not in state and "dead" not in state


def test_cpu_load_stops_when_its_parent_is_killed() -> None:
    # SIGKILL runs no `finally`: only the kernel's parent-death signal can stop the busy loop.
    parent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    assert _alive(pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the busy loop outlived its killed parent"
