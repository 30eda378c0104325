"""A fresh `mars serve` subprocess per benchmark run: free port, wait for /health, stop at the end.

Only the standard library is used here (`mars.bench` imports no HTTP client, see
tests/test_imports.py); the server's stdout and stderr go to a log file.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mars.core.errors import UsageError
from mars.core.process import die_with_parent

START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout_s: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


@contextmanager
def mars_server(serve_args: Sequence[str], log_path: Path) -> Iterator[str]:
    """Run `mars serve SERVE_ARGS` on a free port; yields its base URL once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "mars", "serve", "--port", str(port), *serve_args]
    base = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # A killed benchmark takes its server along (no finally runs on SIGTERM/SIGKILL).
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        try:
            _wait_healthy(proc, base, log_path)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen[bytes], base: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            lines = log_path.read_text().strip().splitlines()
            last = lines[-1] if len(lines) > 1 else "(no output)"
            raise UsageError(f"mars serve exited with status {proc.returncode}: {last}")
        try:
            get_json(f"{base}/health", timeout_s=1.0)
            return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise UsageError(
                f"mars serve did not answer /health within {START_TIMEOUT_S:g} s; see {log_path}"
            )
        time.sleep(0.2)


def unsafe_tools() -> list[str]:
    """`["--unsafe-tools"]` where this `mars serve` has the flag: for runs (tests, CI) on hosts
    where bubblewrap cannot sandbox and the tools run are the agents' own busy loops."""
    help_text = subprocess.run(
        [sys.executable, "-m", "mars", "serve", "--help"], capture_output=True, text=True
    ).stdout
    return ["--unsafe-tools"] if "--unsafe-tools" in help_text else []
