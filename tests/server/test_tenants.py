"""Tenants against a real `mars serve` with several API keys: each key sees and acts on only the
sessions it created (another key gets 404), an admin key on all of them, and bad keys are
refused at start with what to fix."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not importable: run ./scripts/setup.sh --dev",
    exc_type=ImportError,
)
httpx = pytest.importorskip("httpx", reason="httpx is a dev dependency: pip install -e .[dev]")

from mars.core.errors import UsageError  # noqa: E402
from mars.server.owners import Owners  # noqa: E402
from mars.server.protocol import APIError  # noqa: E402
from mars.server.tenants import Tenant, load_keys, tenant_name  # noqa: E402
from serving import ROOT, free_port, serve  # noqa: E402

A, B, ADMIN = "key-a", "key-b", "key-root"
GO = [{"role": "user", "content": "go"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# the test's tenants\n{A}\n\n{ADMIN}  admin\n")
    # --unsafe-tools: the tools API on any host (ownership is the server's, not the sandbox's).
    args = ("--api-keys-file", str(keys), "--api-key", B, "--unsafe-tools", "--tool-workers", "2")
    yield from serve("--threads", "1", *args)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(base: str, key: str, sid: str | None = None, **extra: Any) -> httpx.Response:
    body = {"messages": GO, "max_tokens": 2, "temperature": 0, **extra}
    if sid is not None:
        body["session_id"] = sid
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=auth(key), timeout=120)


def tool(base: str, key: str, sid: str, command: str) -> httpx.Response:
    url = f"{base}/v1/sessions/{sid}/tools"
    return httpx.post(url, json={"command": command}, headers=auth(key), timeout=60)


def not_found(r: httpx.Response) -> bool:
    return r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


def test_another_tenants_session_is_a_404_everywhere(server: str) -> None:
    made = chat(server, A, "a-own")
    assert made.status_code == 200 and made.headers["x-session-id"] == "a-own", made.text
    assert tool(server, A, "a-own", "echo secret > notes.txt").status_code == 200

    b = auth(B)
    assert not_found(tool(server, B, "a-own", "cat notes.txt"))
    seed = {"seed": "/tmp"}
    assert not_found(httpx.post(f"{server}/v1/sessions/a-own/workspace", json=seed, headers=b))
    assert not_found(httpx.delete(f"{server}/v1/sessions/a-own/workspace", headers=b))
    assert not_found(httpx.delete(f"{server}/v1/sessions/a-own", headers=b))
    assert not_found(httpx.get(f"{server}/v1/events?session_id=a-own", headers=b))
    assert not_found(chat(server, B, "a-own"))
    header = httpx.post(
        f"{server}/v1/completions",
        json={"prompt": "hi", "max_tokens": 1},
        headers={**b, "X-Session-ID": "a-own"},
        timeout=120,
    )
    assert not_found(header)

    # Nothing B tried reached the session: the file is there for its owner, and for the admin.
    assert tool(server, A, "a-own", "cat notes.txt").json()["stdout"] == "secret\n"
    assert tool(server, ADMIN, "a-own", "cat notes.txt").json()["stdout"] == "secret\n"
    url = f"{server}/v1/events?session_id=a-own"
    with httpx.stream("GET", url, headers=auth(ADMIN), timeout=30) as r:
        assert r.status_code == 200
    assert chat(server, A, "a-own").status_code == 200  # the admin's calls left it A's
    assert httpx.delete(f"{server}/v1/sessions/a-own", headers=auth(A)).status_code == 200


def sessions_until(stream: httpx.Response, last: str) -> set[str]:
    """The session ids of a `/v1/events` stream's events, up to the end of `last`'s call."""
    seen = set()
    for line in stream.iter_lines():
        if not line.startswith("data: "):
            continue  # keep-alive comments
        record = json.loads(line.removeprefix("data: "))
        if record.get("session_id"):
            seen.add(record["session_id"])
        if record.get("session_id") == last and record["event"] == "gpu_end":
            return seen
    raise AssertionError(f"the stream ended before {last}'s call did: {seen}")


def test_events_show_a_tenant_only_its_own_sessions(server: str) -> None:
    url = f"{server}/v1/events"
    with (
        httpx.stream("GET", url, headers=auth(B), timeout=60) as b_events,
        httpx.stream("GET", url, headers=auth(ADMIN), timeout=60) as all_events,
    ):
        assert b_events.status_code == 200 and all_events.status_code == 200
        assert chat(server, A, "a-ev").status_code == 200
        assert tool(server, A, "a-ev", "true").status_code == 200
        assert chat(server, B, "b-ev").status_code == 200
        # Events arrive in the order the engine published them: A's came before B's call ended.
        seen_by_b = sessions_until(b_events, "b-ev")
        seen_by_admin = sessions_until(all_events, "b-ev")
    assert seen_by_b == {"b-ev"}, seen_by_b
    assert {"a-ev", "b-ev"} <= seen_by_admin, seen_by_admin


def test_two_tenants_opening_alike_are_two_sessions(server: str) -> None:
    """A request naming no session gets a fingerprint id: salted by the tenant, it never
    folds two tenants' conversations into one session."""
    a1, a2, b1 = (chat(server, k).headers["x-session-id"] for k in (A, A, B))
    assert a1 == a2 and a1.startswith("fp-") and b1.startswith("fp-") and a1 != b1


