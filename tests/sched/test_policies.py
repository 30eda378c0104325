"""Decision-level tests of the baseline policies, on a scheduler with a hand-driven clock."""

from __future__ import annotations

from factories import add_session, make_request, make_scheduler, run_until_idle
from mars.core.clock import SimClock
from mars.core.events import ToolEnd
from mars.kv.manager import Residency
from mars.sched.policies.autellix import AutellixPolicy
from mars.sched.policies.continuum import ContinuumPolicy
from mars.sched.scheduler import Scheduler


def _finish_with_tool(sched: Scheduler, tool: str, sid: str = "a") -> None:
    req = make_request(prompt=40, output=3, session=sid)
    add_session(sched, req)
    sched.on_output_done = lambda r: setattr(r, "next_tool", tool)
    run_until_idle(sched)


def test_continuum_pins_for_the_ttl_then_releases() -> None:
    policy = ContinuumPolicy()
    sched = make_scheduler(policy=policy)
    _finish_with_tool(sched, "view")
    assert sched.kv.residency("a") is Residency.GPU  # pinned through the tool call
    clock = sched.clock
    assert isinstance(clock, SimClock)
    clock.advance(policy.ttl_s - 0.01)
    policy.on_tick()
    assert sched.kv.residency("a") is Residency.GPU
    clock.advance(0.02)
    policy.on_tick()
    assert sched.kv.residency("a") is Residency.CACHED  # the pin lapsed: ordinary cache


def test_continuum_drops_kv_before_a_tool_known_to_be_long() -> None:
    policy = ContinuumPolicy()
    sched = make_scheduler(policy=policy)
    for d in (5.0, 7.0):
        sched.bus.publish(ToolEnd(0.0, "x", "test", d, 0.0))
    _finish_with_tool(sched, "test")
    assert sched.kv.residency("a") is Residency.CACHED
    _finish_with_tool(sched, "view", sid="b")  # a category never seen: optimistic pin
    assert sched.kv.residency("b") is Residency.GPU


def test_continuum_serves_older_sessions_first() -> None:
    sched = make_scheduler(policy=ContinuumPolicy(), budget=64)
    old, young = make_request(prompt=60, session="old"), make_request(prompt=60, session="young")
    s_young = add_session(sched, young)
    s_old = add_session(sched, old)
    s_old.arrival_time, s_young.arrival_time = 0.0, 5.0
    plan = sched.schedule()
    assert plan.requests[0] is old  # the older session's call goes first despite queue order


def test_autellix_prefers_the_session_with_least_attained_service() -> None:
    policy = AutellixPolicy()
    sched = make_scheduler(policy=policy, budget=4096, num_blocks=4096)
    heavy = make_request(prompt=3000, output=2, session="heavy")
    add_session(sched, heavy)
    run_until_idle(sched)  # 'heavy' has now received > 2,048 tokens of service
    second = make_request(prompt=3100, output=2, reuse=3002, session="heavy", turn=1)
    light = make_request(prompt=50, output=2, session="light")
    add_session(sched, second)
    add_session(sched, light)
    assert policy.level(second) == 1 and policy.level(light) == 0
    assert list(policy.order_waiting(sched.waiting)) == [light, second]


