"""`MarsRequestRouter` reads a call's session where each caller puts it: the `session_id=`
keyword of mars's front, or the OpenAI request object that Ray Serve LLM passes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: ./scripts/setup.sh --dev")

from ray.serve.request_router import PendingRequest

from mars.ray.app import replica_args
from mars.ray.router import _session


def pending(*args: object, **kwargs: object) -> PendingRequest:
    """What the router reads of Ray's `PendingRequest` (whose future needs a running loop)."""
    return cast(PendingRequest, SimpleNamespace(args=list(args), kwargs=dict(kwargs)))


def test_the_session_comes_from_the_keyword_or_the_request_object() -> None:
    assert _session(pending("GET", session_id="a")) == "a"
    assert _session(pending(SimpleNamespace(session_id="b", vllm_xargs=None))) == "b"
    xargs = SimpleNamespace(session_id=None, vllm_xargs={"session_id": 7})
    assert _session(pending(xargs)) == "7"
    assert _session(pending(SimpleNamespace(vllm_xargs="junk"))) is None
    assert _session(pending()) is None


def test_replicas_get_the_serve_options_but_the_apps_own() -> None:
    argv = ["--ray", "--replicas", "2", "--policy", "mars", "--port=9000", "--host", "0.0.0.0"]
    argv += ["--ray=auto", "--api-key", "k", "--kv-tokens", "4096", "--replica-cpus", "2"]
    assert replica_args(argv) == ["--policy", "mars", "--kv-tokens", "4096"]
    assert replica_args(["--ray", "10.0.0.1:6379", "--set", "a=1"]) == ["--set", "a=1"]
