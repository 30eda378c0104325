"""The tools API: run a command in a session's workspace, seed or delete the workspace.

`POST /v1/sessions/{id}/tools` `{"command": "pytest -x", "timeout_s": 30, "name": "test"}`
answers `{"stdout", "stderr", "exit_code", "timed_out", "truncated", "queue_wait_s", "run_s"}`;
a client that disconnects first kills its run (and frees the worker for other sessions).
`POST /v1/sessions/{id}/workspace` `{"seed": "/abs/path/dir-or-archive"}` seeds from a path on the
server; `DELETE /v1/sessions/{id}/workspace` kills the session's tools and removes its files.
With API keys, a session another tenant owns is a 404 on each route (`mars.server.tenants`).
A run still going when the server stops (SIGTERM) is killed and answered with a JSON 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ConfigDict

from mars.server.disconnect import unless_gone
from mars.server.owners import Owners, tenant_of
from mars.server.protocol import APIError, Checked, error_response
from mars.server.responses import Activity
from mars.tools.runtime import ToolCancelled, ToolInputError, ToolRuntime
from mars.tools.sandbox import INSTALL_HINT


class ToolRun(Checked):
    model_config = ConfigDict(extra="forbid")  # a misspelt "timeout" must not be ignored

    command: str
    timeout_s: float = 30.0
    name: str | None = None  # the tool's category; default: classed from the command


class WorkspaceSeed(Checked):
    model_config = ConfigDict(extra="forbid")

    seed: str  # absolute path, on the server, of a directory or .tar/.tar.gz/.tgz/.zip file


def tools_router(
    get_runtime: Callable[[], ToolRuntime | None],
    activity: Activity | None = None,
    owners: Owners | None = None,
) -> APIRouter:
    """The routes, reading the runtime through `get_runtime` (None: tools are off). A session
    running a tool is active (`activity`): the idle timeout never ends it mid-run. `owners`
    keeps each tenant to its own sessions."""
    router = APIRouter()
    owners = owners or Owners()

    def runtime() -> ToolRuntime:
        rt = get_runtime()
        if rt is None:
            raise APIError(501, f"the tools API is off: {INSTALL_HINT}", code="tools_disabled")
        return rt

    @router.post("/v1/sessions/{session_id}/tools", response_model=None)
    async def run_tool(
        session_id: str, body: ToolRun, request: Request
    ) -> dict[str, Any] | Response:
        rt = runtime()
        owners.claim(tenant_of(request), session_id)
        if activity is not None:
            activity.begin(session_id)
        try:
            work = rt.run(session_id, body.command, body.timeout_s, body.name)
            result = await unless_gone(request, work)
        except asyncio.CancelledError:  # the server is stopping and its grace ran out
            return error_response(
                503,
                "the server is shutting down: the tool run was killed; retry",
                code="shutdown",
                headers={"Retry-After": "5"},
            )
        except ToolInputError as e:
            raise APIError(400, str(e), param=e.param) from None
        except ToolCancelled as e:
            raise APIError(409, str(e)) from None
        finally:
            if activity is not None:
                activity.end(session_id)
        if result is None:
            return Response(status_code=499)  # nobody is listening any more
        return result.to_json()

    @router.post("/v1/sessions/{session_id}/workspace")
    async def seed_workspace(
        session_id: str, body: WorkspaceSeed, request: Request
    ) -> dict[str, Any]:
        rt = runtime()
        owners.claim(tenant_of(request), session_id)
        if activity is not None:  # a seeded workspace idles out like a session's tools
            activity.begin(session_id)
        try:
            return await _seed(rt, session_id, body)
        finally:
            if activity is not None:
                activity.end(session_id)

    @router.delete("/v1/sessions/{session_id}/workspace")
    async def delete_workspace(session_id: str, request: Request) -> dict[str, Any]:
        rt = runtime()
        owners.check(tenant_of(request), session_id)
        return {"session_id": session_id, "deleted": await rt.end_session(session_id)}

    return router


async def _seed(rt: ToolRuntime, session_id: str, body: WorkspaceSeed) -> dict[str, Any]:
    """Seed the workspace from a path under a --seed-root, or a 4xx that says why not."""
    if "\x00" in body.seed:
        raise APIError(400, "seed holds a NUL byte, which no path can", param="seed")
    source = Path(body.seed)
    if not source.is_absolute():
        raise APIError(400, f"seed must be an absolute path, got {body.seed!r}", param="seed")
    if not rt.config.may_seed_from(source):
        roots = ", ".join(str(r) for r in rt.config.seed_roots) or "none"
        raise APIError(
            403,
            f"seeding from {body.seed!r} is not allowed (seed roots: {roots}); start "
            "`mars serve --seed-root DIR` with a directory that holds the seeds",
            param="seed",
            code="seed_not_allowed",
        )
    if not source.exists():
        raise APIError(
            400, f"seed {body.seed!r}: no such file or directory on the server", param="seed"
        )
    try:
        await rt.seed(session_id, source)
    except ToolInputError as e:
        raise APIError(400, str(e), param=e.param or "seed") from None
    except ToolCancelled as e:
        raise APIError(409, str(e)) from None
    except (ValueError, OSError) as e:
        raise APIError(400, f"cannot seed from {body.seed!r}: {e}", param="seed") from None
    return {"session_id": session_id, "seeded": str(source)}
