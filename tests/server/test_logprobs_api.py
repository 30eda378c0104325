"""`logprobs` against a real `mars serve`, through the official `openai` client: chat's
(`logprobs`, `top_logprobs`) and completions' (`logprobs: k`), whole and streamed, with stop
strings and tool calls, and the 400s for what is out of range."""

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

HI = [{"role": "user", "content": "Say hi and tell me about your day."}]
PROMPT = "Count to ten: one, two, three,"


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    for base in serve("--threads", "1"):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_chat_logprobs_with_three_alternatives(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="default", messages=HI, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.bytes == list(entry.token.encode())
        alts = [a.logprob for a in entry.top_logprobs]
        assert alts == sorted(alts, reverse=True) and all(a <= 0 for a in alts)
        assert entry.logprob >= max(alts) - 1e-9  # greedy: the raw model's most likely token
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_logprobs_ignore_the_sampler(client: openai.OpenAI) -> None:
    """Raw logprobs (vLLM's default): the model's, before temperature, bias or penalties."""
    body: dict[str, Any] = {"model": "default", "messages": HI, "max_tokens": 1, "logprobs": True}
    greedy = client.chat.completions.create(
        **body, temperature=0, extra_body={"return_token_ids": True}
    )
    first = greedy.choices[0].logprobs.content[0]
    banned = greedy.choices[0].model_extra["token_ids"][0]
    hot = client.chat.completions.create(
        **body, temperature=1.7, seed=3, logit_bias={str(banned): -100}, top_logprobs=2
    )
    other = hot.choices[0].logprobs.content[0]
    assert other.token != first.token  # the bias kept the sampler off it...
    assert other.top_logprobs[0].token == first.token  # ...not the logprobs
    assert other.top_logprobs[0].logprob == pytest.approx(first.logprob, abs=1e-6)
    assert other.logprob < first.logprob


def test_chat_without_logprobs_has_none(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="default", messages=HI, max_tokens=4)
    assert r.choices[0].logprobs is None


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="default", prompt=PROMPT, max_tokens=16, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert len(lp.tokens) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == sorted(lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 2 <= len(top) <= 3  # the 2 most likely, and the sampled token
        assert top[token] == value and value >= max(top.values()) - 1e-9


def test_streamed_chat_logprobs_cover_every_token(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="default",
        messages=HI,
        max_tokens=48,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    entries, text, usage = [], "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta.content or ""
            got = choice.logprobs.content if choice.logprobs else []
            assert "".join(e.token for e in got) == delta  # each event: its own tokens
            entries += got
            text += delta
    assert usage is not None and len(entries) == usage.completion_tokens
    assert "".join(e.token for e in entries) == text


def test_streamed_completion_offsets_run_on(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="default", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0, stream=True
    )
    tokens: list[str] = []
    offsets: list[int] = []
    text = ""
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
        text += choice.text
    assert "".join(tokens) == text and len(tokens) == 12
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_cuts_its_tokens(client: openai.OpenAI, stream: bool) -> None:
    """The tokens reported cover the text sent and no more than the token it ends in."""
    body: dict[str, Any] = {"model": "default", "prompt": PROMPT, "max_tokens": 16}
    plain = client.completions.create(**body, temperature=0).choices[0].text
    stop = plain[len(plain) // 2 : len(plain) // 2 + 3]
    assert stop.strip(), plain
    r = client.completions.create(**body, temperature=0, logprobs=1, stop=[stop], stream=stream)
    chunks = list(r) if stream else [r]
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert text == plain[: plain.index(stop)]
    joined = "".join(tokens)
    assert joined.startswith(text) and len(joined) - len(text) < len(tokens[-1] if tokens else "")


def test_logprobs_with_a_tool_call(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}
    tools = [{"type": "function", "function": {"name": "ls", "parameters": schema}}]
    for stream in (False, True):
        r = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "List the files in src."}],
            tools=tools,
            tool_choice="required",
            max_tokens=60,
            temperature=0,
            logprobs=True,
            stream=stream,
            stream_options={"include_usage": True} if stream else None,
        )
        if stream:
            chunks = list(r)
            got = [
                e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content
            ]
            usage = chunks[-1].usage
            args = "".join(
                t.function.arguments or ""
                for c in chunks
                for ch in c.choices
                for t in ch.delta.tool_calls or []
            )
        else:
            got, usage = r.choices[0].logprobs.content, r.usage
            args = r.choices[0].message.tool_calls[0].function.arguments
        assert len(got) == usage.completion_tokens
        # The tokens spell the reply as generated: the forced call's JSON, arguments within.
        reply = json.loads("".join(e.token for e in got))
        assert reply["name"] == "ls" and reply["arguments"] == json.loads(args)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"logprobs": False, "top_logprobs": 1}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("completions", {"logprobs": 21}, "logprobs"),
    ],
)
def test_logprobs_out_of_range_are_refused(
    client: openai.OpenAI, path: str, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        if path == "chat":
            client.chat.completions.create(model="default", messages=HI, max_tokens=2, **body)
        else:
            client.completions.create(model="default", prompt=PROMPT, max_tokens=2, **body)
    error = e.value.body
    assert isinstance(error, dict), error
    error = error.get("error", error)
    assert error["param"] == param, error
    assert param in error["message"]
    if "21" in json.dumps(body) or "-1" in json.dumps(body):
        assert "[0, 20]" in error["message"]