def test_autellix_promotes_a_starving_request() -> None:
    policy = AutellixPolicy()
    sched = make_scheduler(policy=policy, budget=4096, num_blocks=4096)
    heavy = make_request(prompt=9000 // 4, output=2, session="h")
    add_session(sched, heavy)
    run_until_idle(sched)
    starving = make_request(prompt=2300, output=2, reuse=2252, session="h", turn=1)
    add_session(sched, starving)
    assert policy.level(starving) == 1
    clock = sched.clock
    assert isinstance(clock, SimClock)
    assert policy.stable_until(sched.waiting) == starving.arrival_time + policy.starvation_s
    clock.advance(policy.starvation_s + 0.1)
    assert policy.level(starving) == 0


class _Timer:
    """Step times from a fixed per-token prefill cost and host link, for hand-checked wastes."""

    def __init__(self, per_token_s: float, link_s_per_token: float) -> None:
        self.per_token_s, self.link = per_token_s, link_s_per_token

    def step_seconds(self, num_seqs: int, new_tokens: int, attn_pairs: int, kv: int) -> float:
        return new_tokens * self.per_token_s

    def transfer_seconds(self, num_tokens: int) -> float:
        return num_tokens * self.link


def _infercept(per_token_s: float, link: float, host_tokens: int) -> Scheduler:
    from mars.core.events import EventBus
    from mars.kv.manager import KVConfig, KVManager
    from mars.sched.policies.infercept import InferCeptPolicy
    from mars.sched.scheduler import SchedulerConfig

    clock, bus = SimClock(), EventBus()
    kv = KVManager(KVConfig(256, 4, host_tokens), clock, bus)
    policy = InferCeptPolicy()
    sched = Scheduler(
        SchedulerConfig(64, 16), policy, kv, clock, bus, {}, _Timer(per_token_s, link)
    )
    return sched


def test_infercept_picks_the_least_waste() -> None:

    # A long interception and a cheap host link: swapping wastes least.
    sched = _infercept(per_token_s=0.01, link=0.0001, host_tokens=10_000)
    sched.bus.publish(ToolEnd(0.0, "x", "test", 30.0, 0.0))
    _finish_with_tool(sched, "test")
    assert sched.kv.residency("a") is Residency.CACHED and sched.kv.offload_pending("a")
    # A short interception and a slow host link: preserving (pinning) wastes least.
    sched = _infercept(per_token_s=0.01, link=0.01, host_tokens=10_000)
    sched.bus.publish(ToolEnd(0.0, "x", "view", 0.001, 0.0))
    _finish_with_tool(sched, "view")
    assert sched.kv.residency("a") is Residency.GPU
    # No host room and a long interception: discard.
    sched = _infercept(per_token_s=0.0001, link=0.0001, host_tokens=0)
    sched.bus.publish(ToolEnd(0.0, "x", "test", 30.0, 0.0))
    _finish_with_tool(sched, "test")
    assert sched.kv.residency("a") is Residency.CACHED and sched.kv.stats().offloads == 0


def test_pins_give_way_when_nothing_else_can_free_kv() -> None:
    from mars.core.request import Request
    from mars.core.session import Session
    from mars.kv.manager import Retention
    from mars.sched.policies.fcfs import FCFSPolicy

    class PinAll(FCFSPolicy):
        def retention(self, session: Session, req: Request) -> Retention:
            return Retention.PIN

    sched = make_scheduler(policy=PinAll(), num_blocks=16, block_size=4, budget=64)
    _finish_with_tool(sched, "view")  # 'a' pins 42 of the 64 tokens of KV
    assert sched.kv.residency("a") is Residency.GPU
    other = make_request(prompt=40, output=2, session="b")
    add_session(sched, other)
    plan = sched.schedule()
    assert plan.requests == [other]  # started: a's pin was released instead of stalling
    assert sched.kv.residency("a") is Residency.CACHED
    sched.kv.check_integrity()


def test_mars_levels_victims_and_admission() -> None:
    from mars.core.session import Session, SessionStatus
    from mars.sched.policies.mars import MarsPolicy
    from mars.sched.policy import Admission

    policy = MarsPolicy()
    sched = make_scheduler(policy=policy, budget=64, num_blocks=256)
    first = make_request(prompt=500, output=2, session="new")
    cont = make_request(prompt=500, output=2, reuse=100, session="old", turn=3)
    add_session(sched, first)
    add_session(sched, cont)
    assert policy.level(cont) == 0 and policy.level(first) == 1  # continuations first
    assert list(policy.order_waiting(sched.waiting)) == [cont, first]
    plan = sched.schedule()
    assert plan.requests[0] is cont and plan.num_new_tokens[0] == 64  # level-0 quantum
    # A prefill that used whole quanta drops levels; decoding is always level 0.
    cont.num_computed_tokens = 64 + 32 + 16
    assert policy.level(cont) == 3
    # The victim is the lowest-priority prefill, never a decoding request.
    first.num_computed_tokens = 10
    decoding = make_request(prompt=8, output=5, session="d")
    decoding.num_computed_tokens, decoding.num_output_tokens = 9, 2
    assert policy.pick_victim([decoding, first, cont], cont) is cont
    assert policy.pick_victim([decoding], decoding) is decoding  # nothing else to take
    # Admission: a full window defers.
    policy.window = 2.0
    for sid in ("old", "new"):
        s = sched.sessions[sid]
        s.admitted_time, s.status = 0.0, SessionStatus.LLM
    assert policy.admit(Session("third", 0.0)) is Admission.DEFER
    policy.window = 3.0
    assert policy.admit(Session("third", 0.0)) is Admission.ADMIT


def test_continuum_dynamic_ttl_is_the_argmax() -> None:
    from mars.core.events import EventBus
    from mars.kv.manager import KVConfig, KVManager
    from mars.sched.policies.continuum import ContinuumDynamicPolicy
    from mars.sched.scheduler import SchedulerConfig

    clock, bus = SimClock(), EventBus()
    policy = ContinuumDynamicPolicy()
    kv = KVManager(KVConfig(256, 4), clock, bus)
    Scheduler(SchedulerConfig(64, 16), policy, kv, clock, bus, {}, _Timer(0.01, 0.0))
    assert policy.ttl("test", 100) is None  # cold: behaves as fixed-TTL continuum
    for d in (0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 3.0, 9.0):
        bus.publish(ToolEnd(0.0, "x", "test", d, 0.0))
    # reload(100 tokens) = 1 s, no queueing: score(0.5) = 0.8 - 0.5 = 0.3 beats
    # score(3.0) = 0.9 - 3 and score(9.0) = 1 - 9: pin for 0.5 s.
    assert policy.ttl("test", 100) == 0.5
    # A call too cheap to reload is never worth pinning.
    assert policy.ttl("test", 10) == 0.0


def test_mars_counts_cpu_heavy_tools_per_worker() -> None:
    from mars.core.events import EventBus
    from mars.core.session import Session, SessionStatus, ToolCall, Turn
    from mars.kv.manager import KVConfig, KVManager
    from mars.sched.policies.mars import MarsPolicy
    from mars.sched.scheduler import SchedulerConfig

    clock, bus = SimClock(), EventBus()
    policy = MarsPolicy()
    sessions: dict[str, Session] = {}
    kv = KVManager(KVConfig(64, 4), clock, bus)
    Scheduler(SchedulerConfig(64, 16), policy, kv, clock, bus, sessions, None, tool_workers=2)
    for i, (heavy, ended) in enumerate([(True, None), (True, None), (True, 1.0), (False, None)]):
        s = sessions[f"s{i}"] = Session(f"s{i}", 0.0, status=SessionStatus.TOOL)
        s.turns.append(Turn(make_request(session=f"s{i}")))
        s.turns[-1].tools.append(ToolCall("test", heavy, 0.0, ended))
    assert policy.cpu_load() == 1.0  # two heavy tools still running on two workers
    sessions["s3"].turns[-1].tools.append(ToolCall("test", True, 0.0))
    sessions["s4"] = Session("s4", 0.0, status=SessionStatus.TOOL)
    sessions["s4"].turns.append(Turn(make_request(session="s4")))
    sessions["s4"].turns[-1].tools.append(ToolCall("build_install", True, 0.0))
    assert policy.cpu_load() == 2.0
    policy.on_tick()
    assert policy.window == policy.window_start * policy.window_dec  # overloaded: decrease


def test_mars_pins_for_the_time_away_and_a_lapsed_pin_is_written_back() -> None:
    from mars.core.events import EventBus
    from mars.core.request import Request
    from mars.kv.manager import KVConfig, KVManager
    from mars.sched.policies.mars import MarsPolicy
    from mars.sched.scheduler import SchedulerConfig

    clock, bus = SimClock(), EventBus()
    policy = MarsPolicy()
    kv = KVManager(KVConfig(256, 4, 10_000), clock, bus)
    # A slow host link makes a restore dearer than a pin at this pressure: mars pins.
    sched = Scheduler(SchedulerConfig(64, 16), policy, kv, clock, bus, {}, _Timer(0.01, 1.0))
    bus.publish(ToolEnd(0.0, "x", "test", 0.1, 0.0))  # the tool itself runs 0.1 s
    _finish_with_tool(sched, "test")
    assert kv.residency("a") is Residency.GPU
    assert policy.expected_away("test") == 0.1  # nothing learned yet but the run time
    # The session calls again 1 s after its call ended (queue wait, more tools, the agent).
    clock.advance(1.0)
    add_session(sched, Request("a-1", "a", 60, 3, 40, clock.now(), 1))
    assert policy.expected_away("test") == 1.0
    run_until_idle(sched)
    assert kv.residency("a") is Residency.GPU  # pinned again, now for twice 1 s
    clock.advance(1.9)
    policy.on_tick()
    assert kv.residency("a") is Residency.GPU  # a run-time pin (0.2 s) would have lapsed
    clock.advance(0.2)
    policy.on_tick()
    # Lapsed: ordinary cache, but written back to host memory if it is evicted, not dropped.
    assert kv.residency("a") is Residency.CACHED and kv.offload_pending("a")
    kv.check_integrity()


def test_mars_footprint_counts_a_session_away_without_its_kv_by_its_duty() -> None:
    from mars.core.events import EventBus
    from mars.core.request import Request
    from mars.core.session import Session, SessionStatus, Turn
    from mars.kv.manager import KVConfig, KVManager
    from mars.sched.policies.mars import MarsPolicy
    from mars.sched.scheduler import SchedulerConfig

    clock, bus = SimClock(), EventBus()
    policy = MarsPolicy()
    policy.retention_on = False  # every call's KV is let go: nobody holds it while away
    kv = KVManager(KVConfig(256, 4), clock, bus)
    sched = Scheduler(SchedulerConfig(64, 16), policy, kv, clock, bus, {}, _Timer(0.01, 0.0))
    assert policy.duty() == 1.0  # nothing learned: every context counts whole
    # Session a: a 1 s call, 3 s away, another 1 s call: a quarter of its cycle is in calls.
    clock.advance(1.0)
    _finish_with_tool(sched, "test")
    clock.advance(3.0)
    add_session(sched, Request("a-1", "a", 60, 3, 40, clock.now(), 1))
    clock.advance(1.0)
    run_until_idle(sched)
    assert policy.duty() == 0.25
    a = sched.sessions["a"]
    a.admitted_time, a.status = 0.0, SessionStatus.TOOL
    assert kv.residency("a") is not Residency.GPU
    b = sched.sessions["b"] = Session("b", 0.0, SessionStatus.LLM, admitted_time=0.0)
    b.turns.append(Turn(make_request(prompt=400, session="b")))
    capacity = 256 * 4
    assert policy.footprint() == (400 + 0.25 * a.context_tokens) / capacity
    policy.duty_footprint = False  # whole contexts summed, as the prototype did
    assert policy.footprint() == (400 + a.context_tokens) / capacity
    # A session away that holds its KV (pinned) counts whole: it occupies it now.
    policy.duty_footprint, policy.retention_on = True, True
    add_session(sched, Request("a-2", "a", 80, 3, 60, clock.now(), 2))
    sched.on_output_done = lambda r: setattr(r, "next_tool", "test")
    run_until_idle(sched)
    a.status = SessionStatus.TOOL
    assert kv.residency("a") is Residency.GPU
    assert policy.footprint() == (400 + a.context_tokens) / capacity
