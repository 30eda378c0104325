"""The tools routes through FastAPI's TestClient, on an app holding only them (no model loaded)."""

from __future__ import annotations

import tarfile
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from tools_helpers import needs_bwrap

from mars.server.protocol import APIError, error_response
from mars.server.tools_api import tools_router
from mars.tools.runtime import ToolConfig, ToolRuntime


def make_app(runtime: ToolRuntime | None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if runtime is not None:
            await runtime.close()

    app = FastAPI(lifespan=lifespan)
    app.include_router(tools_router(lambda: runtime))

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    return app


@pytest.fixture()
def client() -> Iterator[TestClient]:
    seeds = (Path(tempfile.gettempdir()),)  # where tmp_path lives
    with TestClient(make_app(ToolRuntime(ToolConfig(workers=2, seed_roots=seeds)))) as c:
        yield c


@needs_bwrap
def test_a_tool_runs_and_answers_its_output_and_timings(client: TestClient) -> None:
    r = client.post("/v1/sessions/s1/tools", json={"command": "echo hi; echo err >&2; exit 3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {
        "stdout", "stderr", "exit_code", "timed_out", "killed", "truncated", "queue_wait_s",
        "run_s",
    }  # fmt: skip
    assert (body["stdout"], body["stderr"], body["exit_code"]) == ("hi\n", "err\n", 3)
    assert not body["timed_out"] and body["killed"] is None and body["run_s"] > 0
    hung = client.post("/v1/sessions/s1/tools", json={"command": "sleep 100", "timeout_s": 0.3})
    assert hung.json()["timed_out"] is True and hung.json()["exit_code"] == 137
    assert hung.json()["killed"] == "timeout: the run took longer than 0.3 s"


@needs_bwrap
def test_bad_requests_get_a_clear_4xx(client: TestClient, tmp_path: Path) -> None:
    cases = [
        ({"command": ""}, 400, "command"),
        ({"command": "ls", "timeout_s": 0}, 400, "timeout_s"),
        ({"command": "ls", "timeout_s": 99999}, 400, "timeout_s"),
    ]
    for body, status, param in cases:
        r = client.post("/v1/sessions/s/tools", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param
    typo = client.post("/v1/sessions/s/tools", json={"command": "ls", "timeout": 5})
    assert typo.status_code == 422  # the real app answers its validation errors as 400
    missing = str(Path(tempfile.gettempdir()) / "no-such-seed")
    for seed, words in (("relative/dir", "absolute path"), (missing, "no such file")):
        r = client.post("/v1/sessions/s/workspace", json={"seed": seed})
        assert r.status_code == 400 and words in r.json()["error"]["message"]
    # Only paths under a --seed-root may be copied in: not the server's own files.
    r = client.post("/v1/sessions/s/workspace", json={"seed": "/etc"})
    assert r.status_code == 403 and "--seed-root" in r.json()["error"]["message"]
    (tmp_path / "evil.tar").write_bytes(b"")
    with tarfile.open(tmp_path / "evil.tar", "w") as tf:
        tf.addfile(tarfile.TarInfo("../x"))
    r = client.post("/v1/sessions/s/workspace", json={"seed": str(tmp_path / "evil.tar")})
    assert r.status_code == 400 and "refused archive" in r.json()["error"]["message"]


@needs_bwrap
def test_seed_run_and_delete_a_workspace(client: TestClient, tmp_path: Path) -> None:
    seed = tmp_path / "repo"
    seed.mkdir()
    (seed / "main.py").write_text("print('from the seed')\n")
    r = client.post("/v1/sessions/w/workspace", json={"seed": str(seed)})
    assert r.status_code == 200, r.text
    run = client.post("/v1/sessions/w/tools", json={"command": "python3 main.py"})
    assert run.json()["stdout"] == "from the seed\n"
    assert client.delete("/v1/sessions/w/workspace").json() == {"session_id": "w", "deleted": True}
    assert client.delete("/v1/sessions/w/workspace").json()["deleted"] is False


def test_tools_off_answers_501_with_the_fix() -> None:
    with TestClient(make_app(None)) as c:
        r = c.post("/v1/sessions/s/tools", json={"command": "ls"})
    assert r.status_code == 501
    message = r.json()["error"]["message"]
    assert "apt-get install bubblewrap" in message and "--unsafe-tools" in message
