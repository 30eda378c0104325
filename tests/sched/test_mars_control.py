"""`mars`'s control plane beyond the window: the tool-queue-wait signal, the load balancer's
modes, and the opportunistic co-scheduler's warm restores."""

from __future__ import annotations

from factories import make_request
from mars.control.balancer import BalancerMode, order_sessions
from mars.control.signals import ToolQueueWait
from mars.core.clock import SimClock
from mars.core.events import EventBus, ToolEnd, ToolEnqueued, ToolStart
from mars.core.session import Session, SessionStatus, ToolCall, Turn
from mars.kv.manager import KVConfig, KVManager, Residency, Retention
from mars.sched.policies.mars import MarsPolicy
from mars.sched.policy import Admission
from mars.sched.scheduler import Scheduler, SchedulerConfig


def _bound(
    num_blocks: int = 64, host_tokens: int = 0
) -> tuple[MarsPolicy, Scheduler, SimClock, EventBus]:
    clock, bus = SimClock(), EventBus()
    policy = MarsPolicy()
    kv = KVManager(KVConfig(num_blocks, 4, host_tokens), clock, bus)
    sched = Scheduler(SchedulerConfig(64, 16), policy, kv, clock, bus, {}, None, tool_workers=4)
    return policy, sched, clock, bus


def test_queue_wait_average_follows_starts_in_queue_order() -> None:
    wait = ToolQueueWait(alpha=0.5)
    wait.enqueued(ToolEnqueued(0.0, "a", "test", True))
    wait.enqueued(ToolEnqueued(1.0, "a", "test", True))
    assert wait.oldest_wait(3.0) == 3.0  # nothing started yet: the stall still shows
    wait.started(ToolStart(4.0, "a", "test"))  # waited 4 s
    assert wait.value == 4.0
    wait.started(ToolStart(9.0, "a", "test"))  # waited 8 s
    assert wait.value == 6.0 and wait.oldest_wait(9.0) == 0.0
    wait.started(ToolStart(10.0, "b", "test"))  # never queued (a pool with no queue)
    assert wait.value == 6.0


def test_tool_queue_wait_overloads_the_window_with_hysteresis() -> None:
    policy, _, clock, bus = _bound()
    for i in range(3):
        bus.publish(ToolEnqueued(0.0, f"s{i}", "test", True))
        bus.publish(ToolStart(6.0, f"s{i}", "test"))
    clock.advance(6.0)
    policy.on_tick()
    assert policy.cpu_overloaded() and policy.window == policy.window_start * policy.window_dec
    for i in range(20):  # short waits pull the average down below the clear mark
        bus.publish(ToolEnqueued(6.0, f"t{i}", "test", True))
        bus.publish(ToolStart(6.1, f"t{i}", "test"))
    assert policy.queue_wait.value < policy.queue_wait_low
    assert not policy.cpu_overloaded()


def _queued(sid: str, tokens: int, arrival: float) -> Session:
    return Session(sid, arrival, status=SessionStatus.QUEUED, first_prompt_tokens=tokens)


def test_balancer_orders_by_mode_and_parks_very_long_sessions() -> None:
    q = [_queued("a", 9000, 0.0), _queued("huge", 60_000, 1.0), _queued("b", 2000, 2.0)]
    ids = lambda order: [s.session_id for s in order]  # noqa: E731
    assert ids(order_sessions(q, BalancerMode.ARRIVAL, 50_000)) == ["a", "huge", "b"]
    assert ids(order_sessions(q, BalancerMode.SHORT_FIRST, 50_000)) == ["b", "a", "huge"]
    assert ids(order_sessions(q, BalancerMode.LONG_FIRST, 50_000)) == ["a", "b", "huge"]


def test_the_balancer_ages_sizes_so_big_sessions_are_not_starved() -> None:
    def order(mode: BalancerMode, now: float, aging_s: float | None = 60.0) -> list[str]:
        # A big and a very long session queued at 0; a small one that arrives just now.
        q = [_queued("big", 9000, 0.0), _queued("huge", 60_000, 0.0), _queued("new", 2000, now)]
        return [s.session_id for s in order_sessions(q, mode, 50_000, now, aging_s)]

    short, long_ = BalancerMode.SHORT_FIRST, BalancerMode.LONG_FIRST
    assert order(short, 0.0) == ["new", "big", "huge"]
    # After 300 s, 9,000 tokens rank as 1,500 and 60,000 as 10,000 (out of the tail).
    assert order(short, 300.0) == ["big", "new", "huge"]
    assert order(short, 1800.0) == ["big", "huge", "new"]  # 60,000 / 31 < 2,000
    assert order(short, 1800.0, aging_s=None) == ["new", "big", "huge"]  # no aging
    # Long first ages the other way (the sizes grow) and keeps the tail on the real size.
    assert order(long_, 0.0) == ["big", "new", "huge"]
    assert order(long_, 1800.0) == ["big", "new", "huge"]
    assert order(long_, 0.0, aging_s=None) == ["big", "new", "huge"]


def test_mars_picks_the_balancer_mode_from_its_signals() -> None:
    policy, _, _, _ = _bound(num_blocks=64)  # 256 tokens of KV
    small = [_queued("a", 40, 0.0), _queued("b", 30, 1.0)]
    assert policy.balancer_mode(small) is BalancerMode.ARRIVAL  # healthy, all fits
    big = [*small, _queued("c", 300, 2.0)]
    assert policy.balancer_mode(big) is BalancerMode.SHORT_FIRST  # not everything fits
    assert [s.session_id for s in policy.order_admission(big)] == ["b", "a", "c"]
    policy._cpu_overloaded = True
    assert policy.balancer_mode(small) is BalancerMode.LONG_FIRST


