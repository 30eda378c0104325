"""What `mars`'s decisions cost per engine step, against the step they schedule.

256 sessions decode (vLLM's sequence limit), their contexts filling the GPU's KV, while 1,000 more
sessions' calls wait in the engine queue (the worst case for the priority coordinator, which
orders the waiting queue every step) and another 1,000 wait for admission in the control plane.
Each step is timed around `schedule()` + `update()` (every policy call inside: ordering, chunk
sizes, victims, the co-scheduler's look) and, once per 0.2 s control tick, `on_tick()` + the
admission queue's poll; the predicted step time is the H100 + Qwen3-Coder-30B-A3B roofline's for
the same batch. Prints p50/p99 of each and their share of the step; JSON to --out.

    .venv/bin/python scripts/bench_policy_overhead.py [--steps 2000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from mars.control.admission import AdmissionQueue
from mars.core.clock import SimClock
from mars.core.events import EventBus
from mars.core.request import Request
from mars.core.session import Session, SessionStatus, Turn
from mars.kv.manager import KVConfig, KVManager
from mars.sched.plan import StepResult
from mars.sched.policies.mars import MarsPolicy
from mars.sched.scheduler import Scheduler, SchedulerConfig
from mars.sim.costmodel import CostModel, resolve_gpu, resolve_model
from mars.sim.executor import SimExecutor

RUNNING, WAITING, QUEUED = 256, 1000, 1000


def _pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/bench_policy_overhead.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    cost = CostModel(resolve_gpu("h100"), resolve_model("qwen3-coder-30b-a3b"))
    executor = SimExecutor(cost)
    clock, bus = SimClock(), EventBus()
    # The running contexts fill the preset's KV (111K tokens: ~430 a session), so the predicted
    # step is one this GPU could really run; room for the decoded tokens is added, so that no
    # preemption changes the batch during the measurement.
    capacity = cost.kv_capacity_tokens
    contexts = [rng.randint(64, 2 * capacity // RUNNING - 96) for _ in range(RUNNING)]
    kv = KVManager(KVConfig((capacity + RUNNING * (args.steps + 32)) // 16, 16, 10**9), clock, bus)
    policy = MarsPolicy()
    sessions: dict[str, Session] = {}
    sched = Scheduler(SchedulerConfig(8192, RUNNING), policy, kv, clock, bus, sessions, cost, 8)

    def add(sid: str, prompt: int, output: int, turn: int) -> Request:
        req = Request(f"{sid}-{turn}", sid, prompt, output, 0, clock.now(), turn)
        session = sessions[sid] = Session(sid, clock.now(), status=SessionStatus.LLM)
        session.admitted_time = clock.now()
        session.turns.append(Turn(req))
        sched.add_request(req)
        return req

    for i, c in enumerate(contexts):  # prefilled and decoding
        req = add(f"run{i}", c, 1_000_000, rng.randint(1, 40))
        assert kv.start(req, c) is not None
        req.num_computed_tokens, req.num_output_tokens = c, 1
    sched.running, sched.waiting = list(sched.waiting), []
    for r in sched.running:
        r.status = r.status.RUNNING
    for i in range(WAITING):
        add(f"wait{i}", rng.randint(2_000, 30_000), 500, rng.randint(0, 40))
    queue = AdmissionQueue(policy, clock, bus, lambda s: None)
    for i in range(QUEUED):
        queue._queued.append(
            Session(
                f"q{i}",
                clock.now(),
                status=SessionStatus.QUEUED,
                first_prompt_tokens=rng.randint(1_000, 60_000),
            )
        )
    policy.window = float(RUNNING + WAITING)  # full: the queue is asked and says no

    decide, steps, ticks, order = [], [], [], []
    next_tick = 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        result = executor.execute(plan)
        t2 = time.perf_counter()
        clock.advance(result.duration_s)
        sched.update(plan, StepResult(plan.step_id, result.duration_s))
        t3 = time.perf_counter()
        decide.append((t1 - t0) + (t3 - t2))
        # With every slot taken the scheduler skips the waiting queue (as vLLM); had one freed,
        # the priority coordinator would order all 1,000 of them first: timed apart.
        t5 = time.perf_counter()
        policy.order_waiting(sched.waiting)
        order.append(time.perf_counter() - t5)
        steps.append(result.duration_s)
        if clock.now() >= next_tick:
            t4 = time.perf_counter()
            policy.on_tick()
            queue.poll()
            ticks.append(time.perf_counter() - t4)
            next_tick = clock.now() + policy.tick_s
    assert len(sched.running) == RUNNING and len(sched.waiting) == WAITING

    step_p50 = statistics.median(steps)
    out = {
        "running": RUNNING,
        "waiting": WAITING,
        "queued_for_admission": QUEUED,
        "steps": args.steps,
        "decision_ms_p50": 1e3 * _pct(decide, 50),
        "decision_ms_p99": 1e3 * _pct(decide, 99),
        "order_waiting_ms_p50": 1e3 * _pct(order, 50),
        "order_waiting_ms_p99": 1e3 * _pct(order, 99),
        "tick_ms_p50": 1e3 * _pct(ticks, 50),
        "tick_ms_p99": 1e3 * _pct(ticks, 99),
        "ticks": len(ticks),
        "predicted_step_ms_p50": 1e3 * step_p50,
        "share_p50": _pct(decide, 50) / step_p50,
        "share_p99": _pct(decide, 99) / step_p50,
        # A tick every 0.2 s is spread over the steps it spans.
        "tick_share": statistics.fmean(ticks) / policy.tick_s,
        "machine": platform.processor() or platform.machine(),
    }
    o = out
    print(f"mars, {RUNNING} decoding + {WAITING} waiting + {QUEUED} queued, {args.steps} steps")
    print(
        f"  decisions per step   p50 {o['decision_ms_p50']:.2f} ms  p99 {o['decision_ms_p99']:.2f}"
    )
    print(f"  predicted step       p50 {o['predicted_step_ms_p50']:.2f} ms (h100, qwen3-coder)")
    print(f"  share of the step    p50 {o['share_p50']:.1%}  p99 {o['share_p99']:.1%}  (goal < 5%)")
    print(
        f"  ordering 1,000 waiting (when a slot is free)  p50 {o['order_waiting_ms_p50']:.2f} ms"
        f"  p99 {o['order_waiting_ms_p99']:.2f}"
    )
    print(
        f"  control tick         p50 {o['tick_ms_p50']:.2f} ms  p99 {o['tick_ms_p99']:.2f}"
        f" every {policy.tick_s} s = {o['tick_share']:.2%} of the time"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
