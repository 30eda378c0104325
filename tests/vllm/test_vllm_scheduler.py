"""MarsScheduler's decisions against vLLM's real scheduler (vLLM 0.32.0, CPU, no model run):
each test builds the scheduler over a tiny config, adds requests, and steps it with hand-built
model outputs, as vLLM's own `tests/v1/core` do."""

from __future__ import annotations

import json

import pytest

pytest.importorskip(
    "vllm.v1.core.sched.scheduler", reason="vLLM is not installed: run scripts/test_vllm.sh"
)

from vllm.config import SchedulerConfig
from vllm.v1.request import RequestStatus
from vllm_harness import make_request, make_scheduler, step, write_model

from mars.core.errors import UsageError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("tiny-llama"))


def finish(sched, max_steps: int = 50) -> None:
    for _ in range(max_steps):
        if not sched.has_requests():
            return
        step(sched)
    raise AssertionError("requests did not finish")


def test_loaded_by_qualified_name_like_the_cli_flag():
    from mars.vllm.scheduler import MarsScheduler

    config = SchedulerConfig(
        max_model_len=4096,
        is_encoder_decoder=False,
        scheduler_cls="mars.vllm.scheduler.MarsScheduler",
    )
    assert config.get_scheduler_cls() is MarsScheduler


def test_policy_and_settings_from_env(model):
    s = make_scheduler(model, policy="autellix", settings='{"starvation_s": 3}')
    assert s.mars.policy.name == "autellix"
    assert s.mars.policy.starvation_s == 3.0
    with pytest.raises(UsageError, match="valid policies"):
        make_scheduler(model, policy="nope")
    with pytest.raises(UsageError, match="JSON object"):
        make_scheduler(model, settings="[1]")


def first_turn(sched, sid: str, rid: str = "a0", tokens: int = 40, **xargs) -> None:
    sched.add_request(make_request(rid, tokens, max_tokens=1, session_id=sid, **xargs))
    finish(sched)


@pytest.mark.parametrize(("policy", "first"), [("mars", "cont"), ("fcfs", "new")])
def test_continuation_of_a_session_goes_before_a_new_session(model, policy, first):
    s = make_scheduler(model, policy=policy, budget=128)
    first_turn(s, "s1")
    s.add_request(make_request("new", 100, session_id="s2"))  # arrives first
    s.add_request(make_request("cont", 100, session_id="s1"))
    out = s.schedule()
    assert out.scheduled_new_reqs[0].req_id == first


@pytest.mark.parametrize(("policy", "chunk"), [("mars", 128), ("fcfs", 200)])
def test_a_new_sessions_prefill_is_capped_at_its_level_quantum(model, policy, chunk):
    s = make_scheduler(model, policy=policy, budget=256)
    s.add_request(make_request("p", 200, session_id="s"))
    out = s.schedule()
    assert out.num_scheduled_tokens["p"] == chunk  # mars level 1: half the step's budget


def test_the_chunk_is_halved_before_anyone_is_preempted(model):
    # 11 usable blocks of 16 tokens; a 400-token prefill takes 8 in its first chunk (128, level
    # 1), then its level-2 chunk (64 tokens, 4 blocks) does not fit in the 3 left: halved to 32.
    s = make_scheduler(model, budget=256, num_blocks=12, full_isl=False)
    s.add_request(make_request("p", 400, session_id="s"))
    assert step(s).num_scheduled_tokens["p"] == 128
    out = step(s)
    assert out.num_scheduled_tokens["p"] == 32
    assert not out.preempted_req_ids and s.requests["p"].status == RequestStatus.RUNNING


def test_victims_are_prefills_lowest_priority_first_never_a_decode(model):
    s = make_scheduler(model, budget=512, num_blocks=64, full_isl=False)
    s.add_request(make_request("d", 16, max_tokens=20, session_id="sd"))
    step(s)  # d's prompt done: it decodes from now on
    s.add_request(make_request("p", 1000, session_id="sp"))
    step(s)  # p mid-prefill
    s._mars_rank()
    d, p = s.requests["d"], s.requests["p"]
    assert [r.request_id for r in s.running] == ["d", "p"]  # decodes first
    assert p.priority > d.priority  # vLLM's priority mode preempts max(priority) first


@pytest.mark.parametrize(("policy", "decode_preempted"), [("mars", False), ("fcfs", True)])
def test_preemption_takes_the_prefill_not_the_newer_decode(model, policy, decode_preempted):
    # 7 usable blocks, a long prefill in 32-token chunks and a newer short request that then
    # decodes: when KV runs out, vLLM's FCFS preempts the newest running request (the decode);
    # mars the prefill, after failing to shrink its chunk below a block.
    s = make_scheduler(
        model, policy=policy, budget=64, num_blocks=8, full_isl=False, long_prefill=32
    )
    s.add_request(make_request("p", 300, session_id="sp"))
    s.add_request(make_request("d", 15, max_tokens=40, session_id="sd"))
    preempted: set[str] = set()
    for _ in range(12):
        preempted |= step(s).preempted_req_ids
    assert preempted
    assert ("d" in preempted) is decode_preempted


def test_a_pinned_session_keeps_its_blocks_for_its_next_call(model, tmp_path):
    events = tmp_path / "events.jsonl"
    s = make_scheduler(model, policy="continuum", num_blocks=64, events=events)
    prompt = make_request("a0", 48, max_tokens=1, session_id="s1", this_func_call="bash")
    tokens = list(prompt.prompt_token_ids)
    s.add_request(prompt)
    finish(s)
    assert "s1" in s.mars_pins  # continuum pins through a short tool call
    held = 64 - 1 - s.kv_cache_manager.block_pool.get_num_free_blocks()
    assert held >= 3
    nxt = make_request(
        "a1", 80, prefix=[*tokens, 7], session_id="s1", last_func_call="bash", is_last_step=True
    )
    s.add_request(nxt)
    out = s.schedule()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 48  # prefix hit on pinned blocks
    assert "s1" not in s.mars_pins  # released once the next call holds them
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert "kv_retain" in kinds and "tool_end" in kinds
    s.shutdown()


@pytest.mark.parametrize(
    ("policy", "xargs"),
    [
        ("fcfs", {"this_func_call": "bash"}),  # vLLM's behaviour: never pins
        ("continuum", {"this_func_call": "bash", "is_last_step": True}),  # session over
        ("continuum", {}),  # no tool call: nothing to wait for
    ],
)
def test_no_pin(model, policy, xargs):
    s = make_scheduler(model, policy=policy)
    first_turn(s, "s1", **xargs)
    assert not s.mars_pins
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == 63


def test_pins_give_way_when_nothing_else_can_run(model):
    s = make_scheduler(model, policy="continuum", num_blocks=12)
    first_turn(s, "s1", tokens=160, this_func_call="bash")  # 10 of 11 blocks pinned
    assert "s1" in s.mars_pins
    s.add_request(make_request("big", 100, session_id="s2"))
    finish(s)
    assert not s.mars_pins and not s.has_requests()


def test_an_aborted_call_drops_its_mirror_and_pins_nothing(model):
    s = make_scheduler(model, policy="continuum")
    s.add_request(make_request("a", 40, max_tokens=5, session_id="s", this_func_call="bash"))
    step(s)
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert not s.mars_pins and "a" not in s.mars.mirrors and "s" not in s.mars.sessions


def test_requests_without_session_metadata_still_run(model):
    s = make_scheduler(model)
    for i in range(3):
        s.add_request(make_request(f"r{i}", 30, max_tokens=3))
    finish(s)
    assert not s.mars.mirrors and not s.mars.sessions
