"""The discrete-event simulator: agent sessions from traces on a simulated GPU and CPU pool.

The loop is the engine loop (admit -> schedule -> execute -> update -> publish) on a `SimClock`;
the scheduler, KV manager and policy are the same objects a live engine uses. The heap key is
`(time, priority, seq)`: at equal times a step end is applied before tool ends, tool ends before
arrivals, and only then does the engine start its next step, so work that appears at the instant
a step ends joins the next step. Stretches of pure decode with nothing else due advance in one
event (`fast_forward`); a test checks they decide exactly as step-by-step runs. A cluster
(`mars.sim.cluster`) is a list of such engines (`Replica`) on the one heap and clock: each idle
one with work starts its next step once nothing else is due at the instant.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mars.control.admission import AdmissionQueue
from mars.core.clock import SimClock
from mars.core.events import (
    AdmissionWindow,
    EventBus,
    SessionArrived,
    SessionDone,
    ToolEnd,
    ToolEnqueued,
    ToolStart,
)
from mars.core.request import Request
from mars.core.session import Session, SessionStatus, ToolCall, Turn
from mars.kv.manager import KVConfig
from mars.sched.policy import Policy
from mars.sched.scheduler import SchedulerConfig
from mars.sim.cluster import Cluster, Router, bind_to_cluster, replica_sessions, replica_stats
from mars.sim.costmodel import StepCostModel
from mars.sim.replica import Replica
from mars.sim.tools import ProcessorSharing, WorkerQueue
from mars.sim.workload import SessionSpec


class _Ev(enum.IntEnum):
    """Event kinds; the value is the tie-break priority at equal times."""

    STEP_END = 0
    TOOL_END = 1
    HEAVY_TOOLS = 2
    ARRIVAL = 3
    TICK = 4


@dataclass(frozen=True, slots=True)
class SimConfig:
    tool_cores: int = 8  # CPU cores for tools (the paper's testbed)
    # Workers every tool run holds, first in first out (`mars serve --tool-workers`); None: no
    # queue, every tool starts at once. `tool_overhead_s`: each run's fixed cost on its worker
    # (the live sandbox's process start), added to its duration.
    tool_workers: int | None = None
    tool_overhead_s: float = 0.0
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    host_kv_tokens: int = 0  # host memory for offloaded KV, in tokens
    kv_tokens: int | None = None  # KV capacity override; None = the cost model's capacity
    # Leading prompt tokens every session shares (one framework's system prompt and tools): the
    # KV manager shares their blocks across sessions. The traces carry no text, so this stands
    # in for what the live engine finds by comparing token ids.
    shared_prefix_tokens: int = 0
    # Sessions whose KV may be on the GPU at once (llama.cpp's sequence slots); None = any.
    kv_sequences: int | None = None
    fast_forward: bool = True

    def __post_init__(self) -> None:
        if self.tool_cores < 1:
            raise ValueError("tool_cores must be at least 1")
        if self.tool_workers is not None and self.tool_workers < 1:
            raise ValueError("tool_workers must be at least 1")
        if self.tool_overhead_s < 0:
            raise ValueError("tool_overhead_s must be non-negative")
        if self.shared_prefix_tokens < 0:
            raise ValueError("shared_prefix_tokens must be non-negative")


@dataclass(frozen=True, slots=True)
class Arrivals:
    """Open loop (sessions arrive at `times`) or closed loop (`concurrency` always in flight)."""

    times: tuple[float, ...] = ()
    concurrency: int = 0


@dataclass(slots=True)
class SessionRecord:
    session_id: str
    traj_id: str
    arrival_s: float
    admitted_s: float | None = None
    done_s: float | None = None
    rejected: bool = False
    output_tokens: int = 0
    prompt_tokens: int = 0
    turns: int = 0
    tool_s: float = 0.0  # nominal tool time
    # Where its calls' time went, summed over calls: emit to first schedule, first schedule to
    # first token (prefill, restores, preemptions before it), first token to the call's end.
    call_wait_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def latency_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.arrival_s


@dataclass(slots=True)
class SimOutcome:
    records: list[SessionRecord]
    end_time: float
    steps: int
    gpu_busy_s: float
    tool_busy_core_s: float
    tool_cores: int
    tool_runs: int
    tool_queue_wait_s: float  # summed over runs
    prompt_tokens: int
    hit_tokens: int
    recomputed_tokens: int
    preemptions: int
    evictions: int
    offloads: int
    restores: int
    kv_blocks: int
    shared_tokens: int = 0  # prompt tokens served from KV other sessions computed
    kv_usage: list[tuple[float, float]] = field(default_factory=list)
    # The admission window when it changed (policies that keep one), and sessions admitted then.
    admission_window: list[tuple[float, int, int]] = field(default_factory=list)
    router: str = "mars"
    moves: int = 0  # calls routed to another replica than their session's previous call
    replicas: list[dict[str, float]] = field(default_factory=list)  # `replica_stats`


class _Agent:
    """Replays one session spec: emits its calls in order and runs its tools."""

    __slots__ = ("enqueued_s", "record", "session", "spec", "tool_index", "turn_index")

    def __init__(self, spec: SessionSpec, session: Session, record: SessionRecord) -> None:
        self.spec, self.session, self.record = spec, session, record
        self.turn_index = 0
        self.tool_index = 0
        self.enqueued_s = 0.0  # when its current tool asked for a worker


def foresee(policy: Policy, specs: Sequence[SessionSpec]) -> None:
    """Give a clairvoyant policy every session's future (only the simulator has one)."""
    from mars.sched.policies.oracle import OraclePolicy, SessionFuture

    assert isinstance(policy, OraclePolicy)
    policy.foresee(
        {
            s.session_id: SessionFuture(
                tuple(t.context_tokens for t in s.turns),
                tuple(t.new_prompt_tokens + t.output_tokens for t in s.turns),
                tuple(t.tool_time_s for t in s.turns),
            )
            for s in specs
        }
    )


