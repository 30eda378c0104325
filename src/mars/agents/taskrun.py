"""A real mini-swe-agent run on one seeded task against `mars serve` (a `TaskRunner` of
`mars.agents.fleet`).

Each task gets a fresh session: its workspace is seeded with the task's repo, mini-swe-agent's
`DefaultAgent` with the bundled `mini` config runs it (every turn to mars with the session id,
every command through the tools API as a real process in the workspace), the task's check
command says whether it was solved, and the session is ended.

A task's time is its agent's wall time, from `run()` to its end (the admission queue, every
model call and every tool run included; the seeding before and the check after are not).
"""

from __future__ import annotations

import os
import time
from typing import Any

from mars.agents.fleet import AgentSettings, TaskOutcome
from mars.agents.miniswe import (
    DefaultAgent,
    MarsEnvironment,
    MarsModel,
    MarsTarget,
    bundled_config,
    new_session_id,
)
from mars.agents.tasks import Task

# mini-swe-agent retries a failed model call up to 10 times, waiting 4-60 s between: a run that
# must end within its time limit gives up after a second failure.
os.environ.setdefault("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "2")


class _CountingEnvironment(MarsEnvironment):
    """MarsEnvironment that counts its runs (the submitting one too, which leaves no tool
    message behind)."""

    runs = 0

    def execute(
        self, action: dict[str, Any], cwd: str = "", *, timeout: int | None = None
    ) -> dict[str, Any]:
        self.runs += 1
        return super().execute(action, cwd, timeout=timeout)


class _TimedAgent(DefaultAgent):
    """DefaultAgent that times its model calls and its tool runs."""

    llm_s = 0.0
    tool_s = 0.0

    def query(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            message: dict[str, Any] = super().query()
            return message
        finally:
            self.llm_s += time.monotonic() - started

    def execute_actions(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        started = time.monotonic()
        try:
            added: list[dict[str, Any]] = super().execute_actions(message)
            return added
        finally:
            self.tool_s += time.monotonic() - started


def run_task(
    base_url: str, task: Task, settings: AgentSettings, t0: float, api_key: str | None = None
) -> TaskOutcome:
    """One agent on one task in a fresh session; never raises for the agent's own failures."""
    target = MarsTarget(base_url=base_url, session_id=new_session_id("task"), api_key=api_key)
    outcome = TaskOutcome(task.task_id, target.session_id)
    config = bundled_config("mini")
    model_config = config["model"]
    model_config["model_kwargs"] = model_config.get("model_kwargs", {}) | {
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "seed": settings.task_seed(task.task_id),
        "timeout": settings.time_limit_s,  # LiteLLM's request timeout
    }
    env = _CountingEnvironment(
        target, **config["environment"] | {"timeout": settings.command_timeout_s}
    )
    agent = _TimedAgent(
        MarsModel(target, **model_config),
        env,
        **config["agent"]
        | {"step_limit": settings.step_limit, "wall_time_limit_seconds": settings.time_limit_s},
    )
    if task.repo is None:
        raise ValueError(f"task {task.task_id} has no repo on disk: write_tasks or load_tasks it")
    try:
        env.seed(task.repo)
        outcome.start_s = time.monotonic() - t0
        try:
            result = agent.run(task.statement)
            outcome.exit_status = str(result.get("exit_status", ""))
        except Exception as e:  # the model call failed past its retries, or the server went
            outcome.exit_status = type(e).__name__
            outcome.error = f"{type(e).__name__}: {e}"[:300]
        outcome.end_s = time.monotonic() - t0
        _count(outcome, agent, env)
        check = env.execute({"command": task.check})
        outcome.solved = check["returncode"] == 0
    finally:
        env.end_session()
    return outcome


def _count(outcome: TaskOutcome, agent: _TimedAgent, env: _CountingEnvironment) -> None:
    outcome.llm_calls = agent.n_calls
    actions = [
        m["extra"]["actions"]
        for m in agent.messages
        if m.get("role") == "assistant" and m.get("extra", {}).get("actions")
    ]
    outcome.steps = len(actions)
    outcome.commands = [str(a.get("command", ""))[:200] for step in actions for a in step]
    outcome.llm_s = agent.llm_s
    outcome.tool_s = agent.tool_s
    ran = [m["extra"] for m in agent.messages if m.get("role") == "tool" and "extra" in m]
    outcome.tool_runs = env.runs
    outcome.tool_run_s = sum(float(x.get("run_s", 0.0)) for x in ran)
    outcome.tool_queue_wait_s = sum(float(x.get("queue_wait_s", 0.0)) for x in ran)
    outcome.submitted = outcome.exit_status == "Submitted"
