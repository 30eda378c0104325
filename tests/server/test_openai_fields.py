"""Each OpenAI field vLLM's server takes, sent by the official `openai` client to a real
`mars serve`: honoured (the answer shows it), or refused with a 400 that names the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not importable: run ./scripts/setup.sh --dev",
    exc_type=ImportError,
)
openai = pytest.importorskip("openai", reason="openai is a dev dependency: pip install -e .[dev]")

from serving import serve  # noqa: E402

ASK = [{"role": "user", "content": "Write a short list of fruits, one per line."}]


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    for base in serve("--no-tools", "--served-model-name", "smol", "org/smol-135m"):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)


def _chat(client: Any, **extra: Any) -> Any:
    fields: dict[str, Any] = {"model": "smol", "messages": ASK, "max_tokens": 24}
    return client.chat.completions.create(**(fields | extra))


def _text(reply: Any) -> str:
    return str(reply.choices[0].message.content or "")


def test_models_are_listed_and_looked_up(client: Any) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["smol", "org/smol-135m"]
    assert client.models.retrieve("org/smol-135m").id == "org/smol-135m"
    with pytest.raises(openai.NotFoundError, match="smol"):
        client.models.retrieve("gpt-4o")


def test_seed_repeats_and_no_seed_varies(client: Any) -> None:
    seeded = {_text(_chat(client, temperature=1.0, seed=11)) for _ in range(2)}
    assert len(seeded) == 1
    free = {_text(_chat(client, temperature=1.0)) for _ in range(3)}
    assert len(free) > 1


def test_stop_ends_the_answer_before_the_stop_string(client: Any) -> None:
    full = _text(_chat(client, temperature=0))
    assert "\n" in full.strip()
    cut = _chat(client, temperature=0, stop=["\n"])
    assert "\n" not in _text(cut) and full.startswith(_text(cut))
    assert cut.choices[0].finish_reason == "stop"


def test_logit_bias_bans_a_token(client: Any) -> None:
    base = _chat(client, temperature=0, extra_body={"return_token_ids": True})
    first = base.choices[0].model_extra["token_ids"][0]
    banned = _chat(
        client,
        temperature=0,
        logit_bias={str(first): -100},
        extra_body={"return_token_ids": True},
    )
    assert first not in banned.choices[0].model_extra["token_ids"]


def test_penalties_change_a_greedy_answer(client: Any) -> None:
    long = {"temperature": 0, "max_tokens": 60}
    plain = _text(_chat(client, **long))
    assert _text(_chat(client, **long, frequency_penalty=2.0)) != plain
    assert _text(_chat(client, **long, presence_penalty=2.0)) != plain
    assert _text(_chat(client, **long, extra_body={"repetition_penalty": 1.8})) != plain


def test_min_p_and_top_k_are_accepted(client: Any) -> None:
    reply = _chat(client, temperature=1.0, seed=3, extra_body={"min_p": 0.5, "top_k": 5})
    assert _text(reply)


def test_response_format_json_object_and_schema(client: Any) -> None:
    obj = _chat(client, max_tokens=60, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(_text(obj)), dict)
    else:  # cut at max_tokens: still a JSON object's beginning
        assert _text(obj).lstrip().startswith("{")
    schema = {
        "type": "object",
        "properties": {"fruit": {"type": "string", "maxLength": 12}},
        "required": ["fruit"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}
    picked = _chat(client, max_tokens=60, response_format=fmt)
    assert set(json.loads(_text(picked))) == {"fruit"}


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"n": 2}, "n"),
        ({"extra_body": {"best_of": 3}}, "best_of"),
        ({"extra_body": {"echo": True}}, "echo"),
        ({"extra_body": {"structured_outputs": {"json": {}}}}, "structured_outputs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ],
)
def test_unsupported_fields_are_refused_by_name(client: Any, extra: Any, named: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, **extra)
    assert named in str(err.value)


def test_completions_refuse_suffix_and_echo_by_name(client: Any) -> None:
    for extra in ({"suffix": "end"}, {"echo": True}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="smol", prompt="Hello", max_tokens=4, **extra)
        assert next(iter(extra)) in str(err.value)


def test_a_too_long_prompt_is_a_context_window_error_to_litellm(client: Any) -> None:
    # LiteLLM (and OpenHands' condenser through it) knows a context-window error by its text:
    # then it shortens the history rather than retrying the same call.
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    too_long = [{"role": "user", "content": "word " * 9000}]
    for extra in ({}, {"max_tokens": 8190}):
        body = [{"role": "user", "content": "word " * 100}] if extra else too_long
        with pytest.raises(litellm.ContextWindowExceededError):
            litellm.completion(
                model="openai/smol",
                api_base=str(client.base_url),
                api_key="none",
                messages=body,
                num_retries=0,
                **extra,
            )