def _in_tool(sched: Scheduler, sid: str, category: str, started: float) -> Session:
    """A session whose first call (41 tokens) ended in `category`; its KV to be offloaded."""
    req = make_request(prompt=40, output=1, session=sid)
    session = sched.sessions[sid] = Session(sid, 0.0, status=SessionStatus.TOOL)
    session.turns.append(Turn(req))
    kv = sched.kv
    kv.begin(req)
    kv.allocate(req, 41)
    req.num_computed_tokens = 41
    kv.finish(req, Retention.OFFLOAD)
    session.turns[-1].tools.append(ToolCall(category, True, started))
    return session


def _evict_everything(sched: Scheduler) -> None:
    filler = make_request(prompt=256, output=1, session="filler")
    sched.kv.begin(filler)
    assert sched.kv.allocate(filler, 256) is not None  # every block: the cached copies go
    sched.kv.free(filler)
    sched.kv.end_session("filler")


def test_co_scheduler_restores_sessions_whose_tool_is_about_to_end() -> None:
    policy, sched, clock, bus = _bound(num_blocks=64, host_tokens=10_000)
    bus.publish(ToolEnd(0.0, "x", "test", 2.0, 0.0))  # tests take 2 s
    bus.publish(ToolEnd(0.0, "x", "build_install", 30.0, 0.0))  # builds 30 s
    for sid, category in (("soon", "test"), ("late", "build_install")):
        _in_tool(sched, sid, category, started=0.0)
    _evict_everything(sched)  # written back to the host on eviction
    assert sched.kv.residency("soon") is Residency.HOST
    assert sched.kv.residency("late") is Residency.HOST
    assert policy.prefetch() == []  # no control tick yet: the co-scheduler has not looked
    clock.advance(1.5)
    policy.on_tick()
    assert policy.prefetch() == ["soon"]  # expected end at 2 s, within 1 s; the build is not
    assert policy.prefetch() == []  # once a tick
    policy.coschedule = False
    policy.on_tick()
    assert policy.prefetch() == []


def test_scheduler_runs_the_warm_restore_in_a_step_with_slack() -> None:
    policy, sched, clock, bus = _bound(num_blocks=64, host_tokens=10_000)
    bus.publish(ToolEnd(0.0, "x", "test", 2.0, 0.0))
    _in_tool(sched, "soon", "test", started=0.0)
    _evict_everything(sched)
    assert sched.kv.residency("soon") is Residency.HOST
    clock.advance(1.5)
    policy.on_tick()
    other = make_request(prompt=8, output=2, session="other")
    sched.sessions["other"] = Session("other", 0.0)
    sched.sessions["other"].turns.append(Turn(other))
    sched.add_request(other)
    plan = sched.schedule()
    assert plan.prefetches == [("soon", 40)] and plan.requests == [other]
    assert sched.kv.residency("soon") is Residency.CACHED
    sched.kv.check_integrity()


def _answered(sched: Scheduler, sid: str, tokens: int, at: float) -> Session:
    """A session admitted at `at` whose one call (of `tokens`) ended then, as a real agent's
    does: it never says that it is done."""
    req = make_request(prompt=tokens - 1, output=1, session=sid)
    req.finish_time, req.next_tool = at, "unknown"
    session = sched.sessions[sid] = Session(sid, at, status=SessionStatus.TOOL)
    session.admitted_time = at
    session.turns.append(Turn(req))
    return session


def test_sessions_that_never_end_stop_counting_and_the_window_recovers() -> None:
    """The real-agents lock-out (issue: an idle server locks new sessions out): five sessions
    of one call each, never ended, held the footprint over capacity, the window at its minimum
    and every new session out. Away longer than the learned time away, without their KV, they
    stop counting; one that calls again counts again at once."""
    policy, sched, clock, _ = _bound(num_blocks=64)  # 256 tokens of KV
    for i in range(5):
        _answered(sched, f"agent-{i}", 100, at=0.0)
    for _ in range(10):  # 500 tokens of context against 256: overloaded, the window shrinks
        policy.on_tick()
    assert policy.window == policy.window_min
    new = _queued("agent-5", 100, 0.0)
    assert policy.admit(new) is Admission.DEFER
    clock.advance(max(policy.dormant_after * 1.0, policy.dormant_floor_s) + 0.1)  # 1 s: unlearned
    assert policy.dormant(sched.sessions["agent-0"], clock.now())
    assert policy.admit(new) is Admission.ADMIT  # nobody occupies anything any more
    assert policy.footprint() == 0.0
    for _ in range(100):  # healthy and idle: the window grows back to its start, no further
        clock.advance(policy.tick_s or 0.2)
        policy.on_tick()
    assert policy.window == policy.window_start
    back = sched.sessions["agent-1"]
    back.status = SessionStatus.LLM  # it called again
    assert not policy.dormant(back, clock.now())
    assert len(policy._active()) == 1


def test_a_pinned_session_never_goes_dormant() -> None:
    policy, sched, clock, _ = _bound(num_blocks=64)
    session = _answered(sched, "pinned", 40, at=0.0)
    policy._pins["pinned"] = 1e9
    clock.advance(1000.0)
    assert not policy.dormant(session, clock.now())
