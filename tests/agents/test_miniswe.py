"""mini-swe-agent on a real `mars serve` through `mars.agents.miniswe`: its environment runs
commands with the tools API in the seeded session workspace (output, exit code, timeouts and the
submit marker as mini-swe-agent expects), and its default agent loop reaches mars with one session
id for every turn and every command."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "minisweagent",
    reason="mini-swe-agent is not installed: pip install -e '.[agents]' (scripts/setup.sh --dev)",
)

from mars.agents.miniswe import (
    DefaultAgent,
    MarsEnvironment,
    MarsModel,
    MarsTarget,
    Submitted,
    bundled_config,
    new_session_id,
)
from serving import ROOT, serve

REPO = ROOT / "examples" / "miniswe_task" / "repo"
# LiteLLM's TypedDicts, built by pydantic when the first call is made: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*`ReadOnly` qualifier:UserWarning")


@dataclass(frozen=True)
class Server:
    base: str
    sandboxed: bool  # bubblewrap, else `--unsafe-tools` (hosts without user namespaces)


@pytest.fixture(scope="module")
def events_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("miniswe") / "events.jsonl"


@pytest.fixture(scope="module")
def server(events_file: Path) -> Iterator[Server]:
    """A server with the tools API, sandboxed where bubblewrap can start a sandbox."""
    options = ("--tool-workers", "1", "--events", str(events_file), "--seed-root", str(REPO))
    for sandboxed in (shutil.which("bwrap") is not None, False):
        started = serve(*options, *([] if sandboxed else ["--unsafe-tools"]))
        try:
            base = next(started)
        except AssertionError as e:
            if not sandboxed or "--unsafe-tools" not in str(e):
                raise
            continue  # mars says the sandbox cannot start here and names the way out
        yield Server(base, sandboxed)
        started.close()
        return


def events_of(path: Path, session_id: str, until: str | None = None) -> Counter[str]:
    """The session's events by kind; with `until`, once one of that kind is in (the server
    publishes a session's end on its engine thread, after `DELETE` answered)."""
    deadline = time.monotonic() + 10
    while True:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        seen = Counter(r["event"] for r in records if r.get("session_id") == session_id)
        if until is None or seen[until] or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def seeded(server: Server) -> MarsEnvironment:
    env = MarsEnvironment(MarsTarget(base_url=server.base, session_id=new_session_id("test")))
    env.seed(REPO)
    return env


def test_environment_runs_commands_in_the_seeded_workspace(server: Server) -> None:
    env = seeded(server)
    ran = env.execute({"command": "pwd; ls; python3 -m unittest 2>&1 | tail -1"})
    assert ran["returncode"] == 0 and ran["exception_info"] == ""
    lines = ran["output"].splitlines()
    if server.sandboxed:
        assert lines[0] == "/work"  # the workspace's mount point in the sandbox
    assert {"calc.py", "test_calc.py"} <= set(lines)
    assert lines[-1] == "FAILED (failures=1)"  # the example's bug is there to fix
    assert ran["extra"]["run_s"] > 0  # mars's timings come along

    failed = env.execute({"command": "echo to-stderr >&2; exit 3"})
    assert (failed["returncode"], failed["output"]) == (3, "to-stderr\n")
    exported = MarsEnvironment(env.target, env={"GREETING": "hi there"}, cwd="/tmp")
    assert exported.execute({"command": "echo $GREETING; pwd"})["output"] == "hi there\n/tmp\n"
    env.end_session()


def test_a_timeout_is_reported_as_mini_swe_agent_reports_it(server: Server) -> None:
    env = seeded(server)
    out = env.execute({"command": "echo started; sleep 30"}, timeout=1)
    assert out["returncode"] == -1
    assert out["output"] == "started\n"
    assert "timed out after 1 seconds" in out["exception_info"]
    assert out["extra"]["exception_type"] == "TimeoutExpired"
    assert out["extra"]["timed_out"] is True
    env.end_session()


def test_the_submit_marker_ends_the_task(server: Server) -> None:
    env = seeded(server)
    with pytest.raises(Submitted) as raised:
        env.execute({"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT; echo my patch"})
    assert raised.value.messages[0]["extra"] == {
        "exit_status": "Submitted",
        "submission": "my patch\n",
    }
    env.end_session()


def test_agent_loop_reaches_mars_under_one_session(server: Server, events_file: Path) -> None:
    steps = 2
    config = bundled_config("mini")
    config["model"]["model_kwargs"] = config["model"].get("model_kwargs", {}) | {"max_tokens": 48}
    env = seeded(server)
    sid = env.target.session_id
    model = MarsModel(env.target, **config["model"])
    agent = DefaultAgent(
        model, MarsEnvironment(env.target), **config["agent"] | {"step_limit": steps}
    )
    result: dict[str, Any] = agent.run("Fix calc.py so that `python3 -m unittest` passes.")
    ran = [m for m in agent.messages if m["role"] == "tool"]
    after = env.execute({"command": "ls"})["output"].split()
    env.end_session()

    assert agent.n_calls == steps
    # A 135M model may also end the task early or format badly; mars saw each call either way.
    assert result["exit_status"] in ("LimitsExceeded", "Submitted", "RepeatedFormatError")
    assert all("run_s" in m["extra"] for m in ran)  # every action went through the tools API
    assert {"calc.py", "test_calc.py"} <= set(after)
    seen = events_of(events_file, sid, until="session_done")
    assert seen["request_emit"] == steps
    assert seen["tool_end"] == len(ran) + 1  # the agent's commands and the `ls` above
    assert seen["session_done"] == 1
