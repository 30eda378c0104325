"""The plug-in's vLLM-free half (mars.vllm.adapter): markers, the policy's view of vLLM's
requests and sessions, and the decisions asked of it. Runs in the main venv, without vLLM."""

from __future__ import annotations

import pytest

from mars.core.clock import SimClock
from mars.core.errors import UsageError
from mars.core.events import ToolEnd
from mars.kv.manager import Retention
from mars.sched.registry import make_policy
from mars.vllm.adapter import Markers, PoolView, SessionBook, policy_from_env


def make_book(policy: str = "mars", free: int = 100, block: int = 16) -> SessionBook:
    view = PoolView(100, block, lambda: free, lambda: 0.5, lambda sid: None)
    return SessionBook(make_policy(policy), SimClock(), view, max_num_batched_tokens=256)


def test_markers_from_vllm_xargs():
    m = Markers.from_extra_args(
        {"job_id": 7, "is_last_step": "True", "this_func_call": "bash", "last_func_call": ""}
    )
    assert m == Markers("7", True, "bash", None)
    assert Markers.from_extra_args(None) == Markers()
    assert Markers.from_extra_args({"session_id": "s", "job_id": "j"}).session_id == "s"


def test_policy_from_env():
    assert policy_from_env({}).name == "mars"
    p = policy_from_env({"MARS_POLICY": "mars", "MARS_POLICY_SETTINGS": '{"aging_s": 5}'})
    assert getattr(p, "aging_s") == 5.0  # noqa: B009
    with pytest.raises(UsageError, match="not JSON"):
        policy_from_env({"MARS_POLICY_SETTINGS": "{"})
    with pytest.raises(UsageError, match="valid policies"):
        policy_from_env({"MARS_POLICY": "nope"})


def test_turns_and_tool_phases_of_a_session():
    book = make_book()
    tools: list[ToolEnd] = []
    book.bus.subscribe(ToolEnd, tools.append)
    first = book.add("r0", Markers("s", this_func_call="bash"), 100, 10)
    assert first.turn_index == 0 and first.next_tool == "bash"
    assert book.finished("r0", aborted=False) in tuple(Retention)
    assert "s" in book.sessions
    clock = book.clock
    assert isinstance(clock, SimClock)
    clock.advance(3.0)
    second = book.add("r1", Markers("s", is_last_step=True, last_func_call="bash"), 150, 10)
    assert second.turn_index == 1
    assert [(t.category, t.duration_s) for t in tools] == [("bash", 3.0)]
    assert book.finished("r1", aborted=False) is Retention.DROP
    assert "s" not in book.sessions and not book.mirrors  # the session ended


def test_a_continuation_is_ordered_before_a_new_session():
    book = make_book()
    book.add("a0", Markers("a"), 10, 1)
    book.finished("a0", aborted=False)
    new = book.add("b0", Markers("b"), 100, 1)
    cont = book.add("a1", Markers("a"), 100, 1)
    assert book.order([new, cont], running=False) == [cont, new]
    assert book.order([new, cont], running=False) == [cont, new]


def test_victims_are_prefills_first():
    book = make_book()
    decode = book.add("d", Markers("d"), 10, 5)
    prefill = book.add("p", Markers("p"), 500, 5)
    book.sync("d", num_computed_tokens=10, num_output_tokens=1, running=True)
    book.sync("p", num_computed_tokens=100, num_output_tokens=0, running=True)
    assert book.victims([decode, prefill]) == [prefill, decode]
    assert book.victims([prefill, decode], limit=0) == [decode, prefill]  # vLLM's: newest


def test_chunk_capped_by_quantum_then_halved_to_fit():
    big = make_book(free=100)
    req = big.add("p", Markers("p"), 1000, 1)
    assert big.chunk(req, 256, free_blocks=None) == 128  # level 1: half the budget
    tight = make_book(free=3)
    req = tight.add("p", Markers("p"), 1000, 1)
    assert tight.chunk(req, 256, free_blocks=3) == 32  # 128 -> 64 -> 32 tokens (2 blocks)
    assert tight.chunk(req, 256, free_blocks=0) == 16  # never below a block


def test_unknown_and_aborted_calls_drop():
    book = make_book("continuum")
    assert book.finished("nobody", aborted=False) is Retention.DROP
    book.add("r", Markers("s", this_func_call="bash"), 10, 1)
    assert book.finished("r", aborted=True) is Retention.DROP
    book.add("r2", Markers("s2", this_func_call="bash"), 10, 1)
    assert book.finished("r2", aborted=False) is Retention.PIN


def test_idle_sessions_are_forgotten_past_the_cap():
    book = make_book()
    book.max_sessions = 2
    for i in range(4):
        book.add(f"r{i}", Markers(f"s{i}"), 10, 1)
        book.finished(f"r{i}", aborted=False)
    assert len(book.sessions) <= 3
