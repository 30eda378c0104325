"""The scheduler with the vLLM-default policy: token budget, chunked prefill, token counting,
recompute preemption of the newest request, head-of-line blocking, prefix reuse across turns,
aborts, and the decode fast-forward (`decode_horizon` / `advance_decode`)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from factories import (
    add_session,
    batch,
    make_request,
    make_scheduler,
    run_until_idle,
    step,
)
from mars.core.events import Event, GpuEnd, GpuPreempt, GpuSubmit
from mars.core.request import Request, RequestStatus
from mars.kv.manager import Residency
from mars.sched.plan import StepResult
from mars.sched.policies.fcfs import FCFSPolicy
from mars.sched.scheduler import Scheduler


class RecordingFCFS(FCFSPolicy):
    """FCFS that remembers every victim choice as (needed_by, victim)."""

    def __init__(self) -> None:
        super().__init__()
        self.victims: list[tuple[str, str | None]] = []

    def pick_victim(self, running: Sequence[Request], needed_by: Request) -> Request | None:
        victim = super().pick_victim(running, needed_by)
        self.victims.append((needed_by.request_id, None if victim is None else victim.request_id))
        return victim


class NoHeadOfLine(FCFSPolicy):
    def stop_after_failure(self) -> bool:
        return False


# ---- token budget and chunked prefill -------------------------------------------------------


def test_long_prompt_is_chunked_beside_a_decode() -> None:
    sched = make_scheduler(budget=32)
    a = make_request(prompt=10, output=5, session="a")
    add_session(sched, a)
    assert batch(step(sched)[0]) == [("a-0", 10)]
    b = make_request(prompt=100, output=2, session="b")
    add_session(sched, b)
    plans = [step(sched)[0] for _ in range(5)]
    # The decode goes first and takes one token of the 32; the prompt gets the rest.
    assert [batch(p) for p in plans] == [
        [("a-0", 1), ("b-0", 31)],
        [("a-0", 1), ("b-0", 31)],
        [("a-0", 1), ("b-0", 31)],
        [("a-0", 1), ("b-0", 7)],  # a samples its 5th token here and finishes
        [("b-0", 1)],
    ]
    assert a.status is RequestStatus.FINISHED_LENGTH and b.status is RequestStatus.FINISHED_LENGTH
    assert not sched.has_work


def test_budget_is_never_exceeded_and_decodes_go_first() -> None:
    sched = make_scheduler(budget=4, num_blocks=256)
    decoders = [make_request(prompt=1, output=50) for _ in range(5)]
    for r in decoders[:4]:
        add_session(sched, r)
    plan, _ = step(sched)
    assert plan.num_new_tokens == [1, 1, 1, 1]
    # A fifth request waits: the four running decodes take the whole budget every step.
    add_session(sched, decoders[4])
    for _ in range(10):
        plan, _ = step(sched)
        assert plan.requests == decoders[:4] and plan.total_tokens == 4
        assert decoders[4].status is RequestStatus.WAITING
    # Random mix: never more than the budget, running requests before newly started ones.
    sched = make_scheduler(budget=24, num_blocks=512)
    for i in range(12):
        add_session(sched, make_request(prompt=5 + 7 * i, output=1 + i % 4))
    for _ in range(200):
        if not sched.has_work:
            break
        running_before = list(sched.running)
        plan, _ = step(sched)
        assert plan.total_tokens <= 24
        flags = [r in running_before for r in plan.requests]
        assert flags == sorted(flags, reverse=True), "a waiting prefill went before a running one"
    assert not sched.has_work


def test_token_counts_and_first_token_time() -> None:
    sched = make_scheduler(budget=32)
    req = make_request(prompt=100, output=4)
    add_session(sched, req)
    plans = []
    while sched.has_work:
        plans.append(step(sched)[0])
    # Prefill 32+32+32+4 (the 4th step samples the first token), then 3 decodes.
    assert [p.num_new_tokens for p in plans] == [[32], [32], [32], [4], [1], [1], [1]]
    assert [p.context_lens for p in plans] == [[0], [32], [64], [96], [100], [101], [102]]
    assert req.first_token_time == 4.0 and req.finish_time == 7.0
    assert req.first_scheduled_time == 0.0
    assert req.num_output_tokens == 4 and req.num_computed_tokens == 100 + 4 - 1
    assert req.status is RequestStatus.FINISHED_LENGTH


@pytest.mark.parametrize(("prompt", "output"), [(1, 1), (7, 1), (4, 9), (33, 2), (64, 64)])
def test_finished_request_counts(prompt: int, output: int) -> None:
    sched = make_scheduler(budget=16, num_blocks=64)
    req = make_request(prompt=prompt, output=output)
    add_session(sched, req)
    (done,) = run_until_idle(sched)
    assert done is req
    assert req.num_computed_tokens == prompt + output - 1
    assert req.num_output_tokens == output and req.num_tokens == prompt + output
    assert sched.kv.usage == 0.0


def test_max_num_seqs() -> None:
    sched = make_scheduler(max_num_seqs=2, budget=64)
    reqs = [make_request(prompt=3, output=4 + i) for i in range(5)]
    for r in reqs:
        add_session(sched, r)
    plan, _ = step(sched)
    assert plan.requests == reqs[:2]
    while sched.has_work:
        step(sched)
        assert len(sched.running) <= 2
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    # The third starts right after the first finish (4 outputs: at the end of the 4th step).
    assert reqs[2].first_scheduled_time == 4.0


# ---- preemption (vLLM FCFS: newest running request, by recompute) ------------------------------


def _two_decoders(num_blocks: int) -> tuple[Scheduler, RecordingFCFS, Request, Request]:
    policy = RecordingFCFS()
    sched = make_scheduler(num_blocks=num_blocks, block_size=4, budget=32, policy=policy)
    a = make_request(prompt=8, output=20, session="a")
    b = make_request(prompt=8, output=20, session="b")
    add_session(sched, a)
    add_session(sched, b)
    return sched, policy, a, b


def test_preempts_the_newest_running_request() -> None:
    # 8 blocks of 4: a and b both start at 8 tokens (2 blocks each) and decode in lockstep; both
    # need their 5th block when they reach 16 computed tokens (step 9), with no block left.
    sched, policy, a, b = _two_decoders(num_blocks=8)
    events: list[Event] = []
    sched.bus.subscribe_all(events.append)
    for _ in range(9):
        plan, _ = step(sched)
        assert not plan.preempted and len(plan.requests) == 2
    c = make_request(prompt=4, output=1, session="c")  # small: would fit in what b frees
    add_session(sched, c)
    plan, _ = step(sched)
    assert policy.victims == [("a-0", "b-0")]
    assert plan.preempted == [b] and batch(plan) == [("a-0", 1)]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert b.num_output_tokens == 9  # generated tokens are kept: they are recomputed as prompt
    # Back at the front of the queue, ahead of c which was waiting already; in the step that
    # preempted, the waiting queue is not tried at all.
    assert sched.waiting == [b, c] and c.status is RequestStatus.WAITING
    (preempt,) = [e for e in events if isinstance(e, GpuPreempt)]
    assert preempt.request_id == "b-0" and preempt.lost_tokens == 16
    # b cannot resume while a holds 5 blocks (its own cache is 3 blocks); c is behind it.
    for _ in range(10):
        plan, finished = step(sched)
        assert batch(plan) == [("a-0", 1)]
    assert finished == [a]
    plan, _ = step(sched)
    # a's decode evicted b's cached blocks down to 1 (4 tokens): 13 of 17 tokens recomputed.
    assert batch(plan) == [("b-0", 13), ("c-0", 4)]
    assert b.num_recomputed_tokens == 12 and sched.recomputed_tokens == 12
    run_until_idle(sched)
    assert b.num_computed_tokens == 8 + 20 - 1 and b.num_output_tokens == 20
    assert b.num_cached_tokens == 0  # the first schedule's hit, not the resumption's
    assert b.status is RequestStatus.FINISHED_LENGTH and c.status is RequestStatus.FINISHED_LENGTH
    submits = [e.request_id for e in events if isinstance(e, GpuSubmit)]
    assert submits == ["a-0", "b-0", "b-0", "c-0"]


def test_newest_request_preempts_itself() -> None:
    # One block more: a takes the last free block, then b finds none and is itself the newest.
    sched, policy, a, b = _two_decoders(num_blocks=9)
    for _ in range(9):
        step(sched)
    plan, _ = step(sched)
    assert policy.victims == [("b-0", "b-0")]
    assert plan.preempted == [b] and batch(plan) == [("a-0", 1)]
    assert sched.running == [a] and sched.waiting == [b]
    run_until_idle(sched)
    # a evicted two of b's four cached blocks; 8 of b's 16 lost tokens come back from cache.
    assert sched.recomputed_tokens == 8 == b.num_recomputed_tokens
    assert a.num_preemptions == 0 and b.num_preemptions == 1
    assert sched.kv.usage == 0.0


def test_preemption_under_pressure_always_drains() -> None:
    policy = RecordingFCFS()
    sched = make_scheduler(num_blocks=16, block_size=2, budget=16, policy=policy)
    reqs = [make_request(prompt=3 + i, output=8 + 2 * i) for i in range(6)]  # up to 26 tokens
    for r in reqs:
        add_session(sched, r)
    preempted = 0
    for _ in range(2000):
        if not sched.has_work:
            break
        order = list(sched.running)
        waiting_before = list(sched.waiting)
        plan, _ = step(sched)
        if plan.preempted:
            preempted += len(plan.preempted)
            # Victims are the newest running requests, taken from the end.
            k = len(plan.preempted)
            assert plan.preempted == order[::-1][:k]
            assert sched.waiting[:k] == plan.preempted[::-1]
            assert sched.waiting[k:] == waiting_before  # nothing started in that step
            assert all(r in order for r in plan.requests)
    assert not sched.has_work and preempted > 0
    assert preempted == sched.num_preemptions == sum(r.num_preemptions for r in reqs)
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    assert sched.recomputed_tokens == sum(r.num_recomputed_tokens for r in reqs) > 0


# ---- head-of-line blocking ----------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "started"), [(FCFSPolicy(), []), (NoHeadOfLine(), ["c-0"])])
def test_first_waiting_request_that_does_not_fit_stops_the_fill(
    policy: FCFSPolicy, started: list[str]
) -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, budget=32, policy=policy)
    add_session(sched, make_request(prompt=23, output=5, session="a"))  # 6 of 8 blocks
    step(sched)
    add_session(sched, make_request(prompt=20, output=1, session="b"))  # needs 5 blocks
    add_session(sched, make_request(prompt=4, output=1, session="c"))  # needs 1 block
    plan, _ = step(sched)
    assert [r.request_id for r in plan.requests] == ["a-0", *started]
    assert [r.request_id for r in sched.waiting] == ["b-0"] + (["c-0"] if not started else [])


# ---- prefix reuse across turns -------------------------------------------------------------


def _second_turn(prompt0: int, output0: int, prompt1: int, reuse1: int, bs: int = 4) -> Request:
    sched = make_scheduler(num_blocks=256, block_size=bs, budget=4096)
    add_session(sched, make_request(prompt0, output0, session="p", turn=0))
    run_until_idle(sched)
    req = make_request(prompt1, 3, reuse=reuse1, session="p", turn=1)
    add_session(sched, req)
    other = make_request(prompt1, 3, reuse=reuse1, session="q", turn=1)
    add_session(sched, other)
    run_until_idle(sched)
    assert other.num_cached_tokens == 0  # another session never hits p's cache
    assert sched.hit_tokens == req.num_cached_tokens
    assert sched.prompt_tokens == prompt0 + 2 * prompt1
    return req


@pytest.mark.parametrize(
    ("prompt0", "output0", "prompt1", "reuse1", "bs", "cached"),
    [
        (10, 5, 30, 15, 4, 12),  # appended history: the 14 computed tokens hold 3 full blocks
        (10, 6, 30, 16, 4, 12),  # 16 reusable, but the last output token never had KV computed
        (10, 7, 30, 17, 4, 16),
        (10, 5, 15, 15, 4, 12),  # prompt == previous sequence: one token must still be computed
        (13, 4, 17, 17, 1, 16),  # block size 1: all but the last token
        (40, 9, 30, 6, 4, 4),  # rewritten history: only the shared prefix (system + task)
        (40, 9, 30, 3, 4, 0),  # less than one block reusable
        (40, 9, 60, 49, 16, 48),
    ],
)
def test_second_turn_prefix_hit(
    prompt0: int, output0: int, prompt1: int, reuse1: int, bs: int, cached: int
) -> None:
    expected = min(reuse1, prompt1 - 1, prompt0 + output0 - 1) // bs * bs
    assert cached == expected
    req = _second_turn(prompt0, output0, prompt1, reuse1, bs)
    assert req.num_cached_tokens == cached
    assert req.num_recomputed_tokens == reuse1 - cached
    assert req.num_computed_tokens == prompt1 + 3 - 1


def test_evicted_cache_is_recomputed() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, budget=64)
    add_session(sched, make_request(10, 5, session="p", turn=0))
    run_until_idle(sched)
    assert sched.kv.residency("p") is Residency.CACHED and sched.kv.cached_tokens("p") == 12
    add_session(sched, make_request(30, 1, session="q"))  # needs all 8 blocks: evicts p
    run_until_idle(sched)
    assert sched.kv.residency("p") is Residency.DROPPED
    req = make_request(20, 2, reuse=15, session="p", turn=1)
    add_session(sched, req)
    run_until_idle(sched)
    assert req.num_cached_tokens == 0 and req.num_recomputed_tokens == 15
    assert sched.recomputed_tokens == 15
    # The turn-0 request of q itself reused nothing and recomputed nothing.
    assert sched.prompt_tokens == 10 + 30 + 20 and sched.hit_tokens == 0


# ---- aborts ---------------------------------------------------------------------------------


def test_abort_waiting_and_running_requests_frees_kv() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4, budget=32)
    events: list[Event] = []
    sched.bus.subscribe_all(events.append)
    run = make_request(prompt=50, output=3, session="r")
    wait = make_request(prompt=40, output=3, session="w")
    add_session(sched, run)
    add_session(sched, wait)
    step(sched)  # run: 32 tokens (8 blocks); wait does not start (no budget left)
    assert run.status is RequestStatus.RUNNING and wait.status is RequestStatus.WAITING
    assert sched.kv.usage == 8 / 16
    assert sched.abort("w-0") is wait
    assert wait.status is RequestStatus.FINISHED_ABORTED and wait.finish_time == 1.0
    assert sched.waiting == []
    plan = sched.schedule()  # run is mid-step when its client goes away
    assert sched.abort("r-0") is run
    sched.kv.check_integrity()
    assert run.status is RequestStatus.FINISHED_ABORTED and sched.running == []
    assert sched.kv.usage == 0.0 and sched.kv.num_free_blocks == 16
    assert sched.update(plan, StepResult(plan.step_id, 0.0)) == []
    assert run.num_computed_tokens == 32  # the aborted step's tokens are not applied
    (end,) = [e for e in events if isinstance(e, GpuEnd)]
    assert end.request_id == "r-0" and end.aborted
    assert sched.abort("r-0") is None and not sched.has_work
    for sid in ("r", "w"):
        sched.kv.end_session(sid)
        assert sched.kv.residency(sid) is Residency.NONE
    sched.kv.check_integrity()
    assert sched.kv.num_free_blocks == 16 and sched.kv.stats().evictions == 0


def test_abort_preempted_request() -> None:
    sched, _, a, b = _two_decoders(num_blocks=8)
    for _ in range(10):
        step(sched)
    assert b.status is RequestStatus.PREEMPTED
    assert sched.abort("b-0") is b and b.status is RequestStatus.FINISHED_ABORTED
    assert sched.waiting == []
    run_until_idle(sched)
    assert a.status is RequestStatus.FINISHED_LENGTH and sched.kv.usage == 0.0
    assert sched.recomputed_tokens == 0  # b never resumed


def test_a_preemption_that_empties_the_batch_lets_the_waiting_queue_start() -> None:
    """The engine must not idle with work queued: when preempting leaves no batch (the only
    running request lost its KV to pins), the same schedule() releases pins and starts it."""
    from mars.kv.manager import Retention

    sched = make_scheduler(num_blocks=8, block_size=4, budget=32)  # 32 tokens of KV
    kv = sched.kv
    pinned = make_request(prompt=16, output=1, session="pinned")
    kv.begin(pinned)
    assert kv.allocate(pinned, 16) is not None
    pinned.num_computed_tokens = 16
    kv.finish(pinned, Retention.PIN)  # 4 of 8 blocks held through a tool call
    req = make_request(prompt=12, output=20, session="a")
    add_session(sched, req)
    for _ in range(5):  # 12 prompt tokens + 4 decodes fill the other 4 blocks
        step(sched)
    assert kv.num_free_blocks == 0 and req.status is RequestStatus.RUNNING
    plan, _ = step(sched)  # a needs a 5th block: it is preempted, and starts again at once
    assert plan.preempted == [req] and batch(plan) == [("a-0", 1)]  # its full blocks hit
    assert kv.residency("pinned") is Residency.CACHED  # the pin gave way
