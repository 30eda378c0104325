"""The embedded engine with the real default model: KV mirroring, warm resume, offload/restore
exactness, sampling extensions, stop strings and aborts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by ./scripts/setup.sh")

from mars.core.request import Request
from mars.core.session import Session
from mars.engine.live import Chunk, LiveEngine
from mars.engine.llamacpp import ExecutorConfig
from mars.engine.model import Model, default_model_path
from mars.engine.sampling import SamplingParams
from mars.kv.manager import Residency, Retention
from mars.sched.policies.fcfs import FCFSPolicy
from mars.sched.registry import register

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


class OffloadPolicy(FCFSPolicy):
    """fcfs, but every finished turn's KV is also copied to host memory."""

    name = "test-offload"

    def retention(self, session: Session, req: Request) -> Retention:
        return Retention.OFFLOAD


class PrefetchPolicy(OffloadPolicy):
    """Also restores every session with KV missing from the GPU in any step with slack (the
    co-scheduler's seam)."""

    name = "test-prefetch"
    fast_forward_ok = False  # it looks at every step, so a simulator must not skip any

    def prefetch(self) -> list[str]:
        assert self.ctx is not None
        kv = self.ctx.kv
        return [s for s in self.ctx.sessions if kv.residency(s) is not Residency.GPU]


register("test-offload", OffloadPolicy)
register("test-prefetch", PrefetchPolicy)


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    m = Model(default_model_path())
    yield m


def make_engine(model: Model, policy: str = "fcfs", kv: int = 4096, host: int = 0) -> LiveEngine:
    cfg = ExecutorConfig(kv_tokens=kv, max_sequences=8, batch_tokens=256, threads=2)
    engine = LiveEngine(model, cfg, policy=policy, host_kv_tokens=host)
    engine.start()
    return engine


def run(engine: LiveEngine, sid: str, prompt: list[int], params: SamplingParams) -> list[Chunk]:
    async def go() -> list[Chunk]:
        return [c async for c in engine.generate(sid, prompt, params)]

    return asyncio.run(go())


