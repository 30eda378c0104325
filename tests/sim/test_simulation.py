"""The discrete-event simulator end to end: ideal times, hand-computed step sums, processor-sharing
tools, event tie-breaks, light-load slowdown, determinism, fast-forward parity, policies blind to
the future, rejection of sessions that can never fit, and the metric functions."""

from __future__ import annotations

import collections
import gc
import json
import math
import types
from collections.abc import Sequence
from typing import Any

import pytest

from factories import TRACES, make_spec
from mars.bench.metrics import SessionResult, percentile, steady_throughput, summarize
from mars.core.events import (
    Event,
    EventBus,
    GpuEnd,
    GpuFirstToken,
    GpuPreempt,
    GpuSubmit,
    KvEvict,
    RequestEmit,
    SessionDone,
    ToolEnd,
)
from mars.core.request import Request
from mars.core.session import Session, ToolCall
from mars.kv.manager import Retention
from mars.sched.policies.fcfs import FCFSPolicy
from mars.sched.policy import Admission, Policy, PolicyContext
from mars.sched.registry import make_policy, policy_names
from mars.sim.costmodel import CostModel, resolve_gpu, resolve_model
from mars.sim.experiment import SimSpec, ideal_times, load_specs, run_experiment
from mars.sim.run import Arrivals, SimConfig, SimOutcome, Simulation, _Ev
from mars.sim.workload import SessionSpec, ToolSpec, TurnSpec, WorkloadConfig, build_workload

needs_traces = pytest.mark.skipif(not TRACES.is_file(), reason=f"no trace file at {TRACES}")
COST = CostModel(resolve_gpu("h100"), resolve_model("qwen3-coder-30b-a3b"))


def run_sim(
    specs: Sequence[SessionSpec],
    arrivals: Arrivals | None = None,
    config: SimConfig | None = None,
    policy: Policy | None = None,
    bus: EventBus | None = None,
) -> SimOutcome:
    return Simulation(
        specs,
        policy or FCFSPolicy(),
        COST,
        arrivals or Arrivals(concurrency=len(specs)),
        config or SimConfig(),
        bus=bus,
    ).run()


def recorded(specs: Sequence[SessionSpec], **kw: Any) -> tuple[SimOutcome, list[Event]]:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe_all(events.append)
    return run_sim(specs, bus=bus, **kw), events


def spec_with_tools(sid: str = "s0000") -> SessionSpec:
    """Four calls; heavy, light and mixed tool phases; appended and rewritten history."""
    heavy = ToolSpec("test", True, 2.5, "measured")
    light = ToolSpec("view", False, 0.25, "measured")
    return SessionSpec(
        sid,
        f"traj/{sid}",
        (
            TurnSpec(3000, 40, 0, (heavy,)),
            TurnSpec(3300, 25, 3040, (light, heavy, light)),
            TurnSpec(3100, 60, 3000, (light,)),  # rewritten: only the first prompt is shared
            TurnSpec(9000, 12, 3160, ()),
        ),
    )


# ---- ideal time: a session alone runs in exactly its ideal time --------------------------------


@pytest.mark.parametrize("fast_forward", [True, False])
def test_alone_equals_ideal_with_tools(fast_forward: bool) -> None:
    spec = spec_with_tools()
    ideal = ideal_times([spec], COST, SimConfig())[spec.session_id]
    out = run_sim([spec], Arrivals(concurrency=1), SimConfig(fast_forward=fast_forward))
    (rec,) = out.records
    assert rec.latency_s == ideal
    assert ideal > spec.total_tool_time_s
    # Alone on the fixed point: the same with an open-loop arrival at 0.
    (rec0,) = run_sim([spec], Arrivals(times=(0.0,))).records
    assert rec0.latency_s == ideal