class Simulation:
    def __init__(
        self,
        specs: Sequence[SessionSpec],
        policy: Policy,
        cost: StepCostModel,
        arrivals: Arrivals,
        config: SimConfig = SimConfig(),
        bus: EventBus | None = None,
        on_session_done: Callable[[SessionRecord], None] | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        """One engine running `policy`; or, with `cluster`, one replica per policy of it behind
        its router, `policy` being the control plane's (`mars.sim.cluster`)."""
        self.specs = list(specs)
        self.config = config
        self.clock = SimClock()
        self.bus = bus or EventBus()
        kv_tokens = config.kv_tokens if config.kv_tokens is not None else cost.kv_capacity_tokens
        num_blocks = max(1, kv_tokens // config.block_size)
        # What fits is whole blocks: a session longer than that can never run.
        self.kv_capacity_tokens = num_blocks * config.block_size
        self.max_model_len = cost.max_model_len
        # Content ids of each framework's shared leading tokens (sessions of one trajectory group,
        # `traj_id` less its instance): one tuple a group, so matching it is an identity check.
        self._shared_prefix: dict[str, tuple[int, ...]] = {}
        self.sessions: dict[str, Session] = {}  # every session queued or admitted
        policies = (policy,) if cluster is None else cluster.policies
        n = len(policies)
        kv_config = KVConfig(
            num_blocks, config.block_size, config.host_kv_tokens, config.kv_sequences
        )
        sched_config = SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs)
        workers = config.tool_workers or config.tool_cores  # per replica
        ff, own = config.fast_forward, replica_sessions(self.sessions, n)
        self.replicas = [
            Replica(i, kv_config, sched_config, p, cost, self.clock, self.bus, own[i], workers, ff)
            for i, p in enumerate(policies)
        ]
        self.kv, self.scheduler = self.replicas[0].kv, self.replicas[0].scheduler
        # The idle replicas that have work, or may have (a step of theirs just ended).
        self._ready: set[Replica] = set()
        self.router = Router("mars" if cluster is None else cluster.router, self.replicas)
        self.policy = policy
        self._policies = list(dict.fromkeys((policy, *policies)))  # each once, to tick
        for p in self._policies:
            if getattr(p, "clairvoyant", False):  # the `oracle` bound: hand it the future
                foresee(p, self.specs)
        # The cluster's tools share one pool of every replica's cores and workers.
        self.tool_cores = config.tool_cores * n
        self.heavy = ProcessorSharing(self.tool_cores)
        self.workers = WorkerQueue(None if config.tool_workers is None else config.tool_workers * n)
        self._tool_runs = 0
        self._tool_wait_s = 0.0
        self._heavy_version = 0
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._agents: dict[str, _Agent] = {}
        self._global_admission = cluster is None or cluster.global_admission
        # With one admission for the cluster, its policy sees every replica as one engine and
        # weighs each call's retention as if it decided it (the replica's policy does), to
        # learn the times away and duty its admission reads.
        self._shadow = False
        if cluster is not None and self._global_admission:
            bind_to_cluster(policy, self.replicas, self.router, self.sessions, cost)
            self._shadow = bool(getattr(policy, "admission", False))
        admitters = [policy] if self._global_admission else [r.policy for r in self.replicas]
        self.admissions = [
            AdmissionQueue(p, self.clock, self.bus, self._admitted) for p in admitters
        ]
        self.admission = self.admissions[0]
        self._next_spec = 0
        self._records: list[SessionRecord] = []
        self._on_done = on_session_done
        self._arrivals = arrivals
        self.kv_usage: list[tuple[float, float]] = []
        self.window: list[tuple[float, int, int]] = []
        if getattr(policy, "admission", False) and self._global_admission:
            self.bus.subscribe(AdmissionWindow, self._window_changed)

    # ---- event heap -------------------------------------------------------------------------
    def _push(self, t: float, kind: _Ev, payload: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, int(kind), self._seq, payload))

    def run(self) -> SimOutcome:
        if self._arrivals.concurrency:
            for _ in range(min(self._arrivals.concurrency, len(self.specs))):
                self._push(0.0, _Ev.ARRIVAL)
        else:
            for t in self._arrivals.times[: len(self.specs)]:
                self._push(t, _Ev.ARRIVAL)
        if self.policy.tick_s is not None:
            self._push(self.policy.tick_s, _Ev.TICK)
        self.scheduler.on_output_done = self._reveal_tool
        heap = self._heap
        while heap:
            t, kind, _, payload = heapq.heappop(heap)
            self.clock.advance_to(t)
            self._dispatch(kind, payload)
            if self._ready and (not heap or heap[0][0] > t):
                for replica in sorted(self._ready, key=lambda r: r.index):
                    self._start_step(replica)
        waiting = sum(len(r.scheduler.waiting) for r in self.replicas)
        running = sum(len(r.scheduler.running) for r in self.replicas)
        unadmitted = sum(len(q) for q in self.admissions)
        if waiting or running or unadmitted:
            raise RuntimeError(
                f"simulation stalled at t={self.clock.now():.3f}s with {waiting} waiting, "
                f"{running} running, {unadmitted} sessions unadmitted: the policy holds KV "
                "nothing can free"
            )
        return self._outcome()

    def _outcome(self) -> SimOutcome:
        reps = self.replicas
        stats = [r.kv.stats() for r in reps]
        scheds = [r.scheduler for r in reps]
        return SimOutcome(
            self._records,
            self.clock.now(),
            sum(r.steps for r in reps),
            sum(r.executor.busy_s for r in reps),
            self.heavy.busy_core_s,
            self.tool_cores,
            self._tool_runs,
            self._tool_wait_s,
            sum(s.prompt_tokens for s in scheds),
            sum(s.hit_tokens for s in scheds),
            sum(s.recomputed_tokens for s in scheds),
            sum(s.num_preemptions for s in scheds),
            sum(st.evictions for st in stats),
            sum(st.offloads for st in stats),
            sum(st.restores for st in stats),
            sum(r.kv.num_blocks for r in reps),
            sum(r.kv.shared_tokens for r in reps),
            self.kv_usage,
            self.window,
            self.router.name,
            self.router.moves,
            replica_stats(reps, self.clock.now()),
        )

    def _window_changed(self, e: AdmissionWindow) -> None:
        if not self.window or self.window[-1][1:] != (e.window, e.active):
            self.window.append((e.time, e.window, e.active))

    def _dispatch(self, kind: int, payload: object) -> None:
        if kind == _Ev.STEP_END:
            assert isinstance(payload, Replica)
            self._end_step(payload)
        elif kind == _Ev.TOOL_END:
            assert isinstance(payload, _Agent)
            self._tool_done(payload)
        elif kind == _Ev.HEAVY_TOOLS:
            if payload == self._heavy_version:
                for agent in self.heavy.pop_due(self.clock.now()):
                    assert isinstance(agent, _Agent)
                    self._tool_done(agent)
                self._reschedule_heavy()
        elif kind == _Ev.TICK:
            for policy in self._policies:
                policy.on_tick()
            for queue in self.admissions:
                if len(queue):
                    queue.poll()
            # Keep ticking while any session is in flight or still to arrive.
            if self._agents or self._next_spec < len(self.specs):
                assert self.policy.tick_s is not None
                self._push(self.clock.now() + self.policy.tick_s, _Ev.TICK)
        else:
            self._arrive()

    # ---- engines ----------------------------------------------------------------------------
    def _usage(self) -> float:
        """KV usage, the cluster's mean with several replicas."""
        if len(self.replicas) == 1:
            return self.kv.usage
        return sum(r.kv.usage for r in self.replicas) / len(self.replicas)

    def _start_step(self, replica: Replica) -> None:
        end = replica.start_step(self._heap[0][0] if self._heap else math.inf)
        if end is not None:
            self._push(end, _Ev.STEP_END, replica)
            self._ready.discard(replica)
        elif not replica.scheduler.has_work:
            self._ready.discard(replica)  # until a call comes (else: blocked, ask again)

    def _end_step(self, replica: Replica) -> None:
        self._ready.add(replica)
        finished = replica.end_step()
        if finished:
            self.kv_usage.append((self.clock.now(), self._usage()))
        for req in finished:
            self._turn_done(self._agents[req.session_id])

    # ---- sessions -----------------------------------------------------------------------------
    def _arrive(self) -> None:
        if self._next_spec >= len(self.specs):
            return
        spec = self.specs[self._next_spec]
        self._next_spec += 1
        now = self.clock.now()
        session = Session(spec.session_id, now, first_prompt_tokens=spec.turns[0].prompt_tokens)
        record = SessionRecord(
            spec.session_id,
            spec.traj_id,
            now,
            turns=len(spec.turns),
            output_tokens=sum(t.output_tokens for t in spec.turns),
            prompt_tokens=sum(t.prompt_tokens for t in spec.turns),
            tool_s=sum(t.tool_time_s for t in spec.turns),
        )
        self._records.append(record)
        self.bus.publish(SessionArrived(now, spec.session_id))
        if spec.max_context > min(self.max_model_len, self.kv_capacity_tokens):
            session.status = SessionStatus.REJECTED
            record.rejected = True
            self.bus.publish(SessionDone(now, spec.session_id, 0.0, rejected=True))
            self._session_ended()
            return
        self.sessions[spec.session_id] = session
        self._agents[spec.session_id] = _Agent(spec, session, record)
        if self._global_admission:
            self.admission.add(session)
        else:
            self.admissions[self.router.admitting(session).index].add(session)

    def _admitted(self, session: Session) -> None:
        agent = self._agents[session.session_id]
        agent.record.admitted_s = session.admitted_time
        self._emit(agent)

    def _emit(self, agent: _Agent) -> None:
        turn = agent.spec.turns[agent.turn_index]
        session = agent.session
        req = Request(
            f"{session.session_id}-{agent.turn_index}",
            session.session_id,
            turn.prompt_tokens,
            turn.output_tokens,
            turn.reuse_tokens,
            self.clock.now(),
            agent.turn_index,
            prefix=self._prefix_of(agent.spec.traj_id),
        )
        session.turns.append(Turn(req))
        session.status = SessionStatus.LLM
        replica = self.router.route(session)
        replica.scheduler.add_request(req)
        if not replica.busy:
            self._ready.add(replica)
        # KV usage is sampled when calls arrive and finish: instants at which a fast-forwarded
        # run and a step-by-step one are in the same state.
        self.kv_usage.append((self.clock.now(), self._usage()))

    def _prefix_of(self, traj_id: str) -> tuple[int, ...]:
        n = self.config.shared_prefix_tokens
        if not n:
            return ()
        group = traj_id.rsplit("/", 1)[0]
        key = self._shared_prefix.get(group)
        if key is None:
            first = len(self._shared_prefix) << 40  # content ids no other group uses
            key = self._shared_prefix[group] = tuple(range(first, first + n))
        return key

    def _reveal_tool(self, req: Request) -> None:
        """The call's output is complete: it names the tool the agent runs next."""
        agent = self._agents[req.session_id]
        tools = agent.spec.turns[req.turn_index].tools
        req.next_tool = tools[0].category if tools else None
        if self._shadow:
            self.policy.retention(agent.session, req)

    def _turn_done(self, agent: _Agent) -> None:
        req, rec, now = agent.session.turns[-1].request, agent.record, self.clock.now()
        scheduled = req.first_scheduled_time if req.first_scheduled_time is not None else now
        first = req.first_token_time if req.first_token_time is not None else now
        rec.call_wait_s += scheduled - req.arrival_time
        rec.prefill_s += first - scheduled
        rec.decode_s += now - first
        agent.tool_index = 0
        self._next_tool(agent)

    def _next_tool(self, agent: _Agent) -> None:
        turn = agent.spec.turns[agent.turn_index]
        if agent.tool_index < len(turn.tools):
            tool = turn.tools[agent.tool_index]
            now = self.clock.now()
            agent.session.status = SessionStatus.TOOL
            agent.enqueued_s = now
            if self.workers.workers is not None:
                sid = agent.session.session_id
                self.bus.publish(ToolEnqueued(now, sid, tool.category, tool.cpu_heavy))
            if self.workers.acquire(agent):
                self._start_tool(agent)
            return
        agent.turn_index += 1
        if agent.turn_index < len(agent.spec.turns):
            self._emit(agent)
        else:
            self._finish_session(agent)

    def _start_tool(self, agent: _Agent) -> None:
        """`agent`'s current tool has a worker: it runs now (it is in the session's past only
        from here, as the live runtime reports it)."""
        tool = agent.spec.turns[agent.turn_index].tools[agent.tool_index]
        now = self.clock.now()
        call = ToolCall(tool.category, tool.cpu_heavy, now, queue_wait_s=now - agent.enqueued_s)
        agent.session.turns[-1].tools.append(call)
        self.bus.publish(ToolStart(now, agent.session.session_id, tool.category))
        run_s = tool.duration_s + self.config.tool_overhead_s
        if tool.cpu_heavy:
            self.heavy.add(agent, run_s, now)
            self._reschedule_heavy()
        else:
            self._push(now + run_s, _Ev.TOOL_END, agent)

    def _tool_done(self, agent: _Agent) -> None:
        now = self.clock.now()
        call = agent.session.turns[-1].tools[-1]
        call.end_time = now
        self._tool_runs += 1
        self._tool_wait_s += call.queue_wait_s
        self.bus.publish(
            ToolEnd(
                now,
                agent.session.session_id,
                call.category,
                now - call.start_time,
                call.queue_wait_s,
            )
        )
        waiting = self.workers.release()
        if waiting is not None:  # first in line takes the freed worker
            assert isinstance(waiting, _Agent)
            self._start_tool(waiting)
        agent.tool_index += 1
        self._next_tool(agent)

    def _reschedule_heavy(self) -> None:
        self._heavy_version += 1
        t = self.heavy.next_finish()
        if t is not None:
            self._push(max(t, self.clock.now()), _Ev.HEAVY_TOOLS, self._heavy_version)

    def _finish_session(self, agent: _Agent) -> None:
        now = self.clock.now()
        session = agent.session
        session.status, session.done_time = SessionStatus.DONE, now
        agent.record.done_s = now
        self.router.forget(session.session_id)
        del self._agents[session.session_id]
        del self.sessions[session.session_id]
        self.bus.publish(SessionDone(now, session.session_id, now - session.arrival_time))
        if self._on_done is not None:
            self._on_done(agent.record)
        self._session_ended()

    def _session_ended(self) -> None:
        if self._arrivals.concurrency:
            self._push(self.clock.now(), _Ev.ARRIVAL)
        for queue in self.admissions:
            if len(queue):
                queue.poll()
