"""The tools API of a real `mars serve` process: a run whose client left is killed and frees its
worker, and the workspaces of a killed server are removed by the next one to start (never those
of a server still running)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not importable: run ./scripts/setup.sh --dev",
    exc_type=ImportError,
)
httpx = pytest.importorskip("httpx", reason="httpx is a dev dependency: pip install -e .[dev]")

from tools_helpers import host_pids  # noqa: E402

from mars.tools.workspace import ROOT_PREFIX, dir_name  # noqa: E402
from serving import serve  # noqa: E402

SANDBOX = () if shutil.which("bwrap") else ("--unsafe-tools",)


def run(
    base: str, session_id: str, command: str, timeout: float = 10, **body: float
) -> dict[str, Any]:
    r = httpx.post(
        f"{base}/v1/sessions/{session_id}/tools",
        json={"command": command, **body},
        timeout=timeout,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.fixture()
def one_worker() -> Iterator[str]:
    yield from serve("--tool-workers", "1", *SANDBOX)


def test_a_client_that_leaves_kills_its_run_and_frees_the_worker(one_worker: str) -> None:
    with pytest.raises(httpx.ReadTimeout):  # the client gives up: its socket closes
        run(one_worker, "leaves", "sleep 1000.77", timeout=1.5, timeout_s=3600)
    # The only worker is free again: another session's run does not wait an hour.
    assert run(one_worker, "other", "echo hi", timeout=5)["stdout"] == "hi\n"
    deadline = time.monotonic() + 2
    while host_pids("sleep 1000.77") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host_pids("sleep 1000.77") == [], "the run of the client that left still runs"


@pytest.fixture()
def tmpdir_() -> Iterator[Path]:
    """The servers' TMPDIR, reachable by session uids (pytest's tmp_path is private to root)."""
    top = Path(tempfile.mkdtemp(prefix="mars-test-"))
    top.chmod(0o711)
    yield top
    shutil.rmtree(top)


def test_a_killed_servers_workspaces_go_at_the_next_start_a_live_ones_stay(tmpdir_: Path) -> None:
    def start() -> tuple[Iterator[str], str, Path]:
        """A server with one session's workspace (holding a file), and that workspace's root."""
        before = set(tmpdir_.glob(ROOT_PREFIX + "*"))
        server = serve(*SANDBOX, env={"TMPDIR": str(tmpdir_)})
        base = next(server)
        run(base, "s", "echo kept > f")
        (root,) = set(tmpdir_.glob(ROOT_PREFIX + "*")) - before
        return server, base, root

    killed, killed_base, dead_root = start()
    alive, alive_base, live_root = start()
    try:
        (pid,) = host_pids(f"--port {httpx.URL(killed_base).port} ")
        os.kill(pid, signal.SIGKILL)
        killed.close()  # waits for the killed process
        assert (dead_root / dir_name("s") / "f").exists()  # nothing cleaned up after it
        restarted, _, new_root = start()
        restarted.close()
        assert not dead_root.exists()
        assert (live_root / dir_name("s") / "f").exists()
        assert run(alive_base, "s", "cat f")["stdout"] == "kept\n"
        assert not new_root.exists()  # a clean exit removes its own root
    finally:
        alive.close()
    assert not live_root.exists()