@needs_traces
def test_real_trace_sessions_alone_equal_ideal() -> None:
    specs = build_workload(TRACES, WorkloadConfig(sessions=6, seed=11))
    fits = [s for s in specs if s.max_context <= COST.kv_capacity_tokens]
    assert len(fits) >= 3
    ideal = ideal_times(fits, COST, SimConfig())
    for spec in fits:
        (rec,) = run_sim([spec], Arrivals(concurrency=1)).records
        assert rec.latency_s == ideal[spec.session_id], spec.traj_id
        assert rec.latency_s is not None and rec.latency_s > spec.total_tool_time_s


@pytest.mark.parametrize("fast_forward", [True, False])
@pytest.mark.parametrize(("prompt", "output"), [(20000, 50), (8192, 2), (100, 1), (16385, 7)])
def test_hand_computed_latency(fast_forward: bool, prompt: int, output: int) -> None:
    expected = 0.0
    done = 0
    while done < prompt:  # chunks of the 8192-token budget
        chunk = min(8192, prompt - done)
        expected += COST.predict([(chunk, done)]).step_s
        done += chunk
    for j in range(output - 1):  # one decode per further token, the context growing by one
        expected += COST.predict([(1, prompt + j)]).step_s
    spec = make_spec([(prompt, output, 0, -1.0)])
    out = run_sim([spec], Arrivals(concurrency=1), SimConfig(fast_forward=fast_forward))
    (rec,) = out.records
    assert rec.latency_s == pytest.approx(expected, rel=1e-9, abs=0)
    assert out.steps == -(-prompt // 8192) + output - 1
    assert out.gpu_busy_s == pytest.approx(expected, rel=1e-9, abs=0)


# ---- tools: processor sharing on the tool cores --------------------------------------------


def _tool_durations(events: list[Event]) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        if isinstance(e, ToolEnd):
            out[(e.session_id, e.category)].append(e.duration_s)
    return out


def _two_turns(sid: str, tool_s: float, heavy: bool) -> SessionSpec:
    return make_spec([(500, 4, 0, tool_s), (560, 3, 504, -1.0)], sid=sid, heavy=heavy)


@pytest.mark.parametrize(
    ("cores", "heavy", "stretch"),
    [(1, 1, 1.0), (1, 2, 2.0), (2, 4, 2.0), (2, 3, 1.5), (8, 8, 1.0), (8, 12, 1.5)],
)
def test_heavy_tools_share_the_cores(cores: int, heavy: int, stretch: float) -> None:
    # Identical sessions arriving together finish their first call in the same step, so their
    # tools run side by side from start to end.
    specs = [_two_turns(f"h{i}", 4.0, heavy=True) for i in range(heavy)]
    specs += [_two_turns(f"l{i}", 0.75, heavy=False) for i in range(3)]
    out, events = recorded(specs, config=SimConfig(tool_cores=cores))
    durations = _tool_durations(events)
    for i in range(heavy):
        assert durations[(f"h{i}", "test")] == [pytest.approx(4.0 * stretch, rel=1e-9)]
    for i in range(3):  # light tools use no core: unaffected by the heavy load
        assert durations[(f"l{i}", "view")] == [pytest.approx(0.75, rel=1e-12)]
    assert out.tool_busy_core_s == pytest.approx(4.0 * heavy, rel=1e-9)


def test_heavy_tools_joining_late_share_from_then_on() -> None:
    # One core. h0's 6 s job runs alone for `lag` s (about 2); then h1's 2 s job joins and both
    # run at half speed: h1 takes 4 s, in which h0 does 2 s of work; h0 finishes its remaining
    # 6 - lag - 2 s alone. So h0 takes lag + 4 + (4 - lag) = 8 s whatever the lag.
    h0 = make_spec([(500, 4, 0, 6.0), (560, 3, 504, -1.0)], sid="h0", heavy=True)
    h1 = make_spec([(500, 4, 0, 2.0), (560, 3, 504, -1.0)], sid="h1", heavy=True)
    out, events = recorded(
        [h0, h1], arrivals=Arrivals(times=(0.0, 2.0)), config=SimConfig(tool_cores=1)
    )
    starts = {e.session_id: e.time for e in events if type(e).__name__ == "ToolStart"}
    assert 1.9 < starts["h1"] - starts["h0"] < 2.1
    d = _tool_durations(events)
    assert d[("h1", "test")] == [pytest.approx(4.0, rel=1e-9)]
    assert d[("h0", "test")] == [pytest.approx(8.0, rel=1e-9)]
    assert out.tool_busy_core_s == pytest.approx(8.0, rel=1e-9)  # one core busy throughout
    assert all(r.done_s is not None for r in out.records)


# ---- event heap: (time, priority, seq) ------------------------------------------------------


def test_event_priorities() -> None:
    assert _Ev.STEP_END < _Ev.TOOL_END < _Ev.HEAVY_TOOLS < _Ev.ARRIVAL

    class Recorder(Simulation):
        seen: list[tuple[float, int, object]]

        def _dispatch(self, kind: int, payload: object) -> None:
            self.seen.append((self.clock.now(), kind, payload))

    sim = Recorder([], FCFSPolicy(), COST, Arrivals())
    sim.seen = []
    pushes = [
        (1.0, _Ev.ARRIVAL, "a1"),
        (1.0, _Ev.STEP_END, "s1"),
        (0.5, _Ev.ARRIVAL, "a0"),
        (1.0, _Ev.HEAVY_TOOLS, "h1"),
        (1.0, _Ev.TOOL_END, "t1"),
        (1.0, _Ev.STEP_END, "s2"),
        (1.0, _Ev.ARRIVAL, "a2"),
        (1.5, _Ev.STEP_END, "s3"),
    ]
    for t, kind, payload in pushes:
        sim._push(t, kind, payload)
    sim.run()
    assert [p for _, _, p in sim.seen] == ["a0", "s1", "s2", "t1", "h1", "a1", "a2", "s3"]


def test_arrival_at_a_step_end_joins_the_next_step() -> None:
    a = make_spec([(1000, 3, 0, -1.0)], sid="a")
    b = make_spec([(700, 2, 0, -1.0)], sid="b")
    t1 = COST.predict([(1000, 0)]).step_s  # a's prefill ends exactly when b arrives
    _, events = recorded([a, b], arrivals=Arrivals(times=(0.0, t1)))
    submits = {e.session_id: e.time for e in events if isinstance(e, GpuSubmit)}
    firsts = {e.session_id: e.time for e in events if isinstance(e, GpuFirstToken)}
    assert submits == {"a": 0.0, "b": t1}
    assert firsts["a"] == t1
    # The step that starts at t1 batches a's first decode with b's whole prefill.
    t2 = t1 + COST.predict([(1, 1000), (700, 0)]).step_s
    assert firsts["b"] == t2
    t3 = t2 + COST.predict([(1, 1001), (1, 700)]).step_s
    ends = {e.session_id: e.time for e in events if isinstance(e, GpuEnd)}
    assert ends == {"a": t3, "b": t3}
    # Arriving a hair later, b waits for the step after a's first decode.
    late = math.nextafter(t1, math.inf)
    _, events = recorded([a, b], arrivals=Arrivals(times=(0.0, late)))
    firsts = {e.session_id: e.time for e in events if isinstance(e, GpuFirstToken)}
    t2_late = t1 + COST.predict([(1, 1000)]).step_s
    assert firsts["b"] == t2_late + COST.predict([(1, 1001), (700, 0)]).step_s


def test_tool_end_and_arrival_at_the_same_instant() -> None:
    # a's light tool ends exactly when b arrives; both calls start in one step.
    a = make_spec([(400, 1, 0, 1.0), (450, 2, 401, -1.0)], sid="a")
    t_tool = COST.predict([(400, 0)]).step_s + 1.0
    b = make_spec([(300, 2, 0, -1.0)], sid="b")
    _, events = recorded([a, b], arrivals=Arrivals(times=(0.0, t_tool)))
    emits = [(e.session_id, e.time) for e in events if isinstance(e, RequestEmit)]
    assert emits == [("a", 0.0), ("a", t_tool), ("b", t_tool)]
    submits = [(e.request_id, e.time) for e in events if isinstance(e, GpuSubmit)]
    assert submits == [("a-0", 0.0), ("a-1", t_tool), ("b-0", t_tool)]


# ---- light load, determinism, fast-forward parity -------------------------------------------


@needs_traces
def test_light_load_slowdown_is_one() -> None:
    spec = SimSpec(str(TRACES), rate=0.0005, arrival="fixed", sessions=20, seed=0)
    result = run_experiment(spec)
    assert result["completed"] == 20 - result["rejected"] >= 18
    assert result["slowdown"]["mean"] == pytest.approx(1.0, rel=0.05)
    assert result["goodput"]["fraction"] == 1.0
    assert result["kv"]["preemptions"] == 0


@needs_traces
def test_same_seed_same_result() -> None:
    def once(seed: int) -> str:
        spec = SimSpec(str(TRACES), concurrency=6, sessions=12, seed=seed, kv_scale=0.5)
        result = run_experiment(spec)
        assert result.pop("wall_s") > 0
        result["workload"].pop("seed")
        return json.dumps(result, sort_keys=True)

    first = once(3)
    assert once(3) == first
    assert once(4) != first


def _decisions(events: list[Event]) -> tuple[list[Event], dict[str, int]]:
    """Scheduling decisions in order, and evicted tokens per session (eviction events are
    grouped by allocation call, which a fast-forwarded stretch makes once for many steps)."""
    kinds = (GpuSubmit, GpuPreempt, GpuEnd, GpuFirstToken, RequestEmit, ToolEnd)
    evicted: dict[str, int] = collections.Counter()
    for e in events:
        if isinstance(e, KvEvict):
            evicted[e.session_id] += e.tokens
    return [e for e in events if isinstance(e, kinds)], dict(evicted)


@needs_traces
@pytest.mark.parametrize("kv_tokens", [None, 0.21])
def test_fast_forward_parity_on_traces(kv_tokens: float | None) -> None:
    specs = build_workload(TRACES, WorkloadConfig(sessions=40, seed=0))
    cap = COST.kv_capacity_tokens if kv_tokens is None else int(kv_tokens * COST.kv_capacity_tokens)
    cap = cap // 16 * 16  # whole blocks (see test_session_just_over_block_capacity_is_rejected)
    runs = []
    for ff in (True, False):
        config = SimConfig(kv_tokens=cap, fast_forward=ff)
        runs.append(recorded(specs, arrivals=Arrivals(concurrency=16), config=config))
    (fast, fast_ev), (slow, slow_ev) = runs
    assert [r.latency_s for r in fast.records] == [r.latency_s for r in slow.records]
    assert all(r.latency_s is not None or r.rejected for r in fast.records)
    for name in ("end_time", "steps", "prompt_tokens", "hit_tokens", "recomputed_tokens"):
        assert getattr(fast, name) == getattr(slow, name), name
    for name in ("preemptions", "evictions", "offloads", "restores", "gpu_busy_s"):
        assert getattr(fast, name) == getattr(slow, name), name
    fast_dec, fast_evict = _decisions(fast_ev)
    slow_dec, slow_evict = _decisions(slow_ev)
    assert fast_dec == slow_dec
    assert fast_evict == slow_evict
    assert fast.steps > len([e for e in fast_ev if isinstance(e, GpuEnd)]) * 10
    if kv_tokens is not None:
        assert fast.preemptions > 0 and fast.evictions > 0


@needs_traces
@pytest.mark.parametrize("policy", policy_names())
def test_fast_forward_result_json_identical(policy: str) -> None:
    """Every policy, KV-tight enough to preempt: fast-forward changes nothing in the result."""
    specs = load_specs(SimSpec(str(TRACES), concurrency=16, sessions=40))
    results = []
    for ff in (True, False):
        result = run_experiment(
            SimSpec(str(TRACES), policy=policy, concurrency=16, sessions=40, fast_forward=ff),
            specs=specs,
        )
        result.pop("wall_s")
        result["workload"].pop("fast_forward")
        results.append(json.dumps(result, sort_keys=True))
    assert results[0] == results[1]


def test_fast_forward_first_token_event_after_a_chunk_boundary() -> None:
    spec = make_spec([(8193, 6, 0, -1.0)])  # one prompt token left after the first chunk
    times = []
    for ff in (True, False):
        _, events = recorded([spec], config=SimConfig(fast_forward=ff))
        times.append([e.time for e in events if isinstance(e, GpuFirstToken)])
    assert times[0] == times[1]


# ---- policies cannot see the future ---------------------------------------------------------

FUTURE_TYPES = (SessionSpec, TurnSpec, ToolSpec)
_ATOMS = (str, bytes, int, float, complex, bool, type(None), range)
_OPAQUE = (type, types.ModuleType, types.BuiltinFunctionType, types.CodeType, types.FrameType)


def reachable(roots: Sequence[object], limit: int = 200_000) -> list[object]:
    """Every object reachable from `roots` through gc referents; modules and classes are not
    entered, and of a function only its closure, defaults and attributes (its globals reach
    everything). AssertionError past `limit` objects."""
    seen: set[int] = set()
    out: list[object] = []
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (*_ATOMS, *_OPAQUE)):
            continue
        seen.add(id(obj))
        out.append(obj)
        assert len(out) <= limit, "object graph too large to check"
        if isinstance(obj, types.FunctionType):
            parts: list[object] = [obj.__closure__, obj.__defaults__, obj.__kwdefaults__]
            stack.extend([*parts, obj.__dict__])
        else:
            stack.extend(gc.get_referents(obj))
    return out


