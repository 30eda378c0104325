"""`mars serve` end to end: the real server process, the real default model, the official
`openai` client, and every bad input answered with an OpenAI-style error (never a 500)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by ./scripts/setup.sh")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-key"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(*extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    port = _port()
    full_env = {**os.environ, **(env or {})}
    if "MARS_API_KEY" not in (env or {}):
        full_env.pop("MARS_API_KEY", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mars",
            "serve",
            "--port",
            str(port),
            "--kv-tokens",
            "4096",
            "--threads",
            "1",
            *extra,
        ],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(
                    f"mars serve exited: {proc.stdout.read() if proc.stdout else ''}"
                )
            try:
                if httpx.get(f"{base}/health", timeout=1).json()["status"] == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from _serve()


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[str]:
    yield from _serve(env={"MARS_API_KEY": KEY})


@pytest.fixture()
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_chat_plain(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="default", messages=ask("Name a colour."), max_tokens=12, temperature=0
    )
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5


def test_chat_streaming_matches_plain(client: openai.OpenAI) -> None:
    kwargs = dict(
        model="default", messages=ask("Count from one to five."), max_tokens=16, temperature=0
    )
    plain = client.chat.completions.create(**kwargs, user="stream-a")
    chunks = list(client.chat.completions.create(**kwargs, stream=True, user="stream-b"))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_forced_tool_call(client: openai.OpenAI) -> None:
    tools = [
        {
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
    ]
    r = client.chat.completions.create(
        model="default",
        messages=ask("Run the tests in src/."),
        tools=tools,
        max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "run_tests"}},
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "run_tests"
    args = json.loads(call.function.arguments)
    assert isinstance(args["path"], str) and isinstance(args["verbose"], bool)


def test_completions_endpoint(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="default", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert r.choices[0].text and r.usage.completion_tokens <= 5


def test_models_and_stats(server: str) -> None:
    models = httpx.get(f"{server}/v1/models").json()
    assert models["data"][0]["id"].startswith("SmolLM2")
    stats = httpx.get(f"{server}/v1/kv_cache_stats").json()
    assert stats["kv_tokens"] == 4096 and "kv_usage" in stats
    metrics = httpx.get(f"{server}/metrics").text
    assert "mars_kv_usage" in metrics and "mars_generated_tokens" in metrics


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
    assert cached >= first.usage.prompt_tokens - 2, (cached, first.usage.prompt_tokens)
    # The same conversation in a new session starts cold.
    other = client.chat.completions.create(
        model="default",
        messages=history,
        max_tokens=5,
        temperature=0,
        extra_headers={"X-Session-ID": "w2"},
    )
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_disconnect_frees_the_slot(server: str) -> None:
    body = {
        "messages": ask("Write a very long story."),
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got == 3:
                break
    for _ in range(100):
        stats = httpx.get(f"{server}/v1/kv_cache_stats").json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        time.sleep(0.1)
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["generated_tokens"] < 2000


def test_delete_session(server: str) -> None:
    httpx.post(
        f"{server}/v1/chat/completions",
        json={"messages": ask("Hi"), "max_tokens": 2, "session_id": "gone"},
        timeout=60,
    )
    r = httpx.delete(f"{server}/v1/sessions/gone")
    assert r.status_code == 200 and r.json()["deleted"] is True


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "not served"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n must be 1"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "context"),
        ({"messages": [{"role": "user", "content": "word " * 5000}]}, 400, "context"),
        ({"messages": []}, 422, "messages"),
        ({}, 422, "messages"),
        ({"messages": "hello"}, 422, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function"}],
                "tool_choice": "required",
            },
            400,
            "tools[0]",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
                "tools": [{"type": "function", "function": {"name": "yes"}}],
            },
            400,
            "nope",
        ),
    ],
)
def test_bad_chat_requests(server: str, body: dict, status: int, needle: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_bad_bodies(server: str) -> None:
    r = httpx.post(
        f"{server}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * (5 << 20) + b'"}]}'
    r = httpx.post(
        f"{server}/v1/chat/completions", content=huge, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.get(f"{server}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(f"{server}/v1/completions", json={"prompt": [10**9]})
    assert r.status_code == 400


def test_api_key(keyed_server: str) -> None:
    assert httpx.get(f"{keyed_server}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{keyed_server}/v1/models", headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = httpx.post(
            f"{keyed_server}/v1/chat/completions",
            headers=headers,
            json={"messages": ask("hi"), "max_tokens": 1},
        )
        assert r.status_code == 401
    good = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=KEY)
    r = good.chat.completions.create(model="default", messages=ask("hi"), max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def _turns(base: str, sid: str, **extra: object) -> tuple[int, int]:
    """Two turns of one session; (cached tokens of the second, prompt tokens of the first)."""
    history = ask("Describe a unit test. " + "Keep it short. " * 40)
    first = httpx.post(
        f"{base}/v1/chat/completions",
        timeout=120,
        json={"messages": history, "max_tokens": 4, "temperature": 0, "session_id": sid, **extra},
    )
    history += [
        {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
        {"role": "user", "content": "exit code 0"},
    ]
    second = httpx.post(
        f"{base}/v1/chat/completions",
        timeout=120,
        json={"messages": history, "max_tokens": 2, "temperature": 0, "session_id": sid},
    )
    return (
        second.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        first.json()["usage"]["prompt_tokens"],
    )


def test_is_last_step_ends_the_session(server: str) -> None:
    kept, prompt = _turns(server, "keeps")
    assert kept >= prompt - 2
    ended, _ = _turns(server, "ends", is_last_step=True)
    assert ended == 0


@pytest.fixture(scope="module")
def short_idle_server() -> Iterator[str]:
    yield from _serve("--session-idle-timeout", "1")


def test_idle_sessions_end(short_idle_server: str) -> None:
    base = short_idle_server
    history = ask("Describe a unit test. " + "Keep it short. " * 40)
    body = {"messages": history, "max_tokens": 2, "temperature": 0, "session_id": "idle"}
    first = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    time.sleep(2.5)  # past the 1 s idle timeout: the session and its KV are gone
    again = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    quick = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()
    assert quick["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
