"""`LlamaCppExecutor`: runs a `StepPlan` as one `llama_decode` batch on a llama.cpp context.

One context, many sequence slots, one unified KV cache. The scheduler's KV manager (block size 1,
one block per cell, at most `n_seq_max` sessions on the GPU) decides; this class mirrors every
decision in the real cache through the `KVListener` calls: truncations (`llama_memory_seq_rm`),
prefixes shared between sessions (`llama_memory_seq_cp`: one cell tagged with several sequences),
offloads (`llama_state_seq_get_data` into host memory), warm restores ahead of a call
(`prefetched`) and, from the plan, restores (`llama_state_seq_set_data`). Restores are exact:
same cells, same logits as a recompute with the same chunking on an empty cache.

Host copies are kept in pieces of `PIECE_TOKENS` positions. llama.cpp loads a saved sequence
into one contiguous run of free cells, and a cache shared by many sessions is fragmented: a whole
context rarely finds such a run, a one-cell piece always does. Each piece is saved from, and
loaded into, a scratch sequence (`llama_memory_seq_cp` tags cells with a second sequence without
copying them), then its cells are re-tagged to the session's sequence. A piece that finds no
free cell is computed instead, from there on: exact too, only slower.
"""

from __future__ import annotations

import ctypes
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import llama_cpp as L
import numpy as np

from mars.core.request import Request
from mars.engine.logprobs import TokenLogprob, token_logprob
from mars.engine.model import Model
from mars.engine.sampling import SamplingParams
from mars.sched.plan import StepPlan, StepResult

# Positions per piece of a host copy. A piece needs that many contiguous free cells, and a cache
# shared by sessions that decode together holds their cells interleaved (one per sequence per
# step), so the cells an eviction frees are often single: after four sessions decoded 150 tokens
# together, a 250-token copy evicted from among them loaded only 120 tokens in 8-, 4- or 2-token
# pieces (124 at best), all 250 in 1-token ones; with 8-token pieces 33 of 61 restores of one
# live benchmark run computed (`mars bench`, seed 2). llama_kv_self_defrag does not compact this
# cache (120 -> 128 tokens), so there is no second try. A one-cell piece costs ~0.12 ms to save
# and as much to load (250 tokens: 32 ms and 30 ms), ~50x less than computing it; its headers
# add 3% to the copy's bytes.
PIECE_TOKENS = 1
# Seconds of sampling one constrained request may take in all (grammar matching runs on the
# engine thread, between every session's steps); a request past it ends with an error.
GRAMMAR_BUDGET_S = 10.0
# llama.cpp's sequence limit (LLAMA_MAX_SEQ); one sequence is the pieces' scratch.
MAX_SEQUENCES = 256 - 1


@dataclass(frozen=True)
class HostCopy:
    """A sequence's KV in host memory: positions [0, num_tokens), `pieces[i]` holding
    [i * piece_tokens, (i + 1) * piece_tokens)."""

    piece_tokens: int
    num_tokens: int
    pieces: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.pieces)


@dataclass(frozen=True)
class ExecutorConfig:
    kv_tokens: int = 16384  # KV cells (the context size)
    max_sequences: int = 32  # sequence slots: sessions whose KV may stay on the GPU at once
    batch_tokens: int = 512  # most tokens one llama_decode takes (the scheduler's budget)
    threads: int = max(1, (os.cpu_count() or 2))

    def __post_init__(self) -> None:
        if min(self.kv_tokens, self.max_sequences, self.batch_tokens, self.threads) < 1:
            raise ValueError(f"bad executor config {self}: every value must be positive")
        if self.max_sequences > MAX_SEQUENCES:
            raise ValueError(
                f"at most {MAX_SEQUENCES} sessions can hold KV in llama.cpp at once (its "
                f"{MAX_SEQUENCES + 1} sequences, one kept for copies), got {self.max_sequences}"
            )


