"""The trace-replay agent: every session of a workload as a real HTTP client of `mars serve`.

The workload is the simulator's (`mars.sim.workload.build_workload`: the same sample, seed, token
and time scales). Each session, for each turn, sends `/v1/completions` with a token-id prompt that
grows as the trace says (`mars.agents.prompts`), exactly `output_tokens` tokens decoded
(`max_tokens` = `min_tokens`, `ignore_eos`), its `session_id`, `is_last_step` on its last call
(and, with `tool_markers`, the next tool's category as `this_func_call`); then runs the turn's
tool steps one after another through the tools API as real work (`mars.agents.cpuwork`), or,
with `tools="client"`, waits their nominal time on the client.

A session arrives at its first send: at its Poisson arrival time (`rate`) or when a closed-loop
slot frees (`concurrency`), the arrival processes of `mars sim`. A request the admission queue
turns away is retried after `Retry-After`; a hard error ends the session as failed (counted, never
a hang); a session whose context the server cannot hold is rejected up front, as in the simulator.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mars.agents.client import ReplayError, ServerClient
from mars.agents.cpuwork import CpuCalibration, tool_command
from mars.agents.prompts import PromptBuilder
from mars.bench.metrics import SessionResult
from mars.sim.arrivals import arrival_times
from mars.sim.workload import SessionSpec, ToolSpec

ToolMode = Literal["api", "client"]


@dataclass(frozen=True)
class ReplayConfig:
    """How to replay a workload against one server."""

    base_url: str
    rate: float | None = None  # open loop: Poisson arrivals, sessions/s; or
    concurrency: int | None = None  # closed loop: sessions in flight
    seed: int = 0  # arrival times and prompt ids
    tools: ToolMode = "api"  # "api": tools API; "client": wait the nominal time here
    cpu: CpuCalibration | None = None  # required with tools="api"
    max_context: int | None = None  # the server's context: longer sessions are rejected
    api_key: str | None = None
    timeout_s: float = 900.0  # one HTTP request
    # Send each call's next tool category as `this_func_call`: how a server that does not run
    # the tools (a gateway, vLLM's plug-in) learns that a tool phase follows, and which one.
    tool_markers: bool = False
    retry_limit_s: float = 900.0  # how long a 429/503 request is retried

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
        if self.tools == "api" and self.cpu is None:
            raise ValueError('tools="api" needs a CpuCalibration (mars.agents.cpuwork.calibrate)')


@dataclass
class TurnRecord:
    prompt_tokens: int  # sent
    output_tokens: int  # the server's usage.completion_tokens
    cached_tokens: int  # the server's prefix hit
    trace_reuse_tokens: int  # what the trace says is reusable
    latency_s: float
    retries: int


@dataclass
class ToolRecord:
    category: str
    cpu_heavy: bool
    nominal_s: float  # the trace's (scaled) duration: what an idle core takes
    wall_s: float  # what the agent waited, retries included
    run_s: float  # on the worker (tools API), else wall_s
    queue_wait_s: float  # waiting for a tool worker
    exit_code: int | None


@dataclass
class SessionRecord:
    """What happened to one session; times in seconds since the replay started."""

    session_id: str
    arrival_s: float | None = None  # first send; None if it never sent
    done_s: float | None = None  # last tool finished; None if failed or rejected
    rejected: bool = False
    error: str | None = None  # why it failed
    turns: list[TurnRecord] = field(default_factory=list)
    tools: list[ToolRecord] = field(default_factory=list)

    @property
    def output_tokens(self) -> int:
        return sum(t.output_tokens for t in self.turns)

    def result(self, ideal_s: float | None, start_s: float = 0.0) -> SessionResult:
        """As the metrics' `SessionResult`; a session that never sent arrives at `start_s`."""
        arrival = self.arrival_s if self.arrival_s is not None else start_s
        return SessionResult(
            self.session_id, arrival, self.done_s, ideal_s, self.output_tokens, self.rejected
        )


@dataclass
class ReplayOutcome:
    records: list[SessionRecord]  # in workload order
    wall_s: float

    @property
    def failed(self) -> int:
        return sum(1 for r in self.records if r.error is not None and not r.rejected)


