"""`mars serve` end to end: the real server process, the real default model, the official
`openai` client, and every bad input answered with an OpenAI-style error (never a 500)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

# ImportError too: an installed llama-cpp-python whose shared library does not load.
pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not importable: run ./scripts/setup.sh --dev",
    exc_type=ImportError,
)
httpx = pytest.importorskip("httpx", reason="httpx is a dev dependency: pip install -e .[dev]")
openai = pytest.importorskip("openai", reason="openai is a dev dependency: pip install -e .[dev]")

from mars.server import toolcalls  # noqa: E402
from mars.server.protocol import APIError, ChatRequest  # noqa: E402
from mars.server.sessions import chat_opening, is_last_step, session_of  # noqa: E402
from serving import KV_TOKENS, serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from serve()


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[str]:
    yield from serve(env={"MARS_API_KEY": KEY})


@pytest.fixture()
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def chat(base: str, timeout: float = 120, **body: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=timeout)


def wait_idle(base: str, seconds: float = 5.0) -> dict[str, Any]:
    """The engine's stats once nothing runs or waits (or after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        stats = httpx.get(f"{base}/v1/kv_cache_stats").json()
        if (stats["running"], stats["waiting"]) == (0, 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


RUN_TESTS = {
    "type": "function",
    "function": {
        "name": "run_tests",
        "description": "Run the test suite of a path",
        # A 135M model rambles inside free strings: bound the path (real schemas do too).
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string", "maxLength": 24},
                "verbose": {"type": "boolean"},
            },
            "required": ["path", "verbose"],
        },
    },
}


# ---- the openai client ----------------------------------------------------------------------
def test_chat_plain(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="default", messages=ask("Name a colour."), max_tokens=12, temperature=0
    )
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_streaming_matches_plain(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model="default", messages=ask("Count from one to five."), max_tokens=16, temperature=0
    )
    plain = client.chat.completions.create(**kwargs, user="stream-a")
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, user="stream-b", stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_forced_tool_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="default",
        messages=ask("Run the tests in src/."),
        tools=[RUN_TESTS],
        max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "run_tests"}},
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "run_tests" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert isinstance(args["path"], str) and isinstance(args["verbose"], bool)


