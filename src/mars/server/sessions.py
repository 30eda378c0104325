"""Which agent session a request belongs to, and its markers (DESIGN.md section 8).

Identity comes from the first of: body `session_id`, `job_id`, `prompt_cache_key`, `user`,
Dynamo's `nvext.session_control.session_id`, `vllm_xargs.session_id`, headers `X-Session-ID` and
`x-litellm-session-id`. Without any, a fingerprint of the conversation's opening (system prompt
and first user message) stands in: it is the same on every turn of an agent's conversation, so
agents that send nothing still get session-level scheduling.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mars.server.protocol import _Body

_TRUE = ("1", "true", "yes", "on")


def session_of(body: _Body, headers: Mapping[str, str], opening: Any) -> str:
    xargs = body.vllm_xargs or {}
    control = (body.nvext or {}).get("session_control")
    nv = control.get("session_id") if isinstance(control, dict) else None
    for candidate in (
        body.session_id,
        body.job_id,
        body.prompt_cache_key,
        body.user,
        nv,
        xargs.get("session_id") or xargs.get("job_id"),
        headers.get("x-session-id"),
        headers.get("x-litellm-session-id"),
    ):
        if isinstance(candidate, str | int) and not isinstance(candidate, bool) and candidate != "":
            return str(candidate)
    digest = hashlib.sha256(json.dumps(opening, sort_keys=True, default=str).encode())
    return "fp-" + digest.hexdigest()[:16]


def chat_opening(messages: list[dict[str, Any]]) -> list[Any]:
    """What a chat fingerprint hashes: the first system message and the first user message."""
    first: dict[str, Any] = {}
    for m in messages:
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role in ("system", "user") and role not in first:
            first[role] = m.get("content")
    return [first.get("system"), first.get("user")]


def is_last_step(body: _Body, headers: Mapping[str, str]) -> bool:
    xargs = body.vllm_xargs or {}
    for flag in (body.is_last_step, xargs.get("is_last_step"), headers.get("x-mars-is-last-step")):
        if flag is not None:
            return flag is True or str(flag).strip().lower() in _TRUE
    return False


def func_calls(body: _Body, headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(this_func_call, last_func_call): tool names, as in the MARS artifact."""
    xargs = body.vllm_xargs or {}
    names = []
    for key, value in (
        ("this_func_call", body.this_func_call),
        ("last_func_call", body.last_func_call),
    ):
        header = "x-mars-" + key.replace("_", "-")
        names.append(_name(value or xargs.get(key) or headers.get(header)))
    return names[0], names[1]


def _name(value: Any) -> str | None:
    return str(value) if isinstance(value, str | int) and value != "" else None