def tokens(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def cells(engine: LiveEngine) -> int:
    """KV cells llama.cpp actually holds, summed over sequence slots."""
    import llama_cpp as L

    ex = engine.executor
    total = 0
    for seq in range(ex.config.max_sequences):
        lo = L.llama_memory_seq_pos_min(ex.mem, seq)
        hi = L.llama_memory_seq_pos_max(ex.mem, seq)
        if hi >= 0:
            total += hi - lo + 1
    return total


def text_prompt(model: Model, words: int, seed: int = 0) -> list[int]:
    return model.tokenize(" ".join(f"w{(seed * 31 + i) % 89}" for i in range(words)))


def test_warm_resume_prefills_only_new_tokens_and_kv_mirrors_cells(model: Model) -> None:
    engine = make_engine(model)
    try:
        p1 = text_prompt(model, 300)
        first = run(engine, "a", p1, GREEDY)
        assert first[-1].finish_reason == "length" and first[-1].completion_tokens == 8
        # The cache holds exactly what the KV manager says: prompt + output - 1 computed tokens.
        assert cells(engine) == engine.kv.cached_tokens("a") == len(p1) + 8 - 1
        p2 = p1 + tokens(first) + text_prompt(model, 20, seed=1)
        second = run(engine, "a", p2, GREEDY)
        assert second[-1].cached_tokens == len(p1) + 8 - 1
        used = engine.kv.used_blocks
        other = run(engine, "b", p2, GREEDY)  # same tokens, another session: a's cells, shared
        assert other[-1].cached_tokens == len(p2) - 1
        assert tokens(other) == tokens(second), "shared KV serves what computing it gives"
        assert engine.kv.used_blocks == used + 1 + 8 - 1, "only b's own tokens took new cells"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("policy", ["test-offload", "test-prefetch"])
def test_restore_from_host_is_exact(model: Model, policy: str) -> None:
    # 512 prompt tokens = two full 256-token chunks, so a cold run chunks exactly like the
    # first turn did and any difference can only come from the restored cells.
    p1 = (text_prompt(model, 600) * 2)[:512]
    extra = text_prompt(model, 40, seed=2)[:40]

    warm = make_engine(model, policy=policy, kv=1024, host=4096)
    try:
        first = run(warm, "a", p1, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        p2 = p1 + tokens(first) + extra
        # Another session fills the cache, evicting a's cells: only the host copy is left.
        run(warm, "filler", text_prompt(model, 900, seed=3)[:900], GREEDY)
        assert warm.kv.cached_tokens("a") < len(p1)
        if policy == "test-prefetch":  # another call's step has slack: a comes back early
            warm.end_session("filler")
            run(warm, "b", text_prompt(model, 20, seed=4), GREEDY)
            assert warm.kv.cached_tokens("a") == 512 and warm.kv.stats().restores == 1
        resumed = run(warm, "a", p2, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        assert warm.kv.stats().restores == 1
        assert resumed[-1].cached_tokens == 512
    finally:
        warm.shutdown()

    cold = make_engine(model)
    try:
        run(cold, "a", p1, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        cold.end_session("a")
        recomputed = run(
            cold, "z", p2, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        )
        assert recomputed[-1].cached_tokens == 0
    finally:
        cold.shutdown()
    assert tokens(resumed) == tokens(recomputed)


def test_min_tokens_ignore_eos_and_stop_strings(model: Model) -> None:
    # A prompt SmolLM2 answers in a few words (a poem ran past 200 tokens on one build of
    # llama.cpp): greedy output must reach its end-of-generation token for the test to mean
    # anything.
    chat = model.tokenize(model.render_chat([{"role": "user", "content": "Say hello."}], None))

    def first_call(params: SamplingParams) -> list[Chunk]:
        """The call alone on a fresh engine: greedy output over the same cells, bit for bit
        (other sessions' cells in the unified cache can flip a near-tied greedy token)."""
        engine = make_engine(model)
        try:
            return run(engine, "y", chat, params)
        finally:
            engine.shutdown()

    free = first_call(SamplingParams(max_tokens=200, temperature=0))
    n_free = free[-1].completion_tokens
    assert free[-1].finish_reason == "stop" and n_free < 200
    text = "".join(c.text for c in free)
    stop_word = text.split()[1]
    stopped = first_call(SamplingParams(max_tokens=200, temperature=0, stop=(stop_word,)))
    out = "".join(c.text for c in stopped)
    assert stopped[-1].finish_reason == "stop" and stop_word not in out
    assert text.startswith(out)

    engine = make_engine(model)
    try:
        ignore = run(
            engine, "x", chat, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        )
        assert ignore[-1].completion_tokens == 24 and ignore[-1].finish_reason == "length"
        at_least = run(
            engine, "z", chat, SamplingParams(max_tokens=200, temperature=0, min_tokens=n_free + 5)
        )
        assert at_least[-1].completion_tokens >= n_free + 5
    finally:
        engine.shutdown()


def test_abandoned_stream_aborts_and_frees_its_kv(model: Model) -> None:
    engine = make_engine(model)
    try:

        async def read_two() -> None:
            gen = engine.generate(
                "s",
                text_prompt(model, 50),
                SamplingParams(max_tokens=500, temperature=0, ignore_eos=True),
            )
            got = 0
            async for _ in gen:
                got += 1
                if got == 2:
                    break
            await gen.aclose()

        asyncio.run(read_two())
        for _ in range(100):
            if engine.stats()["running"] == 0 and engine.kv.usage == 0:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert engine.stats()["running"] == 0
        assert engine.kv.usage == 0.0
        engine.kv.check_integrity()
    finally:
        engine.shutdown()


def test_parallel_calls_of_one_session_both_finish(model: Model) -> None:
    engine = make_engine(model)
    try:
        prompt = text_prompt(model, 60)

        async def both() -> list[list[Chunk]]:
            async def one() -> list[Chunk]:
                return [c async for c in engine.generate("same", prompt, GREEDY)]

            return list(await asyncio.gather(one(), one()))

        a, b = asyncio.run(both())
        assert a[-1].finish_reason == b[-1].finish_reason == "length"
        engine.end_session("same")
        for _ in range(50):
            if not engine.sessions:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert not engine.sessions and engine.kv.cached_tokens("same#1") == 0
        engine.kv.check_integrity()
    finally:
        engine.shutdown()


def test_one_call_is_capped_at_the_trained_context(model: Model) -> None:
    engine = make_engine(model, kv=16384)
    try:
        assert model.n_ctx_train == 8192
        assert engine.max_context == 8192  # the cache is bigger, shared by all sessions

        async def too_long() -> None:
            params = SamplingParams(max_tokens=100)
            async for _ in engine.generate("x", [1] * 8100, params):
                pass

        with pytest.raises(ValueError, match="8192"):
            asyncio.run(too_long())
    finally:
        engine.shutdown()


def test_a_call_that_cannot_be_scheduled_ends_with_an_error_not_a_hang(model: Model) -> None:
    # Fault injection: the scheduler plans nothing while a call waits (as when what others hold
    # never lets it fit). The watchdog ends it with a reason after stall_timeout_s.
    cfg = ExecutorConfig(kv_tokens=1024, max_sequences=4, batch_tokens=256, threads=2)
    engine = LiveEngine(model, cfg, stall_timeout_s=1.0)
    engine.core.step = lambda stops: None  # type: ignore[method-assign]
    engine.start()
    try:
        start = time.monotonic()
        chunks = run(engine, "stuck", text_prompt(model, 50), GREEDY)
        assert chunks[-1].finish_reason == "stalled"
        assert chunks[-1].error is not None and "--kv-tokens" in chunks[-1].error
        assert 1.0 <= time.monotonic() - start < 10
        assert not engine.scheduler.has_work
    finally:
        engine.shutdown()
