"""`ReplayConfig.tool_markers`: each call names the tool its answer leads to (`this_func_call`),
how a gateway or vLLM's plug-in, which run no tools, learn of tool phases. No server: the agent's
HTTP client answers from an in-process handler."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

import mars.agents.replay as replay_mod
from mars.agents.client import ServerClient
from mars.agents.replay import ReplayConfig, replay
from mars.sim.workload import SessionSpec, ToolSpec, TurnSpec

TOOL = ToolSpec("test", True, 0.0, "measured")
SPEC = SessionSpec(
    "s0000",
    "traj",
    (TurnSpec(8, 2, 0, (TOOL,)), TurnSpec(12, 2, 10, ())),
)


def bodies_sent(monkeypatch: pytest.MonkeyPatch, **config: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        n = body["max_tokens"]
        choice = {"text": "", "token_ids": [1000] * n}
        return httpx.Response(200, json={"choices": [choice], "usage": {"completion_tokens": n}})

    class Answering(ServerClient):
        def __init__(self, base_url: str, **kwargs: Any) -> None:
            super().__init__(base_url, **kwargs)
            self.http = httpx.AsyncClient(base_url=base_url, transport=httpx.MockTransport(answer))

    monkeypatch.setattr(replay_mod, "ServerClient", Answering)
    cfg = ReplayConfig("http://test", concurrency=1, tools="client", **config)
    out = asyncio.run(replay([SPEC], cfg))
    assert out.failed == 0, [r.error for r in out.records]
    return sent


def test_markers_name_the_next_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    first, last = bodies_sent(monkeypatch, tool_markers=True)
    assert first["this_func_call"] == "test" and not first["is_last_step"]
    assert "this_func_call" not in last and last["is_last_step"]


def test_no_markers_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert all("this_func_call" not in b for b in bodies_sent(monkeypatch))