class StepFailed(RuntimeError):
    """llama.cpp refused a batch; the engine aborts the step's requests and carries on."""

    def __init__(self, plan: StepPlan, message: str) -> None:
        super().__init__(message)
        self.plan = plan


class _Sampler:
    """A llama.cpp sampler chain for one request (its RNG, grammar and penalty state live across
    steps). `prompt` feeds the repetition penalty, which counts the prompt's tokens (as vLLM)."""

    def __init__(self, model: Model, params: SamplingParams, prompt: Sequence[int] = ()) -> None:
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self.ptr = chain
        if params.grammar:
            g = L.llama_sampler_init_grammar(model.vocab, params.grammar.encode(), b"root")
            if not g:
                self.close()
                raise ValueError("the output's grammar did not compile")
            L.llama_sampler_chain_add(chain, g)
        if params.logit_bias:
            if any(not 0 <= t < model.n_vocab for t, _ in params.logit_bias):
                self.close()
                raise ValueError(f"logit_bias token ids must be in [0, {model.n_vocab})")
            entries = [L.llama_logit_bias(t, b) for t, b in params.logit_bias]
            bias = (L.llama_logit_bias * len(entries))(*entries)
            L.llama_sampler_chain_add(
                chain, L.llama_sampler_init_logit_bias(model.n_vocab, len(bias), bias)
            )
        if params.repetition_penalty != 1.0:
            last_n = len(prompt) + params.max_tokens
            rep = L.llama_sampler_init_penalties(last_n, params.repetition_penalty, 0.0, 0.0)
            for tok in prompt:
                L.llama_sampler_accept(rep, tok)
            L.llama_sampler_chain_add(chain, rep)
        if params.presence_penalty or params.frequency_penalty:
            pen = L.llama_sampler_init_penalties(
                params.max_tokens, 1.0, params.frequency_penalty, params.presence_penalty
            )
            L.llama_sampler_chain_add(chain, pen)
        if params.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(params.min_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def close(self) -> None:
        if self.ptr:
            L.llama_sampler_free(self.ptr)
            self.ptr = None


# llama_token_data, as numpy lays out a row of candidates.
_CANDIDATE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class LlamaCppExecutor:
    def __init__(self, model: Model, config: ExecutorConfig) -> None:
        self.model = model
        self.config = config
        cp = L.llama_context_default_params()
        cp.n_ctx = config.kv_tokens
        cp.n_batch = config.batch_tokens
        cp.n_ubatch = config.batch_tokens
        cp.n_seq_max = config.max_sequences + 1  # the last one is the pieces' scratch
        cp.n_threads = cp.n_threads_batch = config.threads
        cp.kv_unified = True
        self.ctx = L.llama_init_from_model(model.ptr, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {config.kv_tokens} cells")
        self.kv_tokens = L.llama_n_ctx(self.ctx)
        self.mem = L.llama_get_memory(self.ctx)
        self._batch = L.llama_batch_init(config.batch_tokens, 0, 1)
        self._free_seqs = list(range(config.max_sequences - 1, -1, -1))
        self._scratch = config.max_sequences
        self._seq: dict[str, int] = {}  # session -> sequence slot holding its cells
        self._host: dict[str, HostCopy] = {}  # session -> saved sequence state (offloaded KV)
        self._prompts: dict[str, list[int]] = {}  # request id -> prompt token ids
        self._params: dict[str, SamplingParams] = {}
        self._samplers: dict[str, _Sampler] = {}
        self._eog = model.eog_ids
        self._vocab_ids = np.arange(model.n_vocab, dtype=np.int32)
        self._candidates = np.zeros(model.n_vocab, dtype=_CANDIDATE)
        self._candidates_ptr = self._candidates.ctypes.data_as(L.llama_token_data_p)
        # Requests ended because sampling cannot go on (request id -> why, for its client): a
        # grammar that admits no token the model can produce, handed to llama.cpp, aborts the
        # process; one that costs past GRAMMAR_BUDGET_S would hold every other session up.
        self.dead_ends: dict[str, str] = {}
        self._sample_s: dict[str, float] = {}  # request id -> seconds its samples took
        # Request id -> its last sampled token's log-probabilities (requests that ask for them);
        # the live engine takes each one with its token, in the same step.
        self.logprobs: dict[str, TokenLogprob] = {}
        self.offload_bytes = 0
        self.restore_fallbacks = 0  # restores that computed a piece (no contiguous free cells)
        self.copy_s = 0.0  # seconds spent copying KV to and from host memory
        # Told (tokens, seconds) of every host-to-cache copy: the live step-time model learns
        # restore costs from it.
        self.on_copy: Callable[[int, float], None] | None = None
        self.busy_s = 0.0

    # ---- requests ---------------------------------------------------------------------------
    def add(self, req: Request, prompt: list[int], params: SamplingParams) -> None:
        self._prompts[req.request_id] = prompt
        self._params[req.request_id] = params
        self._samplers[req.request_id] = _Sampler(self.model, params, prompt)

    def check(self, params: SamplingParams) -> None:
        """Raise ValueError if `params` cannot be sampled (a grammar llama.cpp does not parse).

        Called on the client's thread: a failure inside the engine thread would stop the engine.
        """
        _Sampler(self.model, params).close()

    def prompt_of(self, request_id: str) -> list[int]:
        return self._prompts.get(request_id, [])

    def release(self, request_id: str) -> None:
        self._prompts.pop(request_id, None)
        self._params.pop(request_id, None)
        self.dead_ends.pop(request_id, None)
        self._sample_s.pop(request_id, None)
        self.logprobs.pop(request_id, None)
        sampler = self._samplers.pop(request_id, None)
        if sampler is not None:
            sampler.close()

    # ---- KVListener -------------------------------------------------------------------------
    def truncated(self, session_id: str, num_tokens: int) -> None:
        seq = self._seq.get(session_id)
        if seq is None:
            return
        L.llama_memory_seq_rm(self.mem, seq, num_tokens, -1)
        if num_tokens == 0:
            del self._seq[session_id]
            self._free_seqs.append(seq)

    def shared(self, session_id: str, source_id: str, num_tokens: int) -> None:
        seq = self._slot(session_id)
        L.llama_memory_seq_rm(self.mem, seq, -1, -1)
        L.llama_memory_seq_cp(self.mem, self._seq[source_id], seq, 0, num_tokens)

    def offloaded(self, session_id: str, num_tokens: int) -> None:
        seq = self._seq.get(session_id)
        if seq is None:
            return
        t0 = time.perf_counter()
        pieces, scratch = [], self._scratch
        buf: ctypes.Array[ctypes.c_uint8] | None = None
        saved = 0
        for first in range(0, num_tokens, PIECE_TOKENS):
            stop = min(first + PIECE_TOKENS, num_tokens)
            L.llama_memory_seq_cp(self.mem, seq, scratch, first, stop)
            if buf is None:  # sized once (get_size serialises too): the first piece is full
                buf = (ctypes.c_uint8 * L.llama_state_seq_get_size(self.ctx, scratch))()
            written = L.llama_state_seq_get_data(self.ctx, buf, len(buf), scratch)
            L.llama_memory_seq_rm(self.mem, scratch, -1, -1)
            if not written:
                break  # keep the pieces before it: a restore computes the rest, exactly
            pieces.append(ctypes.string_at(buf, written))
            saved = stop
        self._keep(session_id, HostCopy(PIECE_TOKENS, saved, tuple(pieces)))
        self.copy_s += time.perf_counter() - t0

    def prefetched(self, session_id: str, num_tokens: int) -> bool:
        copy = self._host.get(session_id)
        if copy is None:
            return False
        t0 = time.perf_counter()
        seq = self._slot(session_id)
        held = L.llama_memory_seq_pos_max(self.mem, seq) + 1
        # All or nothing: if the cells are not there, the call restores (or computes) when it
        # comes.
        if self._load(copy, seq, held, num_tokens) < num_tokens:
            self.truncated(session_id, held)  # as it was
            return False
        self._copied(num_tokens - held, t0)
        return True

    def host_copy(self, session_id: str) -> HostCopy | None:
        """The session's KV as `offloaded` saved it in host memory, or None."""
        return self._host.get(session_id)

    def put_host_copy(self, session_id: str, copy: HostCopy) -> None:
        """Hold `copy` (a `host_copy`) as the session's offloaded KV; a plan's restore loads it.

        `mars calibrate` clones one prefilled context into many sessions this way.
        """
        self._keep(session_id, copy)

    def _keep(self, session_id: str, copy: HostCopy) -> None:
        old = self._host.get(session_id)
        self.offload_bytes += copy.nbytes - (old.nbytes if old else 0)
        self._host[session_id] = copy

    def ended(self, session_id: str) -> None:
        self.truncated(session_id, 0)
        old = self._host.pop(session_id, None)
        if old:
            self.offload_bytes -= old.nbytes

    # ---- one step ---------------------------------------------------------------------------
    def _slot(self, session_id: str) -> int:
        seq = self._seq.get(session_id)
        if seq is None:
            seq = self._free_seqs.pop()  # the KV manager keeps sessions <= max_sequences
            L.llama_memory_seq_rm(self.mem, seq, -1, -1)
            self._seq[session_id] = seq
        return seq

    def _restore(self, req: Request, tokens: int) -> None:
        """Bring the session's host copy back so that its sequence holds `req`'s computed tokens
        (`tokens` of them come from the host; the rest are still on the GPU)."""
        t0 = time.perf_counter()
        seq = self._slot(req.session_id)
        target, kept = req.num_computed_tokens, req.num_computed_tokens - tokens
        L.llama_memory_seq_rm(self.mem, seq, kept, -1)
        copy = self._host[req.session_id]
        loaded = self._load(copy, seq, kept, target)
        if loaded < target:
            self._recompute(req, seq, loaded, target)
            self.restore_fallbacks += 1
        self._copied(tokens, t0)

    def _load(self, copy: HostCopy, seq: int, start: int, end: int) -> int:
        """Load positions [start, end) of `copy` into `seq` (which holds [0, start)), piece by
        piece; the first position not loaded (`end` when all were)."""
        scratch, size = self._scratch, copy.piece_tokens
        pos = start
        end = min(end, copy.num_tokens)
        while pos < end:
            first = pos // size * size
            data = copy.pieces[pos // size]
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            if L.llama_state_seq_set_data(self.ctx, buf, len(data), scratch) == 0:
                break
            stop = min(first + size, end)
            L.llama_memory_seq_rm(self.mem, scratch, first, pos)  # already on the GPU
            L.llama_memory_seq_rm(self.mem, scratch, stop, -1)  # not asked for
            L.llama_memory_seq_cp(self.mem, scratch, seq, -1, -1)
            L.llama_memory_seq_rm(self.mem, scratch, -1, -1)
            pos = stop
        L.llama_memory_seq_rm(self.mem, scratch, -1, -1)
        return pos

    def _copied(self, tokens: int, t0: float) -> None:
        """A restore of `tokens` took since `t0`, however it was done (a copy, or computing what
        could not be copied): what policies should expect a restore to cost on this engine."""
        elapsed = time.perf_counter() - t0
        self.copy_s += elapsed
        if self.on_copy is not None:
            self.on_copy(tokens, elapsed)

    def _recompute(self, req: Request, seq: int, start: int, end: int) -> None:
        """Prefill positions [start, end) of the request's sequence, in batch-sized chunks."""
        prompt = self._prompts[req.request_id]
        batch = self._batch
        for first in range(start, end, self.config.batch_tokens):
            batch.n_tokens = 0
            for pos in range(first, min(end, first + self.config.batch_tokens)):
                i = batch.n_tokens
                batch.token[i] = prompt[pos]
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = False
                batch.n_tokens += 1
            rc = L.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"recomputing the KV of session {req.session_id}: {rc}")

    def execute(self, plan: StepPlan) -> StepResult:
        try:
            for req, tokens in plan.restores:
                self._restore(req, tokens)
        except RuntimeError as e:
            raise StepFailed(plan, str(e)) from None
        batch = self._batch
        batch.n_tokens = 0
        sample_at: list[int] = []  # batch index of each request's logits, -1 if none
        for req, n, ctx_len in zip(
            plan.requests, plan.num_new_tokens, plan.context_lens, strict=True
        ):
            seq = self._slot(req.session_id)
            L.llama_memory_seq_rm(self.mem, seq, ctx_len, -1)  # exactly ctx_len cells remain
            prompt = self._prompts[req.request_id]
            out = req.output_token_ids
            for pos in range(ctx_len, ctx_len + n):
                i = batch.n_tokens
                batch.token[i] = prompt[pos] if pos < len(prompt) else out[pos - len(prompt)]
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = False
                batch.n_tokens += 1
            samples = ctx_len + n == req.num_tokens
            if samples:
                batch.logits[batch.n_tokens - 1] = True
            sample_at.append(batch.n_tokens - 1 if samples else -1)
        rc = L.llama_decode(self.ctx, batch)
        if rc != 0:
            raise StepFailed(plan, f"llama_decode failed with {rc} on {batch.n_tokens} tokens")
        token_ids: list[int | None] = []
        for req, idx in zip(plan.requests, sample_at, strict=True):
            token_ids.append(None if idx < 0 else self._sample(req, idx))
        return StepResult(plan.step_id, 0.0, token_ids)

    def _sample(self, req: Request, idx: int) -> int:
        """Sample as `llama_sampler_sample` does, but check the chain's pick before the chain
        accepts it: a grammar that rejects every token (a literal no token spells, such as a
        NUL, or a finished call whose end is masked by `min_tokens`) makes llama.cpp throw, and
        a C++ exception through ctypes ends the process. Such a request ends here instead."""
        rid = req.request_id
        params = self._params[rid]
        n = len(self._candidates)
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, idx), shape=(n,))
        cand = self._candidates
        cand["id"] = self._vocab_ids
        cand["logit"] = logits
        cand["p"] = 0.0
        if params.ignore_eos or req.num_output_tokens < params.min_tokens:
            cand["logit"][self._eog] = -np.inf
        chain = self._samplers[rid].ptr
        arr = L.llama_token_data_array(self._candidates_ptr, n, -1, False)
        t0 = time.perf_counter()
        L.llama_sampler_apply(chain, ctypes.byref(arr))
        spent = self._sample_s[rid] = self._sample_s.get(rid, 0.0) + time.perf_counter() - t0
        picked = arr.selected
        if not 0 <= picked < arr.size or not np.isfinite(cand["logit"][picked]):
            self.dead_ends[rid] = (
                "the output's constraint (a forced tool call's or response_format's grammar) "
                "admits no token the model can produce here: check its schema's names and "
                "values for characters no text holds, and min_tokens"
            )
            return self._eog[0]
        if params.grammar and spent > GRAMMAR_BUDGET_S:
            self.dead_ends[rid] = (
                f"the output's grammar took {spent:.1f} s of sampling, past the "
                f"{GRAMMAR_BUDGET_S:.0f} s one request may hold the engine for; simplify its "
                "schema or use tool_choice 'auto'"
            )
            return self._eog[0]
        token = int(cand["id"][picked])
        L.llama_sampler_accept(chain, token)
        if params.logprobs is not None:  # of the raw logits: `cand` holds the masked copy
            self.logprobs[rid] = token_logprob(logits, token, params.logprobs)
        return token

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.model.vocab, token))

    def close(self) -> None:
        for rid in list(self._samplers):
            self.release(rid)
        if self.ctx:
            L.llama_batch_free(self._batch)
            L.llama_free(self.ctx)
            self.ctx = None
