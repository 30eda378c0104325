"""The vLLM plug-in and mars's own scheduler decide alike on one recorded request stream.

One workload (the same session ids, prompt and output lengths, arrival order and `vllm_xargs`
markers) is replayed twice with the same sampled-token stream (every request that reaches the
end of its tokens samples token 7): through `MarsScheduler` on vLLM's real scheduler (the
harness's tiny config, hand-built model outputs) and through `mars.sched.scheduler.Scheduler`,
the embedded engine's scheduling path, with a fresh policy of the same type, a `KVManager` of the
same block size and usable blocks (vLLM's pool of 64 keeps one as its null block: 63 usable) and
the same token budget and sequence limit, on a manual `SimClock`.

Compared, per policy (`mars`, `fcfs`):
- the order in which requests are first scheduled (under `mars` the sessions' continuations go
  before new sessions that arrived earlier; under `fcfs` arrival order);
- every step's scheduled requests with their token counts (prefill chunks and decode tokens).
  vLLM keeps `has_requests()` true for one more, empty, step after the last request of a phase
  finishes (it reports the finished ids to the engine); that step decides nothing and is left out.

The workload fits in KV with room to spare, so neither side preempts, shrinks a chunk or runs
out of blocks: that is where the two are meant to agree token for token. Block-size rounding
does not enter the chunk sizes here (vLLM rounds only its KV allocation, not the scheduled
tokens); the continuation prompts share no prefix with the earlier calls (distinct first tokens,
`reuse_tokens=0`), so neither side gets a prefix hit that the other would not.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

pytest.importorskip(
    "vllm.v1.core.sched.scheduler", reason="vLLM is not installed: run scripts/test_vllm.sh"
)

from vllm_harness import make_request, make_scheduler, model_output, write_model

from mars.core.clock import SimClock
from mars.core.events import EventBus
from mars.core.request import Request
from mars.core.session import Session, Turn
from mars.kv.manager import KVConfig, KVManager
from mars.sched.plan import StepResult
from mars.sched.registry import make_policy
from mars.sched.scheduler import Scheduler, SchedulerConfig

BLOCK = 16
NUM_BLOCKS = 64  # vLLM's pool, of which one is its null block
BUDGET = 256
MAX_SEQS = 16
TOKEN = 7  # the sampled-token stream: every sample is this token


@dataclass(frozen=True)
class Call:
    rid: str
    sid: str
    prompt: int
    out: int
    last: bool = False  # `is_last_step`: the session ends with this call


# Phases: each phase's calls arrive together, in this order, and run until all have finished.
# Phase 2: a new session arrives before the continuations of s1 and s2, and another after.
WORKLOAD: tuple[tuple[Call, ...], ...] = (
    (Call("a0", "s1", 40, 1), Call("b0", "s2", 60, 2)),
    (
        Call("n0", "s3", 300, 3),
        Call("a1", "s1", 100, 3),
        Call("c0", "s4", 200, 2),
        Call("b1", "s2", 80, 2, last=True),
    ),
)
CALLS = [c for phase in WORKLOAD for c in phase]
Step = dict[str, int]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("tiny-llama"))


def run_vllm(model, policy: str) -> tuple[list[str], list[Step]]:
    s = make_scheduler(
        model, policy=policy, num_blocks=NUM_BLOCKS, budget=BUDGET, max_num_seqs=MAX_SEQS
    )
    first: list[str] = []
    steps: list[Step] = []
    for phase in WORKLOAD:
        for c in phase:
            xargs = {"session_id": c.sid}
            if c.last:
                xargs["is_last_step"] = True
            # A distinct first token per call: no prefix hit between calls.
            prefix = [201 + CALLS.index(c)]
            s.add_request(make_request(c.rid, c.prompt, max_tokens=c.out, prefix=prefix, **xargs))
        for _ in range(100):
            if not s.has_requests():
                break
            out = s.schedule()
            assert not out.preempted_req_ids
            first += [r.req_id for r in out.scheduled_new_reqs]
            if not out.total_num_scheduled_tokens:
                # vLLM's bookkeeping step that reports the last finished requests: no decision.
                assert not s.get_num_unfinished_requests()
                continue
            steps.append(dict(out.num_scheduled_tokens))
            ids = list(out.num_scheduled_tokens)
            sampled = []
            for rid in ids:
                req = s.requests[rid]
                sampled.append([TOKEN] if req.num_computed_tokens >= req.num_tokens else [])
            s.update_from_output(out, model_output(ids, sampled))
        else:
            raise AssertionError("vLLM: requests did not finish")
    s.shutdown()
    return first, steps


def run_mars(policy: str) -> tuple[list[str], list[Step]]:
    clock = SimClock()
    bus = EventBus()
    kv = KVManager(KVConfig(NUM_BLOCKS - 1, BLOCK), clock, bus)
    sessions: dict[str, Session] = {}
    sched = Scheduler(
        SchedulerConfig(BUDGET, MAX_SEQS), make_policy(policy), kv, clock, bus, sessions
    )
    first: list[str] = []
    steps: list[Step] = []
    for phase in WORKLOAD:
        for c in phase:
            clock.advance(0.001)  # arrival order
            session = sessions.setdefault(c.sid, Session(c.sid, clock.now()))
            req = Request(c.rid, c.sid, c.prompt, c.out, 0, clock.now(), len(session.turns))
            session.turns.append(Turn(req))
            sched.add_request(req)
        for _ in range(100):
            if not sched.has_work:
                break
            plan = sched.schedule()
            assert not plan.preempted
            seen = set(first)
            first += [r.request_id for r in plan.requests if r.request_id not in seen]
            batch = list(zip(plan.requests, plan.num_new_tokens, strict=True))
            steps.append({r.request_id: n for r, n in batch})
            tokens: list[int | None] = [
                TOKEN if r.num_computed_tokens + n >= r.num_tokens else None for r, n in batch
            ]
            clock.advance(0.01)
            for req in sched.update(plan, StepResult(plan.step_id, 0.01, tokens)):
                if next(c for c in CALLS if c.rid == req.request_id).last:
                    kv.end_session(req.session_id)
                    del sessions[req.session_id]
            kv.check_integrity()
        else:
            raise AssertionError("mars: requests did not finish")
    return first, steps


@pytest.mark.parametrize(
    ("policy", "order"),
    [
        ("mars", ["a0", "b0", "a1", "b1", "n0", "c0"]),  # continuations first
        ("fcfs", ["a0", "b0", "n0", "a1", "c0", "b1"]),  # arrival order
    ],
)
def test_plugin_and_mars_scheduler_decide_alike(model, policy, order):
    vllm_first, vllm_steps = run_vllm(model, policy)
    mars_first, mars_steps = run_mars(policy)
    assert vllm_first == order
    assert mars_first == order
    assert vllm_steps == mars_steps
