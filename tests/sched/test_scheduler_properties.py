"""Scheduler properties: random workloads all finish with exact token accounting, and
fast-forwarded decode stretches equal step-by-step ones."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from factories import (
    add_session,
    batch,
    clock_of,
    make_request,
    make_scheduler,
    step,
)
from mars.core.request import Request, RequestStatus
from mars.sched.scheduler import Scheduler

# ---- random workloads: everything finishes, exact token accounting ----------------------------


@dataclass
class _Turn:
    prompt: int
    output: int
    reuse: int
    delay: int  # steps between the previous turn's end (or the start) and this call


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[list[_Turn]], int, int, int, int]:
    bs = draw(st.sampled_from([1, 2, 4]))
    sessions: list[list[_Turn]] = []
    for _ in range(draw(st.integers(1, 5))):
        turns: list[_Turn] = []
        prev = 0
        for i in range(draw(st.integers(1, 4))):
            prompt = draw(st.integers(1, 40))
            output = draw(st.integers(1, 8))
            reuse = 0 if i == 0 else draw(st.integers(0, min(prompt, prev)))
            turns.append(_Turn(prompt, output, reuse, draw(st.integers(0, 3))))
            prev = prompt + output
        sessions.append(turns)
    need = max(t.prompt + t.output for s in sessions for t in s)
    blocks = -(-need // bs) + draw(st.integers(0, 6))
    budget = draw(st.integers(1, 48))
    max_seqs = draw(st.integers(1, 4))
    return sessions, bs, blocks, budget, max_seqs


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_random_workloads_finish_with_exact_accounting(
    w: tuple[list[list[_Turn]], int, int, int, int],
) -> None:
    sessions, bs, blocks, budget, max_seqs = w
    sched = make_scheduler(num_blocks=blocks, block_size=bs, budget=budget, max_num_seqs=max_seqs)
    due: dict[int, int] = {i: s[0].delay for i, s in enumerate(sessions)}  # session -> step
    nxt = dict.fromkeys(range(len(sessions)), 0)
    reqs: list[tuple[Request, _Turn]] = []
    computed = 0
    for n in range(20_000):
        for i in [i for i, at in due.items() if at <= n]:
            del due[i]
            t = sessions[i][nxt[i]]
            req = make_request(t.prompt, t.output, t.reuse, session=f"S{i}", turn=nxt[i])
            add_session(sched, req)
            reqs.append((req, t))
        if not sched.has_work:
            if not due:
                break
            continue
        plan, finished = step(sched)
        assert plan.total_tokens <= budget and len(sched.running) <= max_seqs
        assert all(k > 0 for k in plan.num_new_tokens)
        computed += plan.total_tokens
        for req in finished:
            i = int(req.session_id[1:])
            nxt[i] += 1
            if nxt[i] < len(sessions[i]):
                due[i] = n + 1 + sessions[i][nxt[i]].delay
            else:
                sched.kv.end_session(req.session_id)
                sched.kv.check_integrity()
    else:
        raise AssertionError("workload did not drain")
    assert len(reqs) == sum(len(s) for s in sessions)
    for req, t in reqs:
        assert req.status is RequestStatus.FINISHED_LENGTH
        assert req.num_output_tokens == t.output
        assert req.num_computed_tokens == t.prompt + t.output - 1
        assert 0 <= req.num_cached_tokens <= min(t.reuse, t.prompt - 1)
        assert req.num_cached_tokens % bs == 0
    # Every token with KV at the end was computed once, except the reused ones; plus whatever
    # was computed again (cache misses on reusable tokens, lost work of preemptions).
    assert computed == sum(
        t.prompt + t.output - 1 - t.reuse + req.num_recomputed_tokens for req, t in reqs
    )
    assert sched.recomputed_tokens == sum(req.num_recomputed_tokens for req, _ in reqs)
    assert sched.prompt_tokens == sum(t.prompt for _, t in reqs)
    assert sched.hit_tokens == sum(req.num_cached_tokens for req, _ in reqs)
    assert sched.num_preemptions == sum(req.num_preemptions for req, _ in reqs)
    assert sched.kv.usage == 0.0 and sched.kv.num_free_blocks == blocks


# ---- decode fast-forward ------------------------------------------------------------------------


def _state(
    sched: Scheduler, reqs: Sequence[Request], first_token: bool = False
) -> tuple[object, ...]:
    # first_token_time is left out by default: see test_fast_forward_first_token_time (a bug).
    return (
        [
            (
                r.request_id,
                r.status,
                r.num_computed_tokens,
                r.num_output_tokens,
                r.num_cached_tokens,
                r.num_recomputed_tokens,
                r.num_preemptions,
                r.first_token_time if first_token else None,
                r.finish_time,
            )
            for r in reqs
        ],
        [r.request_id for r in sched.running],
        [r.request_id for r in sched.waiting],
        sched.kv.usage,
        sched.kv.num_free_blocks,
        sched.kv.stats(),
        sched.recomputed_tokens,
        sched.num_preemptions,
        sched._next_step,
    )


def test_decode_horizon_conditions() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4, budget=64)
    add_session(sched, make_request(prompt=10, output=6, session="a"))
    add_session(sched, make_request(prompt=4, output=9, session="b"))
    assert sched.decode_horizon() == 0  # nothing running yet
    step(sched)
    assert sched.decode_horizon() == 5  # until a's 6th token
    add_session(sched, make_request(prompt=4, output=2, session="c"))
    assert sched.decode_horizon() == 0  # c could start at the next step
    step(sched)
    assert sched.decode_horizon() == 1  # c decodes now and has one token left
    # KV-limited: a and b hold 1 block each, 4 are free.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    add_session(sched, make_request(prompt=4, output=20, session="a"))
    add_session(sched, make_request(prompt=4, output=20, session="b"))
    step(sched)
    # k=19 would need 5+5 more blocks; 9: 3+3; 4: 1+1, which fits.
    assert sched.kv.num_free_blocks == 4 and sched.decode_horizon() == 4


def _drive(
    sched: Scheduler, use_ff: bool, first_token: bool = False
) -> dict[int, tuple[object, ...]]:
    """Drive to idle; with `use_ff` every horizon >= 2 is taken in one call. Returns the state
    after each stretch, keyed by the number of steps done."""
    reqs = sorted([*sched.waiting, *sched.running], key=lambda r: r.request_id)
    snaps: dict[int, tuple[object, ...]] = {}
    n = 0
    while sched.has_work:
        assert n < 5000, "did not drain"
        k = sched.decode_horizon() if use_ff else 0
        if k >= 2:
            clock_of(sched).advance(float(k))
            sched.advance_decode(k)
            sched.kv.check_integrity()
            n += k
        else:
            step(sched)
            n += 1
        snaps[n] = _state(sched, reqs, first_token)
    return snaps


@settings(max_examples=80, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=6),
    blocks=st.integers(0, 12),
    bs=st.sampled_from([1, 2, 4]),
    budget=st.integers(2, 40),
    max_seqs=st.integers(1, 4),
)
def test_advance_decode_matches_single_steps(
    reqs: list[tuple[int, int]], blocks: int, bs: int, budget: int, max_seqs: int
) -> None:
    num_blocks = max(-(-(p + o) // bs) for p, o in reqs) + blocks
    sched = make_scheduler(
        num_blocks=num_blocks, block_size=bs, budget=budget, max_num_seqs=max_seqs
    )
    for i, (p, o) in enumerate(reqs):
        add_session(sched, make_request(p, o, session=f"r{i}"))
    twin = copy.deepcopy(sched)
    fast = _drive(sched, use_ff=True)
    slow = _drive(twin, use_ff=False)
    assert max(fast) == max(slow)
    for n, state in fast.items():
        assert slow[n] == state, f"state differs after {n} steps"


def test_advance_decode_past_a_blocked_queue() -> None:
    sched = make_scheduler(num_blocks=10, block_size=4, budget=64)
    a = make_request(prompt=12, output=12, session="a")
    add_session(sched, a)
    step(sched)
    b = make_request(prompt=30, output=2, session="b")  # needs 8 blocks, 7 are free
    add_session(sched, b)
    plan, _ = step(sched)
    assert batch(plan) == [("a-0", 1)]
    k = sched.decode_horizon()
    assert k == 10  # a's remaining tokens; the 2 more blocks they need fit the 6 free
    twin = copy.deepcopy(sched)
    clock_of(sched).advance(float(k))
    assert sched.advance_decode(k) == [a]
    done: list[Request] = []
    for _ in range(k):
        plan, fin = step(twin)
        assert batch(plan) == [("a-0", 1)]
        done += fin
    assert [r.request_id for r in done] == ["a-0"]
    twin_reqs = sorted([*twin.waiting, *done], key=lambda r: r.request_id)
    assert _state(sched, [a, b], first_token=True) == _state(twin, twin_reqs, first_token=True)


def test_decode_horizon_is_zero_during_a_prefill() -> None:
    sched = make_scheduler(budget=8)
    add_session(sched, make_request(prompt=20, output=5, session="a"))
    step(sched)
    assert sched.decode_horizon() == 0  # 12 prompt tokens left


def test_fast_forward_first_token_time() -> None:
    # Prompt 9, budget 8: the first step leaves one prompt token; the next step samples the
    # first token. decode_horizon() returns 4 there (num_computed == num_tokens - 1 looks like
    # a decode), and advance_decode(4) stamps first_token_time at the end of the stretch: 5.0.
    sched = make_scheduler(budget=8)
    add_session(sched, make_request(prompt=9, output=4, session="a"))
    twin = copy.deepcopy(sched)
    fast = _drive(sched, use_ff=True, first_token=True)
    slow = _drive(twin, use_ff=False, first_token=True)
    assert twin.sessions["a"].turns[0].request.first_token_time == 2.0
    assert sched.sessions["a"].turns[0].request.first_token_time == 2.0
    assert fast == {n: slow[n] for n in fast}
