"""An async client of `mars serve` for replay agents: completions with exact token counts, tool
runs through the tools API, and retries of requests the admission queue turned away.

A 429 or 503 answer carries `Retry-After`: the request is sent again after that many seconds,
until `retry_limit_s` has passed since its first send. Any other failure (an error status, a
broken connection, a timeout) raises `ReplayError`: the caller ends that session as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import httpx

RETRY_STATUSES = (429, 503)


class ReplayError(Exception):
    """A request failed for good: the session cannot go on."""


@dataclass(frozen=True)
class Completion:
    """What one call returned."""

    output_tokens: int  # usage.completion_tokens
    cached_tokens: int  # usage.prompt_tokens_details.cached_tokens: the server's prefix hit
    token_ids: list[int] | None  # the output's ids, when the server returns them
    latency_s: float  # first send to answer, retries included
    retries: int  # answers 429/503 before this one


@dataclass(frozen=True)
class ToolRun:
    """What one tool run returned (`POST /v1/sessions/{id}/tools`)."""

    exit_code: int | None
    timed_out: bool
    queue_wait_s: float  # waited for a tool worker
    run_s: float  # ran on a worker
    wall_s: float  # seen by the client, retries included


class ServerClient:
    """One HTTP connection pool to a server, shared by every agent of a replay."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 900.0,
        retry_limit_s: float = 900.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self.retry_limit_s = retry_limit_s

    async def aclose(self) -> None:
        await self.http.aclose()

    async def complete(
        self,
        session_id: str,
        prompt: list[int],
        output_tokens: int,
        *,
        last_step: bool = False,
        next_tool: str | None = None,
    ) -> Completion:
        """Exactly `output_tokens` tokens after `prompt`, in session `session_id`; `next_tool`
        is sent as `this_func_call` (the tool this call's answer asks for)."""
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": output_tokens,
            "min_tokens": output_tokens,
            "ignore_eos": True,
            "session_id": session_id,
            "is_last_step": last_step,
            "return_token_ids": True,  # vLLM's flag: used when the server honours it
        }
        if next_tool is not None:
            body["this_func_call"] = next_tool
        t0 = time.monotonic()
        data, retries = await self._post("/v1/completions", body)
        try:
            choice = data["choices"][0]
            usage = data["usage"]
            output = int(usage["completion_tokens"])
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ReplayError(f"unexpected completion answer ({e!r}): {data!r:.200}") from None
        ids = choice.get("token_ids")
        token_ids = [int(t) for t in ids] if isinstance(ids, list) else None
        return Completion(output, cached, token_ids, time.monotonic() - t0, retries)

    async def run_tool(
        self, session_id: str, command: str, *, name: str, timeout_s: float
    ) -> ToolRun:
        body = {"command": command, "timeout_s": timeout_s, "name": name}
        t0 = time.monotonic()
        data, _ = await self._post(f"/v1/sessions/{session_id}/tools", body)
        try:
            exit_code = data.get("exit_code")
            return ToolRun(
                None if exit_code is None else int(exit_code),
                bool(data.get("timed_out", False)),
                float(data.get("queue_wait_s") or 0.0),
                float(data.get("run_s") or 0.0),
                time.monotonic() - t0,
            )
        except (AttributeError, TypeError, ValueError) as e:
            raise ReplayError(f"unexpected tool answer ({e!r}): {data!r:.200}") from None

    async def end_session(self, session_id: str) -> None:
        """Best effort: a failed session's KV and workspace should not wait for the idle reaper."""
        with contextlib.suppress(httpx.HTTPError):
            await self.http.delete(f"/v1/sessions/{session_id}", timeout=10.0)

    async def get_json(self, path: str) -> Any:
        try:
            resp = await self.http.get(path, timeout=30.0)
            resp.raise_for_status()
            return resp.json()
        except (httpx.HTTPError, ValueError) as e:
            raise ReplayError(f"GET {path}: {e}") from None

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        deadline = time.monotonic() + self.retry_limit_s
        retries = 0
        while True:
            try:
                resp = await self.http.post(path, json=body)
            except httpx.HTTPError as e:
                raise ReplayError(f"POST {path}: {type(e).__name__}: {e}") from None
            if resp.status_code in RETRY_STATUSES:
                wait = _retry_after(resp)
                if time.monotonic() + wait > deadline:
                    raise ReplayError(
                        f"POST {path}: still {resp.status_code} after {retries} retries "
                        f"over {self.retry_limit_s:g} s"
                    )
                retries += 1
                await asyncio.sleep(wait)
                continue
            if resp.status_code != 200:
                raise ReplayError(f"POST {path}: {resp.status_code} {_message(resp)}")
            try:
                data = resp.json()
            except ValueError:
                raise ReplayError(f"POST {path}: answer is not JSON: {resp.text:.200}") from None
            if not isinstance(data, dict):
                raise ReplayError(f"POST {path}: answer is not a JSON object: {data!r:.200}")
            return data, retries


def _retry_after(resp: httpx.Response) -> float:
    """Seconds the server asked to wait (an HTTP date is not used by mars: 1 s then)."""
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]
