"""OpenAI-compatible request bodies (plus vLLM's and MARS's extensions), their sampling
parameters, and OpenAI-style error bodies."""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mars.engine.sampling import MAX_LOGPROBS, SamplingParams

_SURROGATE = re.compile(r"[\ud800-\udfff]")


class Checked(BaseModel):
    """A request body whose strings are all text: JSON can spell a lone surrogate ("\\ud800"),
    which no UTF-8 text holds, so it is refused here (400) rather than fail deep inside."""

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        stack = [(data, "")]
        while stack:
            node, path = stack.pop()
            if isinstance(node, str):
                if _SURROGATE.search(node):
                    raise APIError(
                        400,
                        f"{path or 'body'} holds a lone UTF-16 surrogate, which is not text; "
                        "send valid Unicode (pair or drop it)",
                        param=path or None,
                    )
            elif isinstance(node, dict):
                stack += [(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()]
                stack += [(k, path) for k in node if isinstance(k, str)]
            elif isinstance(node, list):
                stack += [(v, f"{path}[{i}]") for i, v in enumerate(node)]
        return data


# Fields of OpenAI's and vLLM's APIs that mars does not implement: a request that asks for one is
# refused with a 400 that names it, rather than answered as if it had not asked.
UNSUPPORTED = ("echo", "best_of", "suffix", "structured_outputs")


class _Body(Checked):
    # Other unknown fields are accepted and ignored, so existing clients work unchanged. NaN and
    # infinity are not sampling values.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # vLLM extensions, also accepted inside `vllm_xargs`.
    min_tokens: int = 0
    ignore_eos: bool = False
    return_token_ids: bool = False  # each choice carries the sampled token ids (as vLLM)
    vllm_xargs: dict[str, Any] | None = None
    # Session identity and MARS markers (DESIGN.md section 8).
    session_id: str | None = None
    job_id: str | None = None
    prompt_cache_key: str | None = None
    cache_salt: str | None = None  # vLLM's: KV is shared only between requests of one salt
    user: str | None = None
    nvext: dict[str, Any] | None = None
    is_last_step: bool | None = None
    this_func_call: str | None = None
    last_func_call: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool | None = None  # each output token's log-probability
    top_logprobs: int | None = None  # ... with this many most likely tokens at its place
    parallel_tool_calls: bool | None = None  # False: at most one call a reply


class CompletionRequest(_Body):
    prompt: str | list[int] | list[str]
    # Each output token's log-probability, with this many most likely tokens at its place
    # (false: none; true: the token's own only).
    logprobs: bool | int | None = None


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

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


_CONTEXT_HINT = (
    "(mars serve: the context is the smaller of --kv-tokens and the context the model was "
    "trained on)"
)


def sampling_params(
    body: _Body, prompt_len: int, context: int, max_completion: int | None, grammar: str | None
) -> SamplingParams:
    """The request's sampling parameters, or a 400 that says which value is wrong and why."""
    extra = body.model_extra or {}
    for field in UNSUPPORTED:
        value = extra.get(field)
        if value is not None and value is not False and not (field == "best_of" and value == 1):
            raise APIError(400, f"{field} is not supported by mars serve; drop it", param=field)
    if body.n != 1:
        raise APIError(400, f"n must be 1: one choice per request (got {body.n})", param="n")
    room = context - prompt_len
    if room < 1:
        # OpenAI's and vLLM's wording: clients (LiteLLM, OpenHands' condenser) recognise a
        # context-window error by it and shorten the history instead of retrying.
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, your messages "
            f"resulted in {prompt_len} tokens. Please reduce the length of the messages. "
            f"{_CONTEXT_HINT}",
            param="messages" if isinstance(body, ChatRequest) else "prompt",
            code="context_length_exceeded",
        )
    max_tokens = max_completion if max_completion is not None else body.max_tokens
    name = "max_completion_tokens" if max_completion is not None else "max_tokens"
    max_tokens = room if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise APIError(400, f"{name} must be at least 1, got {max_tokens}", param=name)
    if prompt_len + max_tokens > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in "
            f"the completion). Please reduce the length of the messages or completion: {name} "
            f"at most {room}. {_CONTEXT_HINT}",
            param=name,
            code="context_length_exceeded",
        )
    checks = (
        (body.temperature >= 0, "temperature", "must be >= 0"),
        (0 < body.top_p <= 1, "top_p", "must be in (0, 1]"),
        (body.top_k >= 0, "top_k", "must be >= 0 (0 turns it off)"),
        (0 <= body.min_p <= 1, "min_p", "must be in [0, 1]"),
        (-2 <= body.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
        (-2 <= body.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
        (0 < body.repetition_penalty <= 2, "repetition_penalty", "must be in (0, 2]"),
    )
    for ok, field, rule in checks:
        if not ok:
            raise APIError(400, f"{field} {rule}, got {getattr(body, field)}", param=field)
    xargs = body.vllm_xargs or {}
    min_tokens = xargs.get("min_tokens", body.min_tokens)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int):
        raise APIError(400, "min_tokens must be an integer", param="min_tokens")
    if not 0 <= min_tokens <= max_tokens:
        raise APIError(
            400, f"min_tokens must be between 0 and {name} ({max_tokens})", param="min_tokens"
        )
    ignore_eos = xargs.get("ignore_eos", body.ignore_eos)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, "ignore_eos must be true or false", param="ignore_eos")
    bias = []
    for token, value in (body.logit_bias or {}).items():
        if not token.isdigit() or not -100 <= value <= 100:
            raise APIError(
                400,
                f"logit_bias maps token ids (as strings) to values in [-100, 100], got "
                f"{token!r}: {value}",
                param="logit_bias",
            )
        bias.append((int(token), value))
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=min(body.top_k, 2**31 - 1),  # llama.cpp takes an int32; more is "off" anyway
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=tuple(bias),
        seed=body.seed,
        stop=tuple(s for s in stop if s),
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        grammar=grammar,
        logprobs=_logprobs(body),
    )


def _logprobs(body: _Body) -> int | None:
    """How many alternatives per token the request asks for (None: no log-probabilities),
    or a 400. Chat: `logprobs` (true/false) and `top_logprobs`; completions: `logprobs` (a
    number). As vLLM, `top_logprobs: 0` without `logprobs` is no request at all."""
    if isinstance(body, ChatRequest):
        field, k = "top_logprobs", body.top_logprobs
        if k and not body.logprobs:
            raise APIError(
                400, f"top_logprobs ({k}) needs logprobs: true; set it", param="top_logprobs"
            )
        if not body.logprobs:
            return None
        k = k or 0
    elif isinstance(body, CompletionRequest):
        field, k = "logprobs", body.logprobs
        if k is None or k is False:
            return None
        k = 0 if k is True else int(k)
    else:
        return None
    if not 0 <= k <= MAX_LOGPROBS:
        raise APIError(400, f"{field} must be in [0, {MAX_LOGPROBS}], got {k}", param=field)
    return k
