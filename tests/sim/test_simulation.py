"""The discrete-event simulator end to end: ideal times, hand-computed step sums, processor-sharing
tools, event tie-breaks, light-load slowdown, determinism, fast-forward parity, policies blind to
the future, rejection of sessions that can never fit, and the metric functions."""

from __future__ import annotations

import collections
import json
import math

import pytest

from factories import TRACES, make_spec
from mars.bench.metrics import SessionResult, percentile, steady_throughput, summarize
from mars.core.events import (
    Event,
    GpuEnd,
    GpuFirstToken,
    GpuPreempt,
    GpuSubmit,
    KvEvict,
    RequestEmit,
    ToolEnd,
)
from mars.sched.policies.fcfs import FCFSPolicy
from mars.sched.registry import policy_names
from mars.sim.experiment import SimSpec, ideal_times, load_specs, run_experiment
from mars.sim.run import Arrivals, SimConfig, Simulation, _Ev
from mars.sim.workload import SessionSpec, WorkloadConfig, build_workload
from sim_helpers import COST, needs_traces, recorded, run_sim, spec_with_tools

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


@pytest.mark.parametrize("workers", [1, 2])
def test_tool_workers_queue_first_in_first_out(workers: int) -> None:
    # Four sessions end their first call in the same step; each tool (2 s, light or heavy)
    # holds a worker, so with W workers the k-th in line waits (k // W) * 2 s plus the
    # overhead of the runs before it, runs for 2 s + overhead, and the queue wait reaches
    # the events, the ToolCall and the result's mean.
    overhead = 0.25
    specs = [_two_turns(f"s{i}", 2.0, heavy=i % 2 == 0) for i in range(4)]
    config = SimConfig(tool_cores=4, tool_workers=workers, tool_overhead_s=overhead)
    out, events = recorded(specs, config=config)
    ends = {e.session_id: e for e in events if isinstance(e, ToolEnd)}
    waits = [ends[f"s{k}"].queue_wait_s for k in range(4)]  # s0..s3 asked in that order
    run = 2.0 + overhead
    assert waits == [pytest.approx((k // workers) * run, abs=1e-9) for k in range(4)]
    ends = list(ends.values())
    assert all(e.duration_s == pytest.approx(run, rel=1e-9) for e in ends)
    enqueued = [e for e in events if type(e).__name__ == "ToolEnqueued"]
    assert len(enqueued) == 4
    assert out.tool_runs == 4
    assert out.tool_queue_wait_s == pytest.approx(sum(waits), rel=1e-9)
    assert all(r.done_s is not None for r in out.records)


def test_no_tool_workers_means_no_queue() -> None:
    specs = [_two_turns(f"s{i}", 2.0, heavy=False) for i in range(4)]
    out, events = recorded(specs, config=SimConfig())
    ends = [e for e in events if isinstance(e, ToolEnd)]
    assert [e.queue_wait_s for e in ends] == [0.0] * 4
    assert not [e for e in events if type(e).__name__ == "ToolEnqueued"]
    assert out.tool_queue_wait_s == 0.0


def test_tool_workers_are_validated() -> None:
    with pytest.raises(ValueError, match="tool_workers"):
        SimConfig(tool_workers=0)
    with pytest.raises(ValueError, match="tool_overhead_s"):
        SimConfig(tool_overhead_s=-1.0)


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


def test_time_split_adds_up_and_shows_decode_contention() -> None:
    from mars.sim.experiment import time_split

    def spec(sid: str) -> SessionSpec:
        return make_spec([(2000, 300, 0, 2.0), (2400, 300, 2300, -1.0)], sid=sid)

    alone = run_sim([spec("a")])
    pair = run_sim([spec("a"), spec("b")])  # both arrive at once and decode together
    one, two = time_split(alone.records), time_split(pair.records)
    for split, out in ((one, alone), (two, pair)):
        mean = sum(r.latency_s or 0.0 for r in out.records) / len(out.records)
        parts = ("admission_wait_s", "call_wait_s", "prefill_s", "decode_s", "tools_and_agent_s")
        assert math.isclose(sum(split[k] for k in parts), mean)
        assert split["tools_and_agent_s"] == pytest.approx(2.0)  # the one 2 s tool
        assert split["decode_s"] > 0 and split["prefill_s"] > 0
    assert two["decode_s_per_token"] > 1.2 * one["decode_s_per_token"]  # a batch of 2 is slower


@pytest.mark.parametrize("fast_forward", [True, False])
def test_a_shared_system_prompt_is_computed_once_per_framework(fast_forward: bool) -> None:
    # Four sessions of one trajectory group and one of another: with 2,000 shared leading
    # tokens, the first computes them and the others of its group, arriving while it runs its
    # first tool (a finished call's blocks are shared, a running call's are not), reuse them.
    specs = [spec_with_tools(f"s{i}") for i in range(4)]
    other = spec_with_tools("s9")
    specs.append(SessionSpec(other.session_id, "other/s9", other.turns))
    arrivals = Arrivals(times=(0.0, 2.0, 2.1, 2.2, 2.3))
    alone = run_sim(specs, arrivals, SimConfig(fast_forward=fast_forward))
    shared = run_sim(
        specs, arrivals, SimConfig(fast_forward=fast_forward, shared_prefix_tokens=2000)
    )
    assert alone.shared_tokens == 0
    # s1-s3 reuse s0's first 2,000 tokens; s9 is of another group and shares nothing with them.
    assert shared.shared_tokens == 3 * 2000
    assert shared.hit_tokens == alone.hit_tokens + 3 * 2000
    assert sum(r.prefill_s for r in shared.records) < sum(r.prefill_s for r in alone.records)
