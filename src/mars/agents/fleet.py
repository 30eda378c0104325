"""N agents at a time on one server, each taking the next seeded task: the closed loop of
`mars bench --agents`, whatever the framework.

A framework is a `TaskRunner`: it runs one task in a fresh session and returns its
`TaskOutcome` (`mars.agents.taskrun` for mini-swe-agent, in this process;
`mars.agents.openhands_run` for the OpenHands SDK, in a subprocess of its own Python 3.12 venv).
N worker threads take the tasks in order (a task starts when a worker is free), so new
sessions' cold prefills meet older sessions' continuations, as in a fleet of agents. No agent
framework is imported here.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from mars.agents.tasks import Task


@dataclass(frozen=True)
class AgentSettings:
    """How each agent runs: the bundled config's templates, with these limits on top."""

    step_limit: int = 8  # model calls per task
    time_limit_s: int = 300  # no model call starts after this, and none may last longer
    max_tokens: int = 64  # per model reply
    temperature: float = 1.0  # with a per-task seed (below): varied yet reproducible commands
    command_timeout_s: int = 30  # per tool run
    seed: int = 0  # each task samples with a seed drawn from this and its id

    def task_seed(self, task_id: str) -> int:
        return zlib.crc32(f"{self.seed}/{task_id}".encode())


@dataclass
class TaskOutcome:
    """One task's run, times relative to the start of the whole run."""

    task_id: str
    session_id: str
    start_s: float = 0.0
    end_s: float = 0.0
    exit_status: str = ""  # mini-swe-agent's: Submitted, LimitsExceeded, TimeExceeded, ...
    llm_calls: int = 0  # model calls, format errors included
    steps: int = 0  # replies that carried a command
    llm_s: float = 0.0  # in model calls (admission queue and engine wait included)
    tool_runs: int = 0
    tool_s: float = 0.0  # tool runs as the agent saw them (HTTP and tool queue included)
    tool_run_s: float = 0.0  # the processes' own time, as the server measured it
    tool_queue_wait_s: float = 0.0
    submitted: bool = False
    solved: bool = False  # the task's check command exits 0 after the run
    error: str | None = None
    commands: list[str] = field(default_factory=list)  # what the model ran (first 200 chars)

    @property
    def task_s(self) -> float:
        return self.end_s - self.start_s

    def row(self) -> dict[str, Any]:
        return asdict(self) | {"task_s": self.task_s}


class TaskRunner(Protocol):
    def __call__(
        self, base_url: str, task: Task, settings: AgentSettings, t0: float, api_key: str | None
    ) -> TaskOutcome:
        """Run `task` in a fresh session; times relative to `t0` (time.monotonic())."""
        ...


@dataclass
class AgentFleet:
    """`agents` workers on one server, each taking the next task until none is left."""

    base_url: str
    agents: int
    run_task: TaskRunner
    settings: AgentSettings = field(default_factory=AgentSettings)
    api_key: str | None = None

    def run(
        self, tasks: Sequence[Task], on_done: Callable[[TaskOutcome], None] | None = None
    ) -> tuple[list[TaskOutcome], float]:
        """Every task's outcome (in task order) and the run's wall time."""
        t0 = time.monotonic()
        lock = threading.Lock()

        def one(task: Task) -> TaskOutcome:
            outcome = self.run_task(self.base_url, task, self.settings, t0, self.api_key)
            if on_done is not None:
                with lock:
                    on_done(outcome)
            return outcome

        pool = ThreadPoolExecutor(max_workers=self.agents, thread_name_prefix="agent")
        try:
            outcomes = list(pool.map(one, tasks))
        except BaseException:
            # Ctrl-C or a task that could not start: no new task starts, and the caller stops
            # the server, which ends the agents still running.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return outcomes, time.monotonic() - t0