def test_no_tenant_is_served_another_tenants_kv(server: str) -> None:
    """Prefixes are shared across sessions within a tenant, never across: another tenant's
    `cached_tokens` would tell it what this one's prompts begin with."""
    secret = [{"role": "system", "content": "Deploy key rotation plan: " + "alpha " * 60}, *GO]

    def cached(key: str, sid: str, **extra: Any) -> int:
        r = chat(server, key, sid, messages=secret, **extra)
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert cached(A, "kv-a1") < 10  # only what every chat opens with, if anything
    assert cached(B, "kv-b1") < 10, "tenant B found tenant A's prompt cached"
    assert cached(A, "kv-a2") > 60  # within tenant A it is shared
    assert cached(A, "kv-a3", cache_salt="other") < 10  # and a cache_salt splits it further


def test_a_wrong_or_missing_key_is_a_401(server: str) -> None:
    assert httpx.get(f"{server}/health").status_code == 200
    for headers in ({}, auth("key-c"), auth("key-"), {"Authorization": A}):
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/events")):
            r = httpx.request(method, f"{server}{path}", headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(
            f"{server}/v1/sessions/a-any/tools", json={"command": "true"}, headers=headers
        )
        assert r.status_code == 401
    assert httpx.get(f"{server}/v1/models", headers=auth(B), timeout=30).status_code == 200


def test_a_keys_file_with_a_bad_line_is_refused_at_start(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# ops\nkey-ops\nkey-dev root\n")
    cmd = [sys.executable, "-m", "mars", "serve", "--port", str(free_port())]
    done = subprocess.run(
        [*cmd, "--api-keys-file", str(keys)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert f"--api-keys-file {keys}, line 3: expected 'KEY' or 'KEY admin'" in done.stderr
    assert "key-dev" not in done.stderr  # keys are never echoed


@pytest.mark.parametrize(
    ("file_text", "api_keys", "says"),
    [
        ("", [], "no keys in it"),
        ("# only a comment\n\n", [], "no keys in it"),
        (None, [], "cannot read it"),
        ("k1\nk1 admin\n", [], "line 2: the same key is given twice (also --api-keys-file"),
        ("k1\n", ["k1"], "line 1: the same key is given twice (also --api-key)"),
        ("k1\n", ["k2", ""], "--api-key: the key is empty"),
        ("clé\n", [], "line 1: a key must be printable ASCII without spaces"),
    ],
)
def test_bad_keys_say_what_to_fix(
    tmp_path: Path, file_text: str | None, api_keys: list[str], says: str
) -> None:
    path = tmp_path / "keys.txt"
    if file_text is not None:
        path.write_text(file_text)
    with pytest.raises(UsageError) as refused:
        load_keys(api_keys, (), path)
    assert says in str(refused.value)


def test_keys_resolve_to_tenants_that_never_show_the_key() -> None:
    keys = load_keys(["k1"], ["root"])
    assert keys is not None and len(keys) == 2 and keys.admins == 1
    one = keys.resolve(b"Bearer k1")
    assert one is not None and not one.admin and one.name == tenant_name("k1") != "k1"
    root = keys.resolve(b"Bearer root")
    assert root is not None and root.admin
    assert keys.resolve(b"Bearer k") is None and keys.resolve(b"k1") is None
    assert load_keys([], (), None) is None  # no keys: single-tenant


def test_owners_keep_each_tenant_to_its_sessions() -> None:
    a, b, root = Tenant("t-a"), Tenant("t-b"), Tenant("t-root", admin=True)
    now = [0.0]
    owners = Owners(linger_s=60.0, clock=lambda: now[0])
    owners.claim(a, "s")
    with pytest.raises(APIError) as refused:
        owners.claim(b, "s")
    assert refused.value.status == 404 and refused.value.code == "session_not_found"
    owners.claim(root, "s")  # an admin acts on it; it stays A's
    assert owners.sees(a, "s") and owners.sees(root, "s") and not owners.sees(b, "s")
    owners.check(b, "nobody's")  # a free session holds nothing of anyone's
    owners.claim(None, "s")  # no keys: single-tenant, nothing is checked
    owners.end("s")  # still A's while its last events come out
    with pytest.raises(APIError):
        owners.check(b, "s")
    now[0] = 61.0
    owners.end("t")  # later ends purge the ones past their linger
    owners.claim(b, "s")
    assert owners.sees(b, "s") and not owners.sees(a, "s")
