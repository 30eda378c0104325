"""A real `mars serve` process for tests: started on a free port, healthy before use, stopped
after (its output is kept for failures)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KV_TOKENS = 8192


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(*extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Yield the base URL of a fresh server started with `extra` options."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if k != "MARS_API_KEY"}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "mars", "serve", "--port", str(port)]
    cmd += ["--kv-tokens", str(KV_TOKENS), "--threads", "2", *extra]
    # Its output goes to a file, not a pipe: a pipe nobody reads fills up (a line per request)
    # and blocks the server.
    out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed after the process stops)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                out.seek(0)
                raise AssertionError(f"mars serve exited with {proc.returncode}: {out.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mars serve did not become healthy in 60 s"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        out.close()
