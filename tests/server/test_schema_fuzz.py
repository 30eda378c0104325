"""Schema fuzzing against a real `mars serve`: schemathesis reads the server's own OpenAPI schema
and sends seeded, derandomized requests, valid and invalid, to every route (the tools API too);
none may answer with a server error (5xx)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not importable: run ./scripts/setup.sh --dev",
    exc_type=ImportError,
)
httpx = pytest.importorskip("httpx", reason="httpx is a dev dependency: pip install -e .[dev]")
schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is a dev dependency: pip install -e .[dev]"
)

from schemathesis.checks import not_a_server_error  # noqa: E402

from mars.server.app import ServerConfig, create_app  # noqa: E402
from serving import serve  # noqa: E402

# Generation costs ~20 ms a token here, and no max_tokens means the whole context: lengths are
# capped, but one past any context (a cheap 400) is sent as generated.
CAP_TOKENS, PAST_ANY_CONTEXT = 16, 10**6
LENGTHS = ("max_tokens", "max_completion_tokens")

CONFIG = {
    "seed": 19,
    # max-examples bounds the fuzzing phase (valid and invalid cases drawn together); the
    # coverage phase adds a fixed set of boundary cases per operation (~770 cases in all).
    "generation": {"max-examples": 20, "deterministic": True, "database": "none"},
    "phases": {"examples": {"enabled": False}},  # the schema has none
    "request-timeout": 120,
    # An event stream never ends: schemathesis reads it this long, then judges its status.
    "operations": [{"include-path": "/v1/events", "request-timeout": 0.25}],
}

# The schema is the app's, built without a model: schemathesis makes its test items at collection,
# before any server runs. test_the_schema_is_the_servers checks the real server serves the same.
OPENAPI = create_app(lambda: None, ServerConfig()).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=schemathesis.Config.from_dict(CONFIG))
CASES: Counter[str] = Counter()  # cases sent, by operation


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from serve("--threads", "1", "--max-queued", "64")


def capped(body: Any) -> Any:
    """`body` with its generation lengths capped (here, not in a `map_body` hook: the coverage
    phase's cases skip hooks)."""
    if not isinstance(body, dict) or ("messages" not in body and "prompt" not in body):
        return body
    body = dict(body)
    for name in LENGTHS:
        value = body.get(name)
        if isinstance(value, int) and CAP_TOKENS < value < PAST_ANY_CONTEXT:
            body[name] = CAP_TOKENS
    if all(body.get(name) is None for name in LENGTHS):
        body["max_tokens"] = CAP_TOKENS
    return body


def test_the_schema_is_the_servers(server: str) -> None:
    assert httpx.get(f"{server}/openapi.json", timeout=10).json() == OPENAPI


@schema.parametrize()
def test_no_server_error(case: Any, server: str) -> None:
    CASES[case.operation.label] += 1
    case.body = capped(case.body)
    case.call_and_validate(base_url=server, checks=[not_a_server_error])


def test_every_operation_was_fuzzed() -> None:
    if not CASES:
        pytest.skip("test_no_server_error did not run in this session")
    labels = {f"{m.upper()} {p}" for p, ops in OPENAPI["paths"].items() for m in ops}
    assert set(CASES) == labels
    print(f"\nschemathesis: {sum(CASES.values())} cases", dict(sorted(CASES.items())))
