"""Prefixes shared across sessions in the embedded engine: a second session with the same system
prompt finds it cached (llama.cpp cells tagged with both sequences), answers exactly as it would
from a cold cache, and the shared KV goes when the last session holding it ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not importable: run ./scripts/setup.sh --dev",
    exc_type=ImportError,
)
httpx = pytest.importorskip("httpx", reason="httpx is a dev dependency: pip install -e .[dev]")
openai = pytest.importorskip("openai", reason="openai is a dev dependency: pip install -e .[dev]")

from serving import serve  # noqa: E402

SYSTEM = (
    "You are a careful software engineer working in a repository. Run one shell command per "
    "turn, read its output, and finish when the tests pass. " * 12
)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from serve("--no-tools")


def _complete(base: str, sid: str, prompt: list[int]) -> tuple[list[int], int]:
    body = {"prompt": prompt, "max_tokens": 12, "min_tokens": 12, "ignore_eos": True}
    body |= {"session_id": sid, "return_token_ids": True, "temperature": 0}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    return out["choices"][0]["token_ids"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_second_session_finds_the_system_prompt_cached(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    cached, prompts = [], []
    for i, task in enumerate(["fix the failing test in utils.py", "add a docstring to main()"]):
        reply = client.chat.completions.create(
            model="mars",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}],
            max_tokens=4,
            user=f"agent-{i}",  # two conversations: two sessions
        )
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        cached.append(reply.usage.prompt_tokens_details.cached_tokens or 0)
        prompts.append(reply.usage.prompt_tokens)
    count = httpx.post(
        f"{server}/v1/completions", json={"prompt": SYSTEM, "max_tokens": 1}, timeout=300
    )
    system_tokens = count.json()["usage"]["prompt_tokens"]
    assert cached[0] == 0
    assert cached[1] >= 0.9 * system_tokens, (cached, system_tokens, prompts)


def test_a_shared_prefix_serves_exactly_what_a_cold_cache_computes(server: str) -> None:
    shared = [3000 + i for i in range(300)]
    _complete(server, "first", [*shared, 11, 12, 13])
    warm, warm_cached = _complete(server, "second", [*shared, 21, 22, 23, 24])
    assert warm_cached >= 300
    for sid in ("first", "second"):
        assert httpx.delete(f"{server}/v1/sessions/{sid}", timeout=60).status_code in (200, 204)
    cold, cold_cached = _complete(server, "third", [*shared, 21, 22, 23, 24])
    assert cold_cached == 0, "the shared KV went with the last session that held it"
    assert warm == cold
