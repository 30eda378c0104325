"""A real OpenHands agent on one seeded task against `mars serve` (a `TaskRunner` of
`mars.agents.fleet`), in a subprocess of the OpenHands venv.

The OpenHands SDK needs Python 3.12 and pins its own LiteLLM, so it lives in a venv of its own
(`scripts/setup_openhands.sh`, `$MARS_OPENHANDS_VENV`, default `./.venv-openhands`): each task
starts `mars/agents/openhands_agent.py` with that venv's Python, in a local workspace holding a
copy of the task's repo. Its terminal and file-editor tools run there as local processes (the SDK
does not use mars's tools API); the session is the SDK's conversation id, which it never ends.
A task's time is the conversation's `run()`, start to end (the SDK's import and the check after
are not counted); the check command runs in the workspace after the agent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from mars.agents.fleet import AgentSettings, TaskOutcome
from mars.agents.tasks import Task
from mars.core.errors import UsageError

AGENT_SCRIPT = Path(__file__).with_name("openhands_agent.py")
SETUP = "./scripts/setup_openhands.sh"
_KILL_GRACE_S = 60.0  # past the task's time limit: the SDK's import and its last call ending


def openhands_python() -> Path:
    """The OpenHands venv's Python, or a UsageError that says how to make it."""
    venv = Path(os.environ.get("MARS_OPENHANDS_VENV", ".venv-openhands"))
    python = venv / "bin" / "python"
    if not python.is_file():
        raise UsageError(
            f"--agents openhands needs the OpenHands SDK's venv at {venv} (Python 3.12): run "
            f"{SETUP}, or set MARS_OPENHANDS_VENV to where it is"
        )
    check = subprocess.run(
        [str(python), "-c", "import openhands.sdk, openhands.tools"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"{python} cannot import the OpenHands SDK ({last}): run {SETUP}")
    return python


class OpenHandsRunner:
    """Runs each task in `.venv-openhands`; `model` is a name the server serves. Each agent's
    own output (the SDK's log) goes to `log_dir/<task id>.log`."""

    def __init__(self, model: str, log_dir: Path, python: Path | None = None) -> None:
        self.model = model
        self.log_dir = log_dir
        self.python = python or openhands_python()

    def __call__(
        self, base_url: str, task: Task, settings: AgentSettings, t0: float, api_key: str | None
    ) -> TaskOutcome:
        if task.repo is None:
            raise ValueError(f"task {task.task_id} has no repo on disk: write_tasks or load_tasks")
        outcome = TaskOutcome(task.task_id, session_id="")
        with tempfile.TemporaryDirectory(prefix=f"openhands-{task.task_id}-") as tmp:
            workspace = Path(tmp) / "workspace"
            shutil.copytree(task.repo, workspace)
            spec = {
                "base_url": f"{base_url}/v1",
                "api_key": api_key,
                "model": f"openai/{self.model}",
                "workspace": str(workspace),
                "statement": task.statement,
                "max_iterations": settings.step_limit,
                "max_tokens": settings.max_tokens,
                "temperature": settings.temperature,
                "seed": settings.task_seed(task.task_id),
                "timeout_s": settings.time_limit_s,
            }
            started = time.monotonic()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = self.log_dir / f"{task.task_id}.log"
            result = self._spawn(spec, log, settings.time_limit_s)
            if "start" not in result:  # it never got to run: time the subprocess
                result |= {"start": started, "end": time.monotonic()}
            _fill(outcome, result, t0)
            check = subprocess.run(
                ["sh", "-c", task.check], cwd=workspace, capture_output=True, timeout=60
            )
            outcome.solved = check.returncode == 0
        return outcome

    def _spawn(self, spec: Mapping[str, object], log: Path, limit_s: float) -> dict[str, object]:
        env = os.environ | {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"}
        with log.open("w") as err:
            proc = subprocess.Popen(
                [str(self.python), "-P", str(AGENT_SCRIPT)],  # -P: not its folder on sys.path
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
            try:
                out, _ = proc.communicate(json.dumps(spec), timeout=limit_s + _KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return {"status": "TimeExceeded", "error": f"killed after {limit_s:.0f} s"}
        lines = out.strip().splitlines()
        try:
            result: dict[str, object] = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            error = f"exit {proc.returncode} (see {log}): {tail}"
            return {"status": "AgentCrashed", "error": error[:400]}
        return result


def _fill(outcome: TaskOutcome, result: dict[str, object], t0: float) -> None:
    def num(key: str) -> float:
        value = result.get(key, 0)
        return float(value) if isinstance(value, int | float) else 0.0

    outcome.session_id = str(result.get("conversation_id", ""))
    outcome.start_s, outcome.end_s = num("start") - t0, num("end") - t0
    outcome.exit_status = str(result.get("status", ""))
    outcome.llm_calls = int(num("llm_calls"))
    outcome.steps = int(num("steps"))
    outcome.llm_s = num("llm_s")
    outcome.tool_runs = int(num("tool_runs"))
    outcome.tool_s = outcome.tool_run_s = num("tool_s")  # local processes: no tool queue
    outcome.submitted = outcome.exit_status == "finished"
    error = result.get("error")
    outcome.error = str(error) if error else None
    commands = result.get("commands")
    outcome.commands = [str(c) for c in commands] if isinstance(commands, list) else []