class FutureCheck:
    """A policy wrapper that walks everything the wrapped policy is handed, on every call."""

    def __init__(self, inner: Policy, sim_ref: list[Simulation]) -> None:
        self.inner = inner
        self.name = inner.name
        self.fast_forward_ok = inner.fast_forward_ok
        self.tick_s = inner.tick_s
        self.ctx: PolicyContext | None = None
        self._sim = sim_ref
        self.calls: collections.Counter[str] = collections.Counter()
        self.objects = 0

    def _check(self, method: str, *args: object) -> None:
        self.calls[method] += 1
        assert self.ctx is not None
        now = self.ctx.clock.now()
        objs = reachable([*args, self.ctx, self.inner])
        self.objects = max(self.objects, len(objs))
        for obj in objs:
            assert not isinstance(obj, FUTURE_TYPES), f"{method} can reach {obj!r:.80}"
            if isinstance(obj, ToolCall):
                assert (obj.end_time is None) == (obj.duration_s is None)
                assert obj.start_time <= now
                assert obj.end_time is None or obj.end_time <= now
            elif isinstance(obj, Request):
                assert obj.arrival_time <= now
            elif isinstance(obj, Session):
                self._check_session(obj, now)
        for session in self.ctx.sessions.values():
            self._check_session(session, now)

    def _check_session(self, session: Session, now: float) -> None:
        sim = self._sim[0]
        agent = sim._agents.get(session.session_id)
        if agent is None:
            return
        spec = agent.spec
        assert len(session.turns) <= agent.turn_index + 1
        for turn, turn_spec in zip(session.turns, spec.turns, strict=False):
            assert turn.request.num_prompt_tokens == turn_spec.prompt_tokens
            assert len(turn.tools) <= len(turn_spec.tools)
        if session.turns and session.turns[-1].tools:
            last = session.turns[-1].tools
            assert all(t.end_time is not None for t in last[:-1])

    def bind(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.inner.bind(ctx)

    def order_waiting(self, waiting: Sequence[Request]) -> Sequence[Request]:
        self._check("order_waiting", waiting)
        return self.inner.order_waiting(waiting)

    def order_running(self, running: Sequence[Request]) -> Sequence[Request]:
        self._check("order_running", running)
        return self.inner.order_running(running)

    def chunk_tokens(self, req: Request, budget: int) -> int:
        self._check("chunk_tokens", req)
        return self.inner.chunk_tokens(req, budget)

    def pick_victim(self, running: Sequence[Request], needed_by: Request) -> Request | None:
        self._check("pick_victim", running, needed_by)
        return self.inner.pick_victim(running, needed_by)

    def stop_after_failure(self) -> bool:
        self._check("stop_after_failure")
        return self.inner.stop_after_failure()

    def shrink_chunk(self, req: Request, num_tokens: int) -> int | None:
        self._check("shrink_chunk", req)
        return self.inner.shrink_chunk(req, num_tokens)

    def retention(self, session: Session, req: Request) -> Retention:
        self._check("retention", session, req)
        return self.inner.retention(session, req)

    def stable_until(self, waiting: Sequence[Request]) -> float:
        self._check("stable_until", waiting)
        return self.inner.stable_until(waiting)

    def on_tick(self) -> None:
        assert self.ctx is not None
        self._check("on_tick", list(self.ctx.sessions.values()))
        self.inner.on_tick()

    def order_admission(self, queued: Sequence[Session]) -> Sequence[Session]:
        self._check("order_admission", queued)
        return self.inner.order_admission(queued)

    def admit(self, session: Session) -> Admission:
        self._check("admit", session)
        return self.inner.admit(session)


def _agentic_specs(tail: int = 0) -> list[SessionSpec]:
    """Six sessions of five calls with heavy and light tools; a nonzero `tail` changes every
    call from the third on (prompt, output, tool durations) and nothing before."""
    specs = []
    for i in range(6):
        turns = []
        prompt, prev = 600 + 150 * i, 0
        for k in range(5):
            extra = tail if k >= 2 else 0
            p = prompt + 900 * extra
            out = 30 + 7 * i + 11 * k + 13 * extra
            heavy = (i + k) % 2 == 1
            seconds = (0.4 + 0.3 * k) * (1 + 2 * extra)
            tools = (
                ()
                if k == 4
                else (ToolSpec("test" if heavy else "view", heavy, seconds, "measured"),)
            )
            turns.append(TurnSpec(p, out, prev, tools))
            prev = p + out
            prompt = prev + 150 + 30 * i
        specs.append(SessionSpec(f"s{i:04d}", f"traj/{i}", tuple(turns)))
    return specs


@pytest.mark.parametrize("name", policy_names())
def test_policy_sees_only_the_past(name: str) -> None:
    specs = _agentic_specs()
    sim_ref: list[Simulation] = []
    spy = FutureCheck(make_policy(name), sim_ref)
    # Tight KV: preemptions and evictions happen, so pick_victim is exercised too.
    config = SimConfig(kv_tokens=3072, tool_cores=2, max_num_batched_tokens=1024)
    sim = Simulation(specs, spy, COST, Arrivals(concurrency=4), config)
    sim_ref.append(sim)
    out = sim.run()
    assert all(r.done_s is not None for r in out.records)
    assert out.preemptions > 0
    for method in (
        "order_waiting",
        "order_running",
        "pick_victim",
        "retention",
        "order_admission",
        "admit",
    ):
        assert spy.calls[method] > 0, method
    assert spy.objects > 50  # the walk did reach the sessions, requests and tool calls


def test_the_walk_finds_future_objects() -> None:
    spec = make_spec([(10, 2, 0, 1.0)])
    found = [o for o in reachable([{"x": [(spec,)]}]) if isinstance(o, FUTURE_TYPES)]
    assert {type(o) for o in found} == {SessionSpec, TurnSpec, ToolSpec}
    # Through a closure, and through a bus handler bound to the simulation.
    assert any(isinstance(o, SessionSpec) for o in reachable([lambda: spec]))
    sim = Simulation([spec], FCFSPolicy(), COST, Arrivals(concurrency=1))
    sim.bus.subscribe(SessionDone, sim._finish_session)
    assert any(isinstance(o, SessionSpec) for o in reachable([sim.policy]))


@pytest.mark.parametrize("name", policy_names())
def test_decisions_do_not_depend_on_future_turns(name: str) -> None:
    def run(tail: int) -> list[Event]:
        # Every variant fits (max context 5724), so none is rejected up front.
        config = SimConfig(kv_tokens=5760, tool_cores=2, max_num_batched_tokens=1024)
        _, events = recorded(
            _agentic_specs(tail),
            arrivals=Arrivals(concurrency=4),
            config=config,
            policy=make_policy(name),
        )
        return events

    base, changed = run(0), run(1)
    # The first call that differs: turn index 2 of some session.
    cut = min(e.time for e in changed if isinstance(e, RequestEmit) and e.request_id.endswith("-2"))
    assert cut > 0
    before = [e for e in base if e.time < cut]
    assert before == [e for e in changed if e.time < cut]
    assert len(before) > 50
    assert base != changed


# ---- rejection ------------------------------------------------------------------------------


def test_session_that_can_never_fit_is_rejected() -> None:
    big = make_spec([(800, 10, 0, 0.5), (1100, 20, 810, -1.0)], sid="big")  # 1120 tokens
    small = [make_spec([(300, 5, 0, 0.5), (400, 5, 305, -1.0)], sid=f"s{i}") for i in range(2)]
    config = SimConfig(kv_tokens=1024)
    for arrivals in (Arrivals(concurrency=1), Arrivals(times=(0.0, 0.0, 1.0))):
        out = run_sim([small[0], big, small[1]], arrivals, config)
        rec = {r.session_id: r for r in out.records}
        assert rec["big"].rejected and rec["big"].done_s is None
        assert rec["big"].arrival_s == (rec["s0"].done_s if arrivals.concurrency else 0.0)
        assert not rec["s0"].rejected and rec["s0"].done_s is not None
        assert not rec["s1"].rejected and rec["s1"].done_s is not None
        if arrivals.concurrency:  # closed loop: the next session starts at once
            assert rec["s1"].arrival_s == rec["s0"].done_s
    # A context beyond the model's limit is rejected however large the KV.
    huge = make_spec([(COST.max_model_len, 1, 0, -1.0)], sid="huge")
    out = run_sim([huge], Arrivals(concurrency=1), SimConfig(kv_tokens=2 * COST.max_model_len))
    assert out.records[0].rejected


def test_rejected_sessions_are_counted_in_results() -> None:
    too_big = make_spec([(COST.kv_capacity_tokens + 1000, 5, 0, -1.0)], sid="s0001")
    ok = [make_spec([(2000, 20, 0, 1.0), (2300, 10, 2020, -1.0)], sid=f"s{i:04d}") for i in (0, 2)]
    spec = SimSpec("unused.jsonl", concurrency=1)
    result = run_experiment(spec, specs=[ok[0], too_big, ok[1]])
    assert result["sessions"] == 3 and result["rejected"] == 1 and result["completed"] == 2
    per = {p["session_id"]: p for p in result["per_session"]}
    assert per["s0001"]["rejected"] and per["s0001"]["latency_s"] is None
    assert per["s0000"]["slowdown"] == 1.0  # alone on the system
    assert result["goodput"]["fraction"] == 1.0


def test_session_just_over_block_capacity_is_rejected() -> None:
    # kv_tokens 1000 -> 62 blocks of 16 = 992 tokens; 1000 tokens of context need 999 of KV.
    spec = make_spec([(990, 10, 0, -1.0)])
    out = run_sim([spec], Arrivals(concurrency=1), SimConfig(kv_tokens=1000))
    assert out.records[0].rejected or out.records[0].done_s is not None


@needs_traces
def test_kv_tight_trace_workload_runs() -> None:
    spec = SimSpec(str(TRACES), concurrency=16, sessions=40, kv_scale=0.2)
    result = run_experiment(spec)
    assert result["completed"] + result["rejected"] == 40


# ---- metrics --------------------------------------------------------------------------------


def test_percentile_linear_interpolation() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 90) == pytest.approx(3.7, abs=1e-12)  # k = 2.7
    assert percentile(xs, 25) == pytest.approx(1.75, abs=1e-12)  # k = 0.75
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) == 0.0
    assert percentile(list(range(101)), 95) == 95