def test_required_tool_call_streams_its_arguments_as_they_come(client: openai.OpenAI) -> None:
    asked: dict[str, Any] = {
        "model": "default",
        "messages": ask("Run the tests in src/."),
        "tools": [RUN_TESTS],
        "tool_choice": "required",
        "max_tokens": 80,
        "temperature": 0,
    }
    chunks = list(client.chat.completions.create(**asked, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    # As OpenAI streams a call: index, id, type and name first, then pieces of the arguments.
    head, pieces = deltas[0], deltas[1:]
    assert head.function.name == "run_tests" and head.id.startswith("call_")
    assert head.type == "function" and not head.function.arguments
    assert len(pieces) >= 2 and all(p.index == 0 and p.id is None for p in pieces)
    args = json.loads("".join(p.function.arguments or "" for p in pieces))
    plain = client.chat.completions.create(**asked).choices[0].message.tool_calls[0]
    assert args == json.loads(plain.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_in_auto_mode_stream_prose_as_it_comes(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=ask("Write two sentences about the sea. Do not call any function."),
            tools=[RUN_TESTS],
            max_tokens=40,
            temperature=0,
            stream=True,
        )
    )
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    if calls:  # the model called anyway: then the call came whole, as parse() reads it
        assert calls[0].function.name == "run_tests" and calls[0].id.startswith("call_")
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    else:  # prose: streamed piece by piece, not in one chunk at the end
        assert len(content) >= 5, content
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_parallel_tool_calls_false_keeps_one_call() -> None:
    two = '[{"name": "run_tests", "arguments": {"path": "a", "verbose": true}}, ' * 1
    two += '{"name": "run_tests", "arguments": {"path": "b", "verbose": false}}]'
    fns = toolcalls.chosen([RUN_TESTS], "auto")[0]
    assert len(toolcalls.parse(two, fns)[1] or []) == 2
    stream = toolcalls.CallStream(fns, forced=False, parallel=False)
    for ch in two:
        stream.feed(ch)
    stream.finish()
    assert stream.calls is not None and len(stream.calls) == 1


@pytest.mark.parametrize(
    "reply",
    [
        "Sure, running them now.",
        'Let me run them. {"name": "run_tests", "arguments": {"path": "src", "verbose": true}}',
        '```json\n{"name": "run_tests", "arguments": {"path": "x", "verbose": false}}\n```',
        'a <b>tag</b> then <tool_call>{"name": "run_tests", "arguments": {"path": "y", '
        '"verbose": true}}</tool_call>',
        "a lone < and a ` tick and {not json",
    ],
)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_a_streamed_reply_says_what_the_whole_one_says(reply: str, step: int) -> None:
    fns = toolcalls.chosen([RUN_TESTS], "auto")[0]
    content, calls = toolcalls.parse(reply, fns)
    stream = toolcalls.CallStream(fns, forced=False)
    deltas = [d for i in range(0, len(reply), step) for d in stream.feed(reply[i : i + step])]
    early = "".join(d.get("content", "") for d in deltas)
    deltas += stream.finish()
    streamed = "".join(d.get("content", "") for d in deltas)
    got = [c["function"] for d in deltas for c in d.get("tool_calls", [])]
    assert [c["function"] for c in calls or []] == got
    if calls:
        assert streamed.strip() == (content or "").strip()
    else:
        assert streamed == reply
    if reply.startswith(("Sure", "Let me")) and step == 1:
        assert early, "prose before any call went out before the reply was complete"


def test_a_forced_call_streams_its_arguments() -> None:
    fns = toolcalls.chosen([RUN_TESTS], "required")[0]
    reply = '{"name": "run_tests", "arguments": {"path": "src/a b", "verbose": true}}'
    stream = toolcalls.CallStream(fns, forced=True)
    deltas = [d for ch in reply for d in stream.feed(ch)]
    deltas += stream.finish()
    calls = [c for d in deltas for c in d["tool_calls"]]
    assert calls[0]["function"] == {"name": "run_tests", "arguments": ""}
    args = "".join(c["function"]["arguments"] for c in calls[1:])
    assert json.loads(args) == {"path": "src/a b", "verbose": True}
    assert len(calls) > 3 and stream.calls is not None
    assert json.loads(stream.calls[0]["function"]["arguments"]) == json.loads(args)


def test_completions_endpoint(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="default", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert r.choices[0].text and 0 < r.usage.completion_tokens <= 5
    tokens = client.completions.create(model="default", prompt=[1, 504, 3458], max_tokens=3)
    assert tokens.usage.prompt_tokens == 3 and tokens.usage.completion_tokens <= 3
    streamed = list(
        client.completions.create(
            model="default",
            prompt="The capital of France is",
            max_tokens=5,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_models_stats_and_metrics(server: str) -> None:
    models = httpx.get(f"{server}/v1/models").json()
    assert models["data"][0]["id"].startswith("SmolLM2")
    assert models["data"][0]["max_model_len"] == KV_TOKENS
    stats = httpx.get(f"{server}/v1/kv_cache_stats").json()
    assert stats["kv_tokens"] == KV_TOKENS and stats["policy"] == "fcfs" and "kv_usage" in stats
    metrics = httpx.get(f"{server}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE vllm:generation_tokens_total counter" in metrics.text
    assert "# TYPE vllm:kv_cache_usage_perc gauge" in metrics.text
    assert "\nvllm:num_requests_running{" in metrics.text


def test_vllm_extensions(server: str) -> None:
    r = chat(server, messages=ask("Hi"), max_tokens=6, vllm_xargs={"ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 6
    r = chat(server, messages=ask("Hi"), max_tokens=5, min_tokens=5, temperature=0).json()
    assert r["usage"]["completion_tokens"] == 5
    r = chat(server, messages=ask("Count: 1, 2, 3,"), max_tokens=30, stop=[","], temperature=0)
    assert "," not in r.json()["choices"][0]["message"]["content"]


# ---- sessions ---------------------------------------------------------------------------------
def test_concurrent_sessions(client: openai.OpenAI) -> None:
    results: dict[int, str] = {}

    def one(i: int) -> None:
        r = client.chat.completions.create(
            model="default",
            messages=ask(f"Say {i}."),
            max_tokens=8,
            temperature=0,
            user=f"conc-{i}",
        )
        results[i] = r.choices[0].finish_reason

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3]
    assert set(results.values()) <= {"stop", "length"}


def test_warm_resume_after_a_tool_phase(client: openai.OpenAI) -> None:
    history = ask("List three files in a Python project. " + "Be brief. " * 60)
    first = client.chat.completions.create(
        model="default",
        messages=history,
        max_tokens=10,
        temperature=0,
        extra_headers={"X-Session-ID": "w1"},
    )
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "ls output: setup.py src tests"},
    ]
    second = client.chat.completions.create(
        model="default",
        messages=history,
        max_tokens=5,
        temperature=0,
        extra_headers={"X-Session-ID": "w1"},
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 3, (cached, first.usage.prompt_tokens)
    assert cached < second.usage.prompt_tokens
    # The same conversation in a new session is another session, which finds w1's KV for the
    # same tokens (shared across sessions): all but the last prompt token, computed to sample.
    other = client.chat.completions.create(
        model="default",
        messages=history,
        max_tokens=5,
        temperature=0,
        extra_headers={"x-litellm-session-id": "w2"},
    )
    assert other.session_id == "w2"  # type: ignore[attr-defined]
    assert other.usage.prompt_tokens_details.cached_tokens == other.usage.prompt_tokens - 1


def test_agents_without_ids_resume_by_fingerprint(server: str) -> None:
    history = ask("Explain a stack trace. " + "Short answer. " * 40)
    history.insert(0, {"role": "system", "content": "You are agent 7."})
    first = chat(server, messages=history, max_tokens=4, temperature=0).json()
    history += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "tool output: ok"},
    ]
    second = chat(server, messages=history, max_tokens=2, temperature=0).json()
    assert second["session_id"] == first["session_id"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def _turns(base: str, sid: str, **extra: Any) -> tuple[int, int]:
    """Two turns of one session; (cached tokens of the second, prompt tokens of the first).
    Its system message names it, so other sessions share only the template's first tokens."""
    history = ask("Describe a unit test. " + "Keep it short. " * 40)
    history.insert(0, {"role": "system", "content": f"You are agent {sid}."})
    first = chat(base, messages=history, max_tokens=4, temperature=0, session_id=sid, **extra)
    history += [
        {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
        {"role": "user", "content": "exit code 0"},
    ]
    second = chat(base, messages=history, max_tokens=2, temperature=0, session_id=sid).json()
    return (
        second["usage"]["prompt_tokens_details"]["cached_tokens"],
        first.json()["usage"]["prompt_tokens"],
    )


def test_token_ids_returned_make_the_next_prompt_a_full_prefix_hit(server: str) -> None:
    body = {"prompt": list(range(500, 540)), "max_tokens": 6, "min_tokens": 6}
    body |= {"ignore_eos": True, "return_token_ids": True, "session_id": "ids"}
    first = httpx.post(f"{server}/v1/completions", json=body, timeout=120).json()
    ids = first["choices"][0]["token_ids"]
    assert len(ids) == 6
    body["prompt"] = body["prompt"] + ids + [7, 8, 9]
    second = httpx.post(f"{server}/v1/completions", json=body, timeout=120).json()
    # Everything but the last output token (never computed: it was sampled, not fed) is reused.
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 40 + 6 - 1
    streamed = []
    with httpx.stream(
        "POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0].get("token_ids", [])
    assert len(streamed) == 6


def test_is_last_step_ends_the_session(server: str) -> None:
    kept, prompt = _turns(server, "keeps")
    assert kept >= prompt - 3
    # Ended: its second turn finds only what every session's prompt opens with.
    assert _turns(server, "ends", is_last_step=True)[0] < 8
    assert _turns(server, "ends-x", vllm_xargs={"is_last_step": True})[0] < 8


def test_delete_session(server: str) -> None:
    chat(server, messages=ask("Hi"), max_tokens=2, session_id="gone")
    r = httpx.delete(f"{server}/v1/sessions/gone")
    assert r.status_code == 200 and r.json()["deleted"] is True


# ---- clients that go away ---------------------------------------------------------------------
LONG = {"messages": ask("Write a very long story."), "max_tokens": 2000, "ignore_eos": True}


def test_stream_disconnect_frees_the_request(server: str) -> None:
    before = httpx.get(f"{server}/v1/kv_cache_stats").json()["generated_tokens"]
    body = {**LONG, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == 2:
                break
    stats = wait_idle(server)
    assert (stats["running"], stats["waiting"]) == (0, 0)
    assert stats["generated_tokens"] - before < 2000


def test_plain_request_disconnect_frees_the_request(server: str) -> None:
    before = httpx.get(f"{server}/v1/kv_cache_stats").json()["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        chat(server, timeout=1.0, **LONG)
    stats = wait_idle(server)
    assert (stats["running"], stats["waiting"]) == (0, 0)
    assert stats["generated_tokens"] - before < 2000


def test_delete_while_streaming_ends_with_an_error_event(server: str) -> None:
    body = {**LONG, "stream": True, "session_id": "cut"}
    events = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    httpx.delete(f"{server}/v1/sessions/cut")
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "aborted"
    assert wait_idle(server)["running"] == 0


# ---- bad input --------------------------------------------------------------------------------
X = ask("x")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "gpt-4", "messages": X}, 404, "not served"),
        ({"messages": X, "n": 2}, 400, "n must be 1"),
        ({"messages": X, "max_tokens": -1}, 400, "max_tokens must be at least 1"),
        ({"messages": X, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ({"messages": X, "max_tokens": KV_TOKENS}, 400, f"maximum context length is {KV_TOKENS}"),
        ({"messages": ask("word " * 9000)}, 400, f"maximum context length is {KV_TOKENS} tokens"),
        ({"messages": []}, 422, "messages"),
        ({}, 422, "messages"),
        ({"messages": "hello"}, 422, "messages"),
        ({"messages": [1]}, 422, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": {"a": 1}}]}, 400, "content"),
        ({"messages": [{"role": "assistant", "tool_calls": "x"}]}, 400, "tool_calls"),
        ({"messages": X, "temperature": -1}, 400, "temperature"),
        ({"messages": X, "top_p": 0}, 400, "top_p"),
        ({"messages": X, "top_k": -2}, 400, "top_k"),
        ({"messages": X, "max_tokens": 3, "min_tokens": 4}, 400, "min_tokens"),
        ({"messages": X, "vllm_xargs": {"min_tokens": [1]}}, 400, "min_tokens"),
        ({"messages": X, "vllm_xargs": {"ignore_eos": "no"}}, 400, "ignore_eos"),
        ({"messages": X, "stop": [1]}, 422, "stop"),
        ({"messages": X, "stream": "often"}, 422, "stream"),
        ({"messages": X, "tools": [{"type": "function"}], "tool_choice": "required"}, 400, "tools"),
        (
            {"messages": X, "tools": [RUN_TESTS], "tool_choice": {"function": {"name": "nope"}}},
            400,
            "nope",
        ),
        ({"messages": X, "tools": [RUN_TESTS], "tool_choice": {"function": "f"}}, 400, "names"),
        ({"messages": X, "tools": [RUN_TESTS], "tool_choice": "sometimes"}, 400, "tool_choice"),
    ],
)
def test_bad_chat_requests(server: str, body: dict[str, Any], status: int, needle: str) -> None:
    for variant in [body] if "stream" in body else [body, {**body, "stream": True}]:
        r = chat(server, timeout=60, **variant)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert needle in err["message"], err
        assert set(err) == {"message", "type", "param", "code"} and err["type"]


def test_forced_call_schemas_too_big_for_a_grammar(server: str) -> None:
    # maxLength 30000 nests the grammar 30000 deep: llama.cpp's parser would overflow its stack
    # and take the whole server down.
    tool = json.loads(json.dumps(RUN_TESTS))
    tool["function"]["parameters"]["properties"]["path"]["maxLength"] = 30000
    r = chat(server, messages=X, tools=[tool], tool_choice="required", max_tokens=4)
    assert r.status_code == 400 and "maxLength 30000" in r.json()["error"]["message"]
    pattern = {"type": "string", "pattern": "^a{999}{999}{999}$"}
    tool["function"]["parameters"]["properties"]["path"] = pattern
    r = chat(server, messages=X, tools=[tool], tool_choice="required", max_tokens=4)
    assert r.status_code == 400 and "pattern" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_bad_bodies(server: str) -> None:
    url = f"{server}/v1/chat/completions"
    json_type = {"content-type": "application/json"}
    for raw in (b"{not json", b"\xff\xfe", b'{"messages": [}'):
        r = httpx.post(url, content=raw, headers=json_type)
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"], r.text
    for raw in (b"", b"null", b"[]", b'"x"'):
        assert httpx.post(url, content=raw, headers=json_type).status_code == 422
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * (5 << 20) + b'"}]}'
    r = httpx.post(url, content=huge, headers=json_type)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunked() -> Iterator[bytes]:  # no content-length: the limit is counted as it arrives
        yield huge[: 1 << 20]
        yield huge[1 << 20 :]

    r = httpx.post(url, content=chunked(), headers=json_type)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.get(f"{server}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(url).status_code == 405
    completions = f"{server}/v1/completions"
    for body, status in (
        ({"prompt": [10**9]}, 400),
        ({"prompt": ""}, 400),
        ({"prompt": ["a", "b"]}, 400),
        ({"prompt": 5}, 422),
        ({"prompt": "hi", "model": "gpt-4"}, 404),
        ({"prompt": "hi", "max_tokens": 0}, 400),
    ):
        r = httpx.post(completions, json=body)
        assert r.status_code == status and r.json()["error"]["message"], (body, r.text)


def test_odd_but_valid_bodies_are_served(server: str) -> None:
    odd = [
        {"messages": [{"role": "user"}], "max_tokens": 1},
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 1,
        },
        {"messages": X, "nvext": {"session_control": "x"}, "max_tokens": 1},
        {"messages": X, "vllm_xargs": {"session_id": {"a": 1}}, "max_tokens": 1},
        {"messages": X, "top_k": 10**12, "temperature": 1, "seed": -5, "max_tokens": 1},
        {"messages": X, "stop": "", "logprobs": False, "presence_penalty": 1, "max_tokens": 1},
        {"messages": X, "tools": [RUN_TESTS], "tool_choice": "none", "max_tokens": 1},
        {
            "messages": [
                *X,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
            ],
            "max_tokens": 1,
        },
    ]
    for body in odd:
        r = chat(server, timeout=60, **body)
        assert r.status_code == 200, (body, r.text)


def test_api_key(keyed_server: str) -> None:
    assert httpx.get(f"{keyed_server}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path in ("/v1/models", "/metrics", "/v1/kv_cache_stats"):
            r = httpx.get(f"{keyed_server}{path}", headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = httpx.post(
            f"{keyed_server}/v1/chat/completions",
            headers=headers,
            json={"messages": ask("hi"), "max_tokens": 1},
        )
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=KEY, max_retries=0)
    r = good.chat.completions.create(model="default", messages=ask("hi"), max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def short_idle_server() -> Iterator[str]:
    yield from serve("--session-idle-timeout", "1")


def test_idle_sessions_end(short_idle_server: str) -> None:
    base = short_idle_server
    history = ask("Describe a unit test. " + "Keep it short. " * 40)
    body = {"messages": history, "max_tokens": 2, "temperature": 0, "session_id": "idle"}
    first = chat(base, **body).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    time.sleep(2.5)  # past the 1 s idle timeout: the session and its KV are gone
    again = chat(base, **body).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    quick = chat(base, **body).json()
    assert quick["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    # A request that runs longer than the idle timeout is activity, not idleness.
    start = time.monotonic()
    long = chat(base, **{**body, "max_tokens": 300, "ignore_eos": True})
    assert long.status_code == 200, long.text
    assert long.json()["choices"][0]["finish_reason"] == "length"
    assert time.monotonic() - start > 1.5, "too fast to prove anything: raise max_tokens"


# ---- pieces, without a server -----------------------------------------------------------------
def _body(**fields: Any) -> ChatRequest:
    return ChatRequest(messages=X, **fields)


def test_session_identity_order() -> None:
    opening = chat_opening(X)
    assert session_of(_body(session_id="a", user="b"), {}, opening) == "a"
    assert session_of(_body(prompt_cache_key="k", user="u"), {}, opening) == "k"
    nv = {"session_control": {"session_id": "dyn"}}
    assert session_of(_body(nvext=nv), {}, opening) == "dyn"
    assert session_of(_body(), {"x-litellm-session-id": "lite"}, opening) == "lite"
    for header in ("x-session-id", "x-dynamo-session-id", "x-claude-code-session-id"):
        assert session_of(_body(), {header: "h"}, opening) == "h"
    # Different identifiers are joined, never one picked: an OpenHands `LLM` shared by two
    # conversations sends one body session_id and each conversation's own header.
    shared = _body(session_id="app")
    c1 = session_of(shared, {"x-litellm-session-id": "c1"}, opening)
    c2 = session_of(shared, {"x-litellm-session-id": "c2"}, opening)
    assert c1 == "app~c1" and c2 == "app~c2"
    assert session_of(_body(vllm_xargs={"session_id": "v"}), {"x-session-id": "h"}, opening) == (
        "v~h"
    )
    same = _body(session_id="s", prompt_cache_key="s")  # the same value twice counts once
    assert session_of(same, {"x-session-id": "s"}, opening) == "s"
    # `user` names a person: two of their conversations are two sessions, two people's are too.
    alice = session_of(_body(user="alice"), {}, opening)
    assert alice.startswith("fp-") and alice != session_of(_body(user="bob"), {}, opening)
    # Without an id, the opening (system prompt and first user message) is the identity: later
    # turns of the same conversation keep it, another task gets another one.
    turn1 = [{"role": "system", "content": "agent"}, *ask("task A")]
    turn2 = [*turn1, {"role": "assistant", "content": "ok"}, *ask("more")]
    other = [{"role": "system", "content": "agent"}, *ask("task B")]
    fp = session_of(_body(), {}, chat_opening(turn1))
    assert fp.startswith("fp-") and fp == session_of(_body(), {}, chat_opening(turn2))
    assert fp != session_of(_body(), {}, chat_opening(other))


def test_is_last_step_markers() -> None:
    assert is_last_step(_body(is_last_step=True), {})
    assert is_last_step(_body(), {"x-dynamo-session-final": "true"})
    assert is_last_step(_body(nvext={"session_control": {"action": "close"}}), {})
    assert not is_last_step(_body(nvext={"session_control": {"action": "open"}}), {})
    assert is_last_step(_body(vllm_xargs={"is_last_step": "true"}), {})
    assert not is_last_step(_body(vllm_xargs={"is_last_step": "false"}), {})
    assert is_last_step(_body(), {"x-mars-is-last-step": "1"})
    assert not is_last_step(_body(), {})


def test_parse_tool_calls() -> None:
    fns = toolcalls.chosen([RUN_TESTS], "auto")[0]
    call = '{"name": "run_tests", "arguments": {"path": "src", "verbose": false}}'
    for text in (call, f"```json\n{call}\n```", f"<tool_call>{call}</tool_call>"):
        content, calls = toolcalls.parse(text, fns)
        assert content is None and calls and calls[0]["function"]["name"] == "run_tests"
        assert json.loads(calls[0]["function"]["arguments"]) == {"path": "src", "verbose": False}
    content, calls = toolcalls.parse(f"Sure, running them. {call}", fns)
    assert content == "Sure, running them." and calls
    for text in ("Just text.", '{"name": "rm_rf", "arguments": {}}', '{"name": ["x"]}', "{"):
        assert toolcalls.parse(text, fns) == (text, None)


def test_tools_reach_templates_with_tool_syntax() -> None:
    from jinja2 import Template

    tpl = (
        "{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.name }}{{ c.function.arguments }}]"
        "{% endfor %}\n{% endfor %}"
    )
    native = SimpleNamespace(
        chat_template=tpl,
        render_chat=lambda msgs, tools: Template(tpl).render(messages=msgs, tools=tools),
    )
    messages = [
        *ask("run them"),
        {
            "role": "assistant",
            "tool_calls": [{"id": "c", "function": {"name": "run_tests", "arguments": '{"a": 1}'}}],
        },
        {"role": "tool", "tool_call_id": "c", "content": "3 passed"},
    ]
    fns = toolcalls.chosen([RUN_TESTS], "auto")[0]
    text, _ = toolcalls.render(native, messages, fns)
    assert text.startswith("TOOLS:run_tests\n") and "[run_tests{'a': 1}]" in text
    assert "tool:3 passed" in text
    seen: list[Any] = []
    plain = SimpleNamespace(
        chat_template="{{ messages }}", render_chat=lambda *args: seen.extend(args) or ""
    )
    toolcalls.render(plain, messages, fns)
    msgs, tools = seen
    assert tools is None and "run_tests" in msgs[0]["content"] and msgs[0]["role"] == "system"
    assert msgs[-1] == {"role": "user", "content": "Result of the tool: 3 passed"}


def test_grammar_refuses_bounds_llama_cpp_cannot_take() -> None:
    fns = toolcalls.chosen([json.loads(json.dumps(RUN_TESTS))], "required")[0]  # a copy
    assert "root" in toolcalls.grammar(fns)
    fns["run_tests"]["parameters"]["properties"]["path"]["maxLength"] = 10**6
    with pytest.raises(APIError, match="maxLength"):
        toolcalls.grammar(fns)


def test_a_forced_call_cut_short_is_still_a_call(client: openai.OpenAI) -> None:
    # As OpenAI returns it: the call with its arguments truncated, finish_reason "length"; an
    # agent then sees a malformed call to retry, not a final answer with no call.
    asked: dict[str, Any] = {
        "model": "default",
        "messages": ask("Run the tests in src/."),
        "tools": [RUN_TESTS],
        "tool_choice": "required",
        "max_tokens": 14,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**asked).choices[0]
    assert whole.finish_reason == "length" and whole.message.content is None
    (call,) = whole.message.tool_calls
    assert call.function.name == "run_tests" and call.id.startswith("call_")
    chunks = list(client.chat.completions.create(**asked, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "run_tests"
    streamed = "".join(d.function.arguments or "" for d in deltas)
    assert streamed == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "length"
