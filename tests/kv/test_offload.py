"""OFFLOAD is write-back: a session's cached KV is copied to host memory only when a block of it
is about to be evicted, and a restore brings back exactly what was copied."""

from __future__ import annotations

from mars.core.clock import SimClock
from mars.core.events import EventBus
from mars.core.request import Request
from mars.kv.manager import KVConfig, KVManager, Retention


class Copies:
    """A KVListener recording what a real engine would be asked to do."""

    def __init__(self) -> None:
        self.copied: list[tuple[str, int]] = []

    def offloaded(self, session_id: str, num_tokens: int) -> None:
        self.copied.append((session_id, num_tokens))

    def truncated(self, session_id: str, num_tokens: int) -> None:
        pass

    def ended(self, session_id: str) -> None:
        pass


def _run(kv: KVManager, sid: str, tokens: int, turn: int = 0, reuse: int = 0) -> Request:
    req = Request(f"{sid}-{turn}", sid, tokens, 1, reuse, 0.0, turn)
    hit = kv.begin(req)
    assert kv.allocate(req, tokens - hit.gpu_tokens - hit.host_tokens) is not None
    req.num_computed_tokens = tokens
    return req


def test_offload_copies_only_at_eviction_and_restores_it() -> None:
    copies = Copies()
    kv = KVManager(KVConfig(8, 4, 1000), SimClock(), EventBus(), listener=copies)  # 32 tokens
    a = _run(kv, "a", 16)
    kv.finish(a, Retention.OFFLOAD)
    assert kv.offload_pending("a") and copies.copied == [] and kv.stats().offloads == 0
    b = _run(kv, "b", 24)  # needs 8 of a's 16 cached tokens: the copy happens first
    assert copies.copied == [("a", 16)] and not kv.offload_pending("a")
    kv.finish(b, Retention.DROP)
    again = _run(kv, "a", 20, turn=1, reuse=16)
    assert kv.stats().restores == 1 and again.session_id == "a"
    kv.check_integrity()


class Loads(Copies):
    """A listener that can refuse a warm restore, as llama.cpp does without contiguous cells."""

    def __init__(self, accept: bool) -> None:
        super().__init__()
        self.accept = accept
        self.loaded: list[tuple[str, int]] = []

    def prefetched(self, session_id: str, num_tokens: int) -> bool:
        if self.accept:
            self.loaded.append((session_id, num_tokens))
        return self.accept


def _offloaded_then_evicted(listener: Copies) -> KVManager:
    kv = KVManager(KVConfig(8, 4, 1000), SimClock(), EventBus(), listener=listener)
    a = _run(kv, "a", 16)
    kv.finish(a, Retention.OFFLOAD)
    b = _run(kv, "b", 32)  # evicts all of a: a lives on the host only
    kv.finish(b, Retention.DROP)
    kv.end_session("b")
    return kv


def test_prefetch_restores_into_empty_blocks_and_the_next_call_hits_the_gpu() -> None:
    loads = Loads(accept=True)
    kv = _offloaded_then_evicted(loads)
    assert kv.residency("a").name == "HOST"
    assert kv.prefetch("a") == 16 and loads.loaded == [("a", 16)]
    assert kv.residency("a").name == "CACHED" and kv.stats().restores == 1
    assert kv.prefetch("a") == 0  # already on the GPU
    again = Request("a-1", "a", 20, 1, 16, 0.0, 1)
    hit = kv.begin(again)
    assert (hit.gpu_tokens, hit.host_tokens) == (16, 0)  # warm: nothing left to copy
    kv.check_integrity()


def test_prefetch_never_evicts_and_a_refused_load_changes_nothing() -> None:
    kv = _offloaded_then_evicted(Loads(accept=True))
    c = _run(kv, "c", 20)  # 5 of 8 blocks held: 3 empty, a needs 4
    assert kv.prefetch("a") == 0 and kv.residency("a").name == "HOST"
    kv.finish(c, Retention.DROP)
    refusing = _offloaded_then_evicted(Loads(accept=False))
    free = refusing.num_free_blocks
    assert refusing.prefetch("a") == 0
    assert refusing.residency("a").name == "HOST" and refusing.num_free_blocks == free
    assert refusing.stats().restores == 0
    refusing.check_integrity()