def test_steady_throughput() -> None:
    done = [float(t) for t in range(1, 11)]
    # p20 = 2.8, p80 = 8.2: completions 3..8 (6 of them) over 5.4 s.
    assert steady_throughput(done) == pytest.approx(6 / 5.4, rel=1e-12)
    # A slow tail and a burst at the start do not count.
    done = [0.0, 0.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 100.0, 500.0]
    lo, hi = 0.0 + 0.8 * 10.0, 15.0 + 0.2 * 85.0  # p20 (k=1.8), p80 (k=7.2)
    assert steady_throughput(done) == pytest.approx(6 / (hi - lo), rel=1e-12)
    assert steady_throughput([5.0]) == 0.0 and steady_throughput([3.0, 3.0, 3.0]) == 0.0


def test_goodput_and_summary() -> None:
    sessions = [
        SessionResult("a", 0.0, 3.0, 1.0, 10),  # slowdown exactly 3: counts
        SessionResult("b", 1.0, 4.0, 1.5, 20),  # 2.0
        SessionResult("c", 2.0, 8.0, 1.999, 30),  # 3.0015: does not count
        SessionResult("d", 2.0, 12.0, 10.0, 40),  # 1.0
        SessionResult("e", 3.0, None, None, 0, rejected=True),
    ]
    out = summarize(sessions)
    assert (out["sessions"], out["completed"], out["rejected"]) == (5, 4, 1)
    assert out["span_s"] == 12.0
    assert out["goodput"]["fraction"] == 3 / 4
    assert out["goodput"]["per_s"] == pytest.approx(3 / 12.0)
    assert out["throughput"]["sessions_per_s"] == pytest.approx(4 / 12.0)
    assert out["throughput"]["output_tokens_per_s"] == pytest.approx(100 / 12.0)
    assert out["latency_s"]["mean"] == pytest.approx((3 + 3 + 6 + 10) / 4)
    assert out["latency_s"]["p50"] == pytest.approx(4.5)
    assert out["slowdown"]["p50"] == pytest.approx((2.0 + 3.0) / 2)
    assert sessions[2].slowdown == pytest.approx(6 / 1.999)
    assert summarize(sessions, alpha=2.0)["goodput"]["fraction"] == 2 / 4


def test_result_json_keys() -> None:
    spec = SimSpec("unused.jsonl", rate=0.01, arrival="fixed")
    result = run_experiment(spec, specs=[spec_with_tools("s0000"), spec_with_tools("s0001")])
    for key in ("policy", "executor", "workload", "sessions", "completed", "rejected"):
        assert key in result
    assert set(result["latency_s"]) == {"mean", "p50", "p90", "p95", "p99"}
    assert {"alpha", "fraction", "per_s"} <= set(result["goodput"])
    assert {"sessions_per_s", "steady_sessions_per_s", "output_tokens_per_s"} <= set(
        result["throughput"]
    )
    assert {"recomputed_prefill_tokens", "hit_rate", "evictions", "offloads", "restores"} <= set(
        result["kv"]
    )
    assert {"mean_tool_queue_wait_s", "utilization"} <= set(result["cpu"])
    # Arrivals 100 s apart: each session runs alone, slowdown 1 (up to float offsets).
    assert result["slowdown"]["mean"] == pytest.approx(1.0, rel=1e-12)
    assert result["goodput"]["alpha"] == 3.0 and result["goodput"]["fraction"] == 1.0
    assert result["executor"] == "sim" and result["policy"] == "fcfs"
