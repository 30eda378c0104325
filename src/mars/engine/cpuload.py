"""Busy-loop processes that stand in for agents' CPU-heavy tools while the engine is measured."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from mars.core.process import die_with_parent


@contextmanager
def cpu_load(workers: int, cpus: Sequence[int] | None = None) -> Iterator[list[int]]:
    """Run `workers` processes that each spin one core, pinned to `cpus` if given; yields their
    process ids and stops exactly those processes on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(workers):
            proc = subprocess.Popen(
                [sys.executable, "-c", "while True: pass"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # not left spinning if the measurement is killed
            )
            procs.append(proc)
            if cpus:
                os.sched_setaffinity(proc.pid, cpus)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
