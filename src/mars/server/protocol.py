"""OpenAI-compatible request bodies (plus vLLM's and MARS's extensions) and error bodies."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    # Unknown OpenAI fields (logprobs, presence_penalty, ...) are accepted and ignored, so
    # existing clients work unchanged.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # vLLM extensions, also accepted inside `vllm_xargs`.
    min_tokens: int = 0
    ignore_eos: bool = False
    vllm_xargs: dict[str, Any] | None = None
    # Session identity and MARS markers (DESIGN.md section 8).
    session_id: str | None = None
    job_id: str | None = None
    prompt_cache_key: str | None = None
    user: str | None = None
    nvext: dict[str, Any] | None = None
    is_last_step: bool | None = None
    this_func_call: str | None = None
    last_func_call: str | None = None


class ChatRequest(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Body):
    prompt: str | list[int] | list[str]


class APIError(Exception):
    """An error the client caused or must handle, answered as an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)