async def replay(
    specs: Sequence[SessionSpec],
    config: ReplayConfig,
    on_done: Callable[[SessionRecord], None] | None = None,
) -> ReplayOutcome:
    """Replay `specs` against the server; returns when every session finished, failed or was
    rejected."""
    client = ServerClient(
        config.base_url,
        api_key=config.api_key,
        timeout_s=config.timeout_s,
        retry_limit_s=config.retry_limit_s,
    )
    records = [SessionRecord(s.session_id) for s in specs]
    t0 = time.monotonic()

    async def one(spec: SessionSpec, rec: SessionRecord) -> None:
        await _session(client, spec, rec, config, t0)
        if on_done is not None:
            on_done(rec)

    try:
        if config.rate is not None:
            times = arrival_times(len(specs), rate=config.rate, seed=config.seed)

            async def at(when: float, spec: SessionSpec, rec: SessionRecord) -> None:
                await asyncio.sleep(max(0.0, t0 + when - time.monotonic()))
                await one(spec, rec)

            await asyncio.gather(*(at(*x) for x in zip(times, specs, records, strict=True)))
        else:
            assert config.concurrency is not None
            queue = list(zip(specs, records, strict=True))[::-1]

            async def worker() -> None:
                while queue:
                    await one(*queue.pop())

            await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    finally:
        await client.aclose()
    return ReplayOutcome(records, time.monotonic() - t0)


async def _session(
    client: ServerClient,
    spec: SessionSpec,
    rec: SessionRecord,
    config: ReplayConfig,
    t0: float,
) -> None:
    if config.max_context is not None and spec.max_context > config.max_context:
        rec.rejected = True
        rec.error = (
            f"needs {spec.max_context} tokens of context; the server holds {config.max_context}"
        )
        return
    prompts = PromptBuilder(spec, config.seed)
    rec.arrival_s = time.monotonic() - t0
    try:
        for i, turn in enumerate(spec.turns):
            prompt = prompts.prompt(turn)
            last = i == len(spec.turns) - 1
            nxt = turn.tools[0].category if config.tool_markers and turn.tools else None
            out = await client.complete(
                spec.session_id, prompt, turn.output_tokens, last_step=last, next_tool=nxt
            )
            if out.output_tokens != turn.output_tokens:
                raise ReplayError(
                    f"turn {i}: asked for {turn.output_tokens} tokens, got {out.output_tokens}"
                )
            prompts.answered(prompt, turn, out.token_ids)
            rec.turns.append(
                TurnRecord(
                    len(prompt),
                    out.output_tokens,
                    out.cached_tokens,
                    turn.reuse_tokens,
                    out.latency_s,
                    out.retries,
                )
            )
            for tool in turn.tools:
                rec.tools.append(await _tool(client, spec.session_id, tool, config))
        rec.done_s = time.monotonic() - t0
        if config.tools != "client":
            await client.end_session(spec.session_id)  # its workspace, as an agent would
    except ReplayError as e:
        rec.error = str(e)
        await client.end_session(spec.session_id)
    except Exception as e:  # a bug in this agent must fail its session, not the whole run
        rec.error = f"{type(e).__name__}: {e}"
        await client.end_session(spec.session_id)


async def _tool(
    client: ServerClient, session_id: str, tool: ToolSpec, config: ReplayConfig
) -> ToolRecord:
    if config.tools == "client":
        t = time.monotonic()
        await asyncio.sleep(tool.duration_s)
        wall = time.monotonic() - t
        return ToolRecord(tool.category, tool.cpu_heavy, tool.duration_s, wall, wall, 0.0, 0)
    assert config.cpu is not None
    # Contention stretches heavy steps: allow far more than the nominal time before the
    # sandbox's timeout (which would cut the work short and hide the stretch).
    timeout = math.ceil(60.0 + 20.0 * tool.duration_s)
    run = await client.run_tool(
        session_id, tool_command(tool, config.cpu), name=tool.category, timeout_s=timeout
    )
    if run.timed_out or run.exit_code != 0:
        raise ReplayError(
            f"tool {tool.category} ({tool.duration_s:.2f} s) "
            + ("timed out" if run.timed_out else f"exited with {run.exit_code}")
        )
    return ToolRecord(
        tool.category,
        tool.cpu_heavy,
        tool.duration_s,
        run.wall_s,
        run.run_s,
        run.queue_wait_s,
        run.exit_code,
    )
