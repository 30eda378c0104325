"""Prefixes shared across sessions: held once, served to each session that begins with them, kept
while any of them needs them, and evicted only after the sessions' own blocks."""

from __future__ import annotations

from mars.core.clock import SimClock
from mars.core.request import Request
from mars.kv.manager import KVConfig, KVManager, Residency, Retention

BS = 4
SYSTEM = list(range(1000, 1040))  # 40 tokens: 10 blocks


def _call(kv: KVManager, sid: str, tokens: list[int], turn: int = 0, reuse: int = 0) -> Request:
    req = Request(f"{sid}-{turn}", sid, len(tokens), 1, reuse, 0.0, turn, prefix=tokens)
    start = kv.start(req, 1000)
    assert start is not None
    req.num_computed_tokens = req.num_tokens
    return req


def test_a_second_session_finds_the_system_prompt_cached_and_holds_it_once() -> None:
    kv = KVManager(KVConfig(64, BS), SimClock())
    a = _call(kv, "a", [*SYSTEM, 1, 2, 3, 4, 5])
    kv.finish(a, Retention.DROP)
    b = _call(kv, "b", [*SYSTEM, 7, 8, 9])
    assert b.num_computed_tokens == b.num_tokens
    hit = kv.stats().hit_tokens
    assert hit == 40 and kv.shared_tokens == 40, "the whole system prompt came from a's KV"
    assert kv.block_table("a")[:10] == kv.block_table("b")[:10], "the same blocks, not a copy"
    assert kv.shared_prefix_tokens("b") == 40 and kv.cached_tokens("b") == 40
    assert kv.segment_tokens == 40
    assert kv.used_blocks == 10 + 1 + 1, "the system prompt once, and a's and b's own tails"
    kv.check_integrity()


def test_a_shared_prefix_outlives_its_first_session_and_goes_with_the_last() -> None:
    kv = KVManager(KVConfig(64, BS), SimClock())
    kv.finish(_call(kv, "a", [*SYSTEM, 1, 2, 3, 4, 5]), Retention.DROP)
    kv.finish(_call(kv, "b", [*SYSTEM, 7, 8, 9, 10, 11]), Retention.DROP)
    kv.end_session("a")
    c = _call(kv, "c", [*SYSTEM, 20, 21])
    assert kv.block_table("c")[:10] == kv.block_table("b")[:10]
    kv.finish(c, Retention.DROP)
    kv.end_session("b")
    kv.end_session("c")
    kv.check_integrity()
    assert kv.used_blocks == 0, "no session left, nothing kept"


def test_the_shared_prefix_is_evicted_after_the_sessions_own_blocks() -> None:
    kv = KVManager(KVConfig(20, BS), SimClock())
    kv.finish(_call(kv, "a", [*SYSTEM, 1, 2, 3, 4, 5]), Retention.DROP)
    kv.finish(_call(kv, "b", [*SYSTEM, 7, 8, 9, 10, 11]), Retention.DROP)
    assert kv.used_blocks == 12
    # Another session's 6 new blocks: 8 empty ones are there, so nothing is evicted yet.
    kv.finish(_call(kv, "x", list(range(24))), Retention.DROP)
    # 16 more blocks: the oldest own tails go first, then x's, then the system prompt's tail.
    _call(kv, "y", list(range(100, 164)))
    kv.check_integrity()
    left = kv.shared_prefix_tokens("a")
    assert 0 < left < 40 and kv.cached_tokens("a") == kv.cached_tokens("b") == left, (
        "the own tails went first, then the shared one"
    )
    assert kv.residency("a") is Residency.CACHED


def test_sessions_whose_prompts_part_inside_a_segment_split_it() -> None:
    kv = KVManager(KVConfig(64, BS), SimClock())
    kv.finish(_call(kv, "a", [*SYSTEM, 1, 2]), Retention.DROP)
    kv.finish(_call(kv, "b", [*SYSTEM, 3, 4]), Retention.DROP)
    other = [*SYSTEM[:16], *range(5000, 5010)]  # parts after 4 blocks
    c = _call(kv, "c", other)
    assert c.num_cached_tokens in (-1, 16) and kv.shared_tokens == 40 + 16
    assert kv.block_table("c")[:4] == kv.block_table("a")[:4] == kv.block_table("b")[:4]
    assert kv.block_table("c")[4] != kv.block_table("a")[4]
    kv.check_integrity()


def test_nothing_is_shared_without_a_prefix() -> None:
    kv = KVManager(KVConfig(64, BS), SimClock())
    a = Request("a-0", "a", 45, 1, 0, 0.0)
    assert kv.start(a, 1000) is not None
    a.num_computed_tokens = 45
    kv.finish(a, Retention.DROP)
    b = Request("b-0", "b", 45, 1, 0, 0.0)
    start = kv.start(b, 1000)
    assert start is not None and start.hit.gpu_tokens == 0


def test_calls_of_another_salt_share_nothing() -> None:
    kv = KVManager(KVConfig(64, BS), SimClock())
    tokens = [*SYSTEM, 1, 2, 3, 4, 5]
    a = Request("a-0", "a", len(tokens), 1, 0, 0.0, prefix=tokens, prefix_salt="tenant-1|")
    assert kv.start(a, 1000) is not None
    a.num_computed_tokens = a.num_tokens
    kv.finish(a, Retention.DROP)
    b = Request("b-0", "b", len(tokens), 1, 0, 0.0, prefix=tokens, prefix_salt="tenant-2|")
    start = kv.start(b, 1000)
    assert start is not None and start.hit.gpu_tokens == 0 and kv.shared_tokens == 0
    c = Request("c-0", "c", len(tokens), 1, 0, 0.0, prefix=tokens, prefix_salt="tenant-1|")
    start = kv.start(c, 1000)
    assert start is not None and start.hit.gpu_tokens == 44  # a's, of its own salt
    kv.check_integrity()
