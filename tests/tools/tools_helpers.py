"""Helpers of the tool runtime tests: a runtime per test, its events, and host process checks."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mars.core.events import Event
from mars.tools.runtime import ToolConfig, ToolRuntime

ROOT_USER = os.geteuid() == 0
needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap is not installed: apt-get install bubblewrap (./scripts/setup.sh as root)",
)
needs_root = pytest.mark.skipif(not ROOT_USER, reason="per-session uids need mars to run as root")


@asynccontextmanager
async def tool_runtime(
    events: list[Event] | None = None, **config: Any
) -> AsyncIterator[ToolRuntime]:
    """A runtime with `ToolConfig(**config)`, publishing into `events`, closed at the end."""
    rt = ToolRuntime(ToolConfig(**config), publish=events.append if events is not None else None)
    try:
        yield rt
    finally:
        await rt.close()
    assert not rt.workspaces.root.exists() or config.get("workspace_root") is not None


def host_pids(*markers: str) -> list[int]:
    """Host pids whose command line contains one of `markers` (zombies excluded). Markers are
    odd numbers (`sleep 1000.75`) so that no other process on the host matches them."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ")
            state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if any(m.encode() in cmdline for m in markers) and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found
