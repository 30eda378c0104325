"""`/dashboard` in a real headless Chromium against a real `mars serve` (and a gateway): the page
follows a short replay (one row per session, its gauges move), works with an API key typed into
it while the events stay refused without one, and on the gateway shows the gateway's sessions
and upstreams. `MARS_SCREENSHOT=1` also writes the replay's screenshot to docs/img/dashboard.png
(the README's); every run writes it to the test's tmp_path."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not importable: run ./scripts/setup.sh --dev",
    exc_type=ImportError,
)
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
import httpx  # noqa: E402

from serving import ROOT, serve  # noqa: E402

SESSIONS = 4
TOOL = "sleep 0.8; echo done"  # long enough for the 1 s gauge poll to see busy workers
KEY = "dashboard-test-key"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    # The full MARS policy: an admission window, and KV pinned or offloaded through tools.
    yield from serve("--policy", "mars", "--unsafe-tools", "--tool-workers", "2")


def page_of(browser: Any, url: str) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(url)
    return page


def data(page: Any) -> dict[str, str]:
    """The figures the page exposes on <body> (data-* attributes)."""
    return dict(page.evaluate("() => ({...document.body.dataset})"))


def wait_for(
    page: Any, check: Callable[[dict[str, str]], bool], what: str, limit_s: float = 20
) -> None:
    deadline = time.monotonic() + limit_s
    while not check(d := data(page)):
        assert time.monotonic() < deadline, f"the page never showed {what}: {d}"
        time.sleep(0.1)


def ended(page: Any, sessions: int) -> Callable[[dict[str, str]], bool]:
    """A check: the page shows `sessions` rows, each of a session that ended."""

    def check(d: dict[str, str]) -> bool:
        shown = rows(page).values()
        return d["sessions"] == str(sessions) and all(r["phase"] == "done" for r in shown)

    return check


def rows(page: Any) -> dict[str, dict[str, str]]:
    return dict(
        page.evaluate(
            """() => Object.fromEntries([...document.querySelectorAll('#rows li')]
                .map((li) => [li.dataset.session, {...li.dataset}]))"""
        )
    )


def chat(
    base: str, sid: str, turn: int, headers: dict[str, str] | None = None, **extra: Any
) -> None:
    messages = [{"role": "user", "content": f"step {i} of the task"} for i in range(turn + 1)]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, "session_id": sid, **extra}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text


def agent(base: str, sid: str, turns: int, pause: Callable[[str, str], None]) -> None:
    """A short agent session: `turns` calls, `pause` (a tool run) between each two."""
    for turn in range(turns):
        last = turn == turns - 1
        chat(base, sid, turn, is_last_step=last)
        if not last:
            pause(base, sid)


def run_tool(base: str, sid: str) -> None:
    r = httpx.post(f"{base}/v1/sessions/{sid}/tools", json={"command": TOOL}, timeout=60)
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text


def replay(base: str, sids: list[str], pause: Callable[[str, str], None]) -> list[threading.Thread]:
    threads = [threading.Thread(target=agent, args=(base, sid, 3, pause)) for sid in sids]
    for t in threads:
        t.start()
    return threads


def test_the_dashboard_follows_a_replay(browser: Any, server: str, tmp_path: Path) -> None:
    page = page_of(browser, f"{server}/dashboard")
    wait_for(page, lambda d: d["stream"] == "live" and d["kind"] == "server", "a live stream")
    assert page.locator(".worker").count() == 2  # --tool-workers 2
    before = data(page)
    sids = [f"dash-{i}" for i in range(SESSIONS)]
    threads = replay(server, sids, run_tool)
    busy = kv = 0.0
    shot = tmp_path / "dashboard.png"
    while any(t.is_alive() for t in threads):
        d = data(page)
        busy, kv = max(busy, float(d["busy"])), max(kv, float(d["kv"] or 0))
        if not shot.exists() and int(d["toolsDone"]) >= SESSIONS:  # halfway: every kind of phase
            page.select_option("#span", "0")  # the whole run across the page
            time.sleep(0.3)  # a redraw (4 a second)
            page.screenshot(path=str(shot))
        time.sleep(0.1)
    for t in threads:
        t.join()
    wait_for(page, lambda d: int(d["toolsDone"]) == 2 * SESSIONS, "every tool run")
    wait_for(page, ended(page, SESSIONS), "every session's end")
    d = data(page)
    shown = rows(page)
    assert sorted(shown) == sids  # one row per session, none other
    assert d["sessions"] == str(SESSIONS)
    assert int(d["calls"]) == 3 * SESSIONS
    assert all(r["calls"] == "3" and r["tools"] == "2" for r in shown.values())
    assert before["kv"] == "0" and kv > 0  # the KV gauge moved
    assert busy > 0  # the workers were seen busy
    assert int(d["polls"]) > int(before["polls"])
    if not shot.exists():
        page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("MARS_SCREENSHOT") == "1":
        docs = ROOT / "docs" / "img"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, docs / "dashboard.png")
    page.close()


def test_the_page_takes_a_key_and_the_events_need_it(browser: Any) -> None:
    for base in serve("--api-key", KEY):
        page = httpx.get(f"{base}/dashboard")  # the page itself needs no key: it has no data
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for path in ("/v1/events", "/v1/dashboard"):
            assert httpx.get(f"{base}{path}").status_code == 401
            wrong = {"Authorization": "Bearer not-the-key"}
            assert httpx.get(f"{base}{path}", headers=wrong).status_code == 401
        tab = page_of(browser, f"{base}/dashboard")
        wait_for(tab, lambda d: d["stream"] == "unauthorized", "that a key is needed")
        tab.fill("#key", "not-the-key")
        tab.click("#keyform button[type=submit]")
        wait_for(tab, lambda d: d["stream"] == "unauthorized", "a wrong key refused")
        tab.fill("#key", KEY)
        tab.click("#keyform button[type=submit]")
        wait_for(tab, lambda d: d["stream"] == "live" and d["polls"] != "0", "a live stream")
        chat(base, "keyed", 0, {"Authorization": f"Bearer {KEY}"}, is_last_step=True)
        wait_for(tab, lambda d: d["sessions"] == "1", "the session")
        assert list(rows(tab)) == ["keyed"]
        # The key stays in this tab's sessionStorage: never in the page, its URL or a cookie.
        assert tab.evaluate("() => sessionStorage.getItem('mars-dashboard-key')") == KEY
        assert KEY not in tab.content() and KEY not in tab.url
        assert tab.input_value("#key") == "" and not tab.context.cookies()
        tab.click("#forget")
        wait_for(tab, lambda d: d["stream"] == "unauthorized", "the key forgotten")
        tab.close()


def idle(seconds: float) -> Callable[[str, str], None]:
    """A tool phase the gateway infers: the agent runs its tool elsewhere."""
    return lambda base, sid: time.sleep(seconds)


def test_the_gateway_dashboard_shows_its_sessions_and_upstreams(
    browser: Any, tmp_path: Path
) -> None:
    for upstream in serve("--threads", "1"):
        for base in serve("--engine", "openai", "--upstream", upstream):
            page = page_of(browser, f"{base}/dashboard")
            wait_for(page, lambda d: d["stream"] == "live" and d["kind"] == "gateway", "live")
            assert page.locator("#up-rows tr").count() == 1
            assert upstream in page.locator("#up-rows").inner_text()
            assert page.locator("#card-tools").is_hidden()  # the gateway runs no tools
            threads = replay(base, ["gw-a", "gw-b"], idle(0.3))
            for t in threads:
                t.join()
            wait_for(page, ended(page, 2), "the sessions' ends")
            shown = rows(page)
            assert sorted(shown) == ["gw-a", "gw-b"]
            assert all(r["calls"] == "3" and r["tools"] == "2" for r in shown.values())
            page.select_option("#span", "0")
            time.sleep(0.3)
            page.screenshot(path=str(tmp_path / "gateway.png"))
            page.close()
