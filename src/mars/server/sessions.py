"""Which agent session a request belongs to, and its markers (DESIGN.md section 8).

A session is named by the conversation identifiers a request carries, in this order: body
`session_id`, `nvext.session_control.session_id` (Dynamo), `vllm_xargs.session_id` (or `job_id`),
`job_id`, `prompt_cache_key`; headers `X-Session-ID` (vLLM 0.28+, llm-d), `X-Dynamo-Session-ID`,
`x-litellm-session-id` (LiteLLM, OpenHands), `x-claude-code-session-id`. One identifier names the
session; several *different* ones are joined (`a~b`), so that two conversations are never merged
because one field is the same in both: OpenHands sends its conversation id as a header on every
call, and a body `session_id` set on an `LLM` object shared by several conversations would
otherwise fold them into one session. The same value sent twice counts once.

Without any, a fingerprint of the conversation's opening (system prompt and first user message)
and of `user` stands in (`user` names a person, not a conversation: alone it would merge every
conversation of that person): it is the same on every turn of an agent's conversation, so
agents that send nothing still get session-level scheduling. With API keys it is salted by the
tenant too, so two tenants never share a fingerprint session.

A session ends on its last step: body `is_last_step` (or in `vllm_xargs`), header
`x-mars-is-last-step` or `X-Dynamo-Session-Final`, or `nvext.session_control.action: "close"`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mars.server.protocol import _Body

_TRUE = ("1", "true", "yes", "on")
HEADERS = (
    "x-session-id",
    "x-dynamo-session-id",
    "x-litellm-session-id",
    "x-claude-code-session-id",
)


def session_of(
    body: _Body, headers: Mapping[str, str], opening: Any, salt: str | None = None
) -> str:
    """The request's session id; `salt` (the tenant, `mars.server.tenants`) goes into a
    fingerprint, never into an id the client named."""
    xargs = body.vllm_xargs or {}
    control = _control(body)
    found: list[str] = []
    for candidate in (
        body.session_id,
        control.get("session_id"),
        xargs.get("session_id") or xargs.get("job_id"),
        body.job_id,
        body.prompt_cache_key,
        *(headers.get(h) for h in HEADERS),
    ):
        named = isinstance(candidate, str | int) and not isinstance(candidate, bool)
        if named and candidate != "" and str(candidate) not in found:
            found.append(str(candidate))
    if found:
        return "~".join(found)  # URL-safe: the id goes into the tools API's paths
    salted = [opening, body.user] if salt is None else [opening, body.user, salt]
    digest = hashlib.sha256(json.dumps(salted, sort_keys=True, default=str).encode())
    return "fp-" + digest.hexdigest()[:16]


def _control(body: _Body) -> dict[str, Any]:
    control = (body.nvext or {}).get("session_control")
    return control if isinstance(control, dict) else {}


def chat_opening(messages: list[dict[str, Any]]) -> list[Any]:
    """What a chat fingerprint hashes: the first system message and the first user message."""
    first: dict[str, Any] = {}
    for m in messages:
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role in ("system", "user") and role not in first:
            first[role] = m.get("content")
    return [first.get("system"), first.get("user")]


def is_last_step(body: _Body, headers: Mapping[str, str]) -> bool:
    if _control(body).get("action") == "close":
        return True
    xargs = body.vllm_xargs or {}
    for flag in (
        body.is_last_step,
        xargs.get("is_last_step"),
        headers.get("x-mars-is-last-step"),
        headers.get("x-dynamo-session-final"),
    ):
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
