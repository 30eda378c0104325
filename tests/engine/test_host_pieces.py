"""Host copies in pieces: a context restores into a fragmented llama.cpp cache, where the whole
sequence finds no contiguous run of free cells, without computing anything, and exactly."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by ./scripts/setup.sh")

import llama_cpp as L

from mars.core.request import Request
from mars.engine.llamacpp import PIECE_TOKENS, ExecutorConfig, LlamaCppExecutor
from mars.engine.model import Model, default_model_path
from mars.engine.sampling import SamplingParams
from mars.sched.plan import StepPlan

CHUNK = 256
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    yield Model(default_model_path())


def executor(model: Model) -> LlamaCppExecutor:
    cfg = ExecutorConfig(kv_tokens=1024, max_sequences=8, batch_tokens=CHUNK, threads=2)
    return LlamaCppExecutor(model, cfg)


def prompt_of(model: Model, n: int, seed: int) -> list[int]:
    words = " ".join(f"w{(seed * 37 + i) % 97}" for i in range(2 * n))
    return model.tokenize(words)[:n]


def request(ex: LlamaCppExecutor, sid: str, prompt: list[int], turn: int = 0) -> Request:
    req = Request(f"{sid}-{turn}", sid, len(prompt), 8, 0, 0.0, turn)
    ex.add(req, prompt, GREEDY)
    return req


def step(ex: LlamaCppExecutor, req: Request, n: int, restore: int = 0) -> int | None:
    restores = [(req, restore)] if restore else []
    plan = StepPlan(0, [req], [n], [req.num_computed_tokens], restores=restores)
    token = ex.execute(plan).token_ids
    req.num_computed_tokens += n
    assert token is not None
    if token[0] is not None:
        req.output_token_ids.append(token[0])
        req.num_output_tokens += 1
    return token[0]


def prefill(ex: LlamaCppExecutor, req: Request, upto: int) -> None:
    while req.num_computed_tokens < upto:
        step(ex, req, min(CHUNK, upto - req.num_computed_tokens))


def greedy_tail(ex: LlamaCppExecutor, req: Request, first: int | None) -> list[int | None]:
    """The sampled token of the prompt's last chunk and 7 decodes after it."""
    out = [first]
    for _ in range(7):
        out.append(step(ex, req, 1))
    return out


def test_restore_into_fragmented_cache_loads_pieces_exactly(model: Model) -> None:
    p1 = prompt_of(model, 512, seed=1)
    p2 = p1 + prompt_of(model, 40, seed=2)
    assert len(p2) == 552

    warm = executor(model)
    a = request(warm, "a", [*p1, 0])  # 512 cells computed, the call's output not yet
    prefill(warm, a, 512)
    seq = warm._seq["a"]
    whole = (ctypes.c_uint8 * L.llama_state_seq_get_size(warm.ctx, seq))()
    size = L.llama_state_seq_get_data(warm.ctx, whole, len(whole), seq)
    warm.offloaded("a", 512)
    copy = warm.host_copy("a")
    assert copy is not None and len(copy.pieces) == 512 // PIECE_TOKENS
    warm.truncated("a", 0)  # evicted: only the host copy is left

    # Six 150-token sessions fill 900 of the 1,024 cells; ending every other one leaves four
    # holes (150, 150, 150 and the 124 at the end): 574 free cells, no run of 512.
    fillers = []
    for i in range(6):
        f = request(warm, f"f{i}", [*prompt_of(model, 150, seed=10 + i), 0])
        prefill(warm, f, 150)
        fillers.append(f)
    for f in fillers[::2]:
        warm.ended(f.session_id)
    spare = warm._free_seqs[-1]
    assert L.llama_state_seq_set_data(warm.ctx, whole, size, spare) == 0, "cache not fragmented"
    L.llama_memory_seq_rm(warm.mem, spare, -1, -1)

    b = request(warm, "a", p2, turn=1)
    b.num_computed_tokens = 512
    resumed = greedy_tail(warm, b, step(warm, b, 40, restore=512))
    assert warm.restore_fallbacks == 0
    held = L.llama_memory_seq_pos_max(warm.mem, warm._seq["a"]) + 1
    assert held == 552 + 7

    cold = executor(model)
    c = request(cold, "a", p2, turn=1)
    prefill(cold, c, 512)  # the first turn's chunking: 256 + 256, then the 40 new tokens
    recomputed = greedy_tail(cold, c, step(cold, c, 40))
    assert resumed == recomputed
    assert all(t is not None for t in resumed)


def test_prefetch_that_finds_no_room_leaves_the_sequence_as_it_was(model: Model) -> None:
    ex = executor(model)
    a = request(ex, "a", [*prompt_of(model, 600, seed=3), 0])
    prefill(ex, a, 600)
    ex.offloaded("a", 600)
    ex.truncated("a", 300)  # 300 cells still on the GPU, the rest only on the host
    f = request(ex, "f", [*prompt_of(model, 700, seed=4), 0])
    prefill(ex, f, 700)  # 24 cells left: the missing 300 cannot come back
    assert not ex.prefetched("a", 600)
    assert L.llama_memory_seq_pos_max(ex.mem, ex._seq["a"]) + 1 == 300
    ex.ended("f")
    assert ex.prefetched("a", 600)
    assert L.llama_memory_seq_pos_max(ex.mem, ex._seq["a"]) + 1 == 600


def test_restore_into_the_single_cells_of_sessions_that_decoded_together(model: Model) -> None:
    # Four sessions step one position each per batch (as decode does): their cells interleave,
    # so what one of them frees is a 100-cell run and then 150 single cells between the others'.
    ex = executor(model)
    reqs = [request(ex, f"s{i}", [*prompt_of(model, 250, seed=20 + i), 0]) for i in range(4)]
    for r in reqs:
        prefill(ex, r, 100)
    for _ in range(150):
        ex.execute(StepPlan(0, reqs, [1] * 4, [r.num_computed_tokens for r in reqs]))
        for r in reqs:
            r.num_computed_tokens += 1
    ex.offloaded("s1", 250)
    ex.truncated("s1", 0)  # 274 free cells: the 24 never used, the 100-run, 150 single ones
    b = request(ex, "s1", [*prompt_of(model, 250, seed=21), 0, 5], turn=1)
    b.num_computed_tokens = 250
    step(ex, b, 2, restore=250)
    assert ex.restore_fallbacks == 0  # a multi-cell piece would have found no room
    assert L.llama_memory_seq_pos_max(ex.mem, ex._seq["s1"]) + 1 == 252
