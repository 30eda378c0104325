"""Tool steps as real work: CPU-heavy steps burn a fixed amount of CPU, light steps sleep.

A heavy step of nominal duration d (already time-scaled) runs a `python3 -c` busy loop of
`(d - startup) * rate` iterations, where `rate` (iterations per second) and `startup` (interpreter
start and exit) were measured once on an idle core. The work is fixed, not the time: when tools
and the engine share cores, the step takes longer, as a real test run would. Light steps (view,
edit, git, ...) wait without using a core: `sleep d`.

The command runs in the server's tool sandbox, where `/usr/bin/python3` is the interpreter; the
calibration runs the same interpreter on this host, which is the server's host in `mars bench`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from mars.sim.workload import ToolSpec

PYTHON = "/usr/bin/python3"
_LOOP = "for _ in range({n}): pass"


@dataclass(frozen=True)
class CpuCalibration:
    """How fast the busy loop runs on one idle core of this host."""

    iterations_per_s: float  # loop iterations per second, interpreter start excluded
    startup_s: float  # `python3 -c pass` wall time: start, no work, exit
    python: str = PYTHON  # the interpreter named in tool commands


def busy_command(iterations: int, python: str = PYTHON) -> str:
    """The shell command that runs `iterations` iterations of the busy loop."""
    return f'{python} -c "{_LOOP.format(n=max(0, iterations))}"'


def tool_command(tool: ToolSpec, cpu: CpuCalibration) -> str:
    """The command one tool step runs: fixed CPU work if heavy, else a sleep."""
    if tool.cpu_heavy:
        work_s = max(0.0, tool.duration_s - cpu.startup_s)
        return busy_command(round(work_s * cpu.iterations_per_s), cpu.python)
    return f"sleep {tool.duration_s:.3f}"


def calibrate(cpu: int | None = None, python: str | None = None) -> CpuCalibration:
    """Measure the busy loop on an idle core (`cpu`, default: any); about two seconds.

    A first run sizes the sample to about half a second; of three runs of that size the fastest
    is kept (on an idle core the fastest run is the undisturbed one).
    """
    exe = python or (PYTHON if os.path.exists(PYTHON) else shutil.which("python3") or "python3")
    startup = min(_run_s(busy_command(0, exe), cpu) for _ in range(3))
    n = 1_000_000
    probe_s = max(1e-3, _run_s(busy_command(n, exe), cpu) - startup)
    n = max(n, round(n * 0.5 / probe_s))
    loop_s = min(_run_s(busy_command(n, exe), cpu) for _ in range(3)) - startup
    return CpuCalibration(n / max(loop_s, 1e-6), startup, exe)


def _run_s(command: str, cpu: int | None) -> float:
    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    t0 = time.perf_counter()
    subprocess.run(command, shell=True, check=True, preexec_fn=pin)
    return time.perf_counter() - t0
