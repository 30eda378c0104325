"""Policies cannot see the future: no spec object is reachable from anything a policy is
handed, and workloads that agree up to a point get the same decisions up to it."""

from __future__ import annotations

import collections
import gc
import types
from collections.abc import Sequence

import pytest

from factories import make_spec
from mars.core.errors import UsageError
from mars.core.events import (
    Event,
    RequestEmit,
    SessionDone,
)
from mars.core.request import Request
from mars.core.session import Session, ToolCall
from mars.kv.manager import Retention
from mars.sched.policies.fcfs import FCFSPolicy
from mars.sched.policy import Admission, Policy, PolicyContext
from mars.sched.registry import make_policy, policy_names
from mars.sim.run import Arrivals, SimConfig, Simulation
from mars.sim.workload import SessionSpec, ToolSpec, TurnSpec
from sim_helpers import COST, recorded

# ---- policies cannot see the future ---------------------------------------------------------

# `oracle` is exempt by name: a clairvoyant bound, handed the future on purpose (and refused by
# every engine but the simulator).
ONLINE = [name for name in policy_names() if name != "oracle"]

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

    def prefetch(self) -> Sequence[str]:
        assert self.ctx is not None
        self._check("prefetch", list(self.ctx.sessions.values()))
        return self.inner.prefetch()

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


@pytest.mark.parametrize("name", ONLINE)
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


@pytest.mark.parametrize("name", ONLINE)
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


def test_only_the_simulator_runs_the_oracle_and_it_reads_the_future() -> None:
    with pytest.raises(UsageError, match="bound for the simulator"):
        make_policy("oracle")  # what mars serve, the gateway and the vLLM plug-in call
    specs = _agentic_specs()
    oracle = make_policy("oracle", simulated=True)
    config = SimConfig(kv_tokens=3072, tool_cores=2, max_num_batched_tokens=1024)
    out = Simulation(specs, oracle, COST, Arrivals(concurrency=4), config).run()
    assert all(r.done_s is not None for r in out.records)
    future = oracle.future  # type: ignore[attr-defined]
    assert set(future) == {s.session_id for s in specs}
    spec = specs[0]
    assert future[spec.session_id].tool_time_s == tuple(t.tool_time_s for t in spec.turns)
    assert future[spec.session_id].peak_context(0) == spec.max_context
