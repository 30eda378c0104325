"""Which agent session a request belongs to, and its markers (DESIGN.md section 8).

Identity comes from the first of: body `session_id`, `job_id`, `prompt_cache_key`, `user`,
Dynamo's `nvext.session_control.session_id`, `vllm_xargs.session_id`, headers `X-Session-ID` and
`x-litellm-session-id`. Without any, a fingerprint of the conversation's opening (system prompt
and first user message) stands in, so agents that send nothing still get session scheduling.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mars.server.protocol import _Body


def session_of(body: _Body, headers: Mapping[str, str], opening: Any) -> str:
    xargs = body.vllm_xargs or {}
    nv = ((body.nvext or {}).get("session_control") or {}).get("session_id")
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
        if candidate:
            return str(candidate)
    digest = hashlib.sha256(json.dumps(opening, sort_keys=True, default=str).encode())
    return "fp-" + digest.hexdigest()[:16]


def is_last_step(body: _Body, headers: Mapping[str, str]) -> bool:
    xargs = body.vllm_xargs or {}
    flag = body.is_last_step if body.is_last_step is not None else xargs.get("is_last_step")
    if flag is None:
        flag = headers.get("x-mars-is-last-step", "").lower() in ("1", "true", "yes")
    return bool(flag)


def func_calls(body: _Body, headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(this_func_call, last_func_call): tool names, as in the MARS artifact."""
    xargs = body.vllm_xargs or {}
    this = (
        body.this_func_call or xargs.get("this_func_call") or headers.get("x-mars-this-func-call")
    )
    last = (
        body.last_func_call or xargs.get("last_func_call") or headers.get("x-mars-last-func-call")
    )
    return this, last
