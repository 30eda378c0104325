"""`StepBench`: times hand-built steps on a real `LlamaCppExecutor` (for `mars calibrate`).

Each step is timed around `execute()` exactly as `EngineCore` does (the live engine's `step_s`):
the batch set-up, `llama_decode` and sampling. Every sequence of a step owns its own KV cells,
as sessions do in the live engine; the contexts are cloned from one prefilled sequence through
host copies (offload once, restore into each sequence), which also measures the KV copy rates.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence

from mars.core.request import Request
from mars.engine.llamacpp import HostCopy, LlamaCppExecutor
from mars.engine.sampling import SamplingParams
from mars.sched.plan import StepPlan
from mars.sim.fitted import Measurement

Batch = tuple[tuple[int, int], ...]  # per sequence: (new_tokens, context_len)


class StepBench:
    """Runs step shapes on a `LlamaCppExecutor` and times them (see the module docstring)."""

    def __init__(self, executor: LlamaCppExecutor, seed: int = 0) -> None:
        self.ex = executor
        self._rng = random.Random(seed)
        self._vocab = executor.model.n_vocab
        self._ids = 0
        self._copies: dict[int, HostCopy] = {}  # context length -> host KV of context + 1 tokens
        self.offloads: list[tuple[int, float]] = []  # (tokens, seconds) of every timed offload

    def prepare(self, contexts: Sequence[int]) -> None:
        """Prefill the longest context once, then make a host copy of every context (untimed
        for the steps, timed for the copies)."""
        longest = max(contexts, default=0)
        if longest == 0:
            return
        req = self._request(longest + 1)
        chunk = self.ex.config.batch_tokens
        for start in range(0, longest + 1, chunk):
            self._run(self._plan([(req, min(chunk, longest + 1 - start), start)], []))
        self._save(req, longest)
        for c in sorted(set(contexts) - {0, longest}, reverse=True):
            self._make_copy(c)

    def measure(self, label: str, batch: Batch, repeats: int) -> Measurement:
        """Median wall time of `repeats` identical steps of `batch`, after one untimed run that
        also restores the contexts."""
        reqs, items, restores = [], [], []
        for new, ctx in batch:
            req = self._request(ctx + new)
            if ctx:
                self.ex.put_host_copy(req.session_id, self._copies[ctx])
                req.num_computed_tokens = ctx
                restores.append((req, ctx))
            reqs.append(req)
            items.append((req, new, ctx))
        self._run(self._plan(items, restores))
        plan = self._plan(items, [])
        samples = tuple(self._run(plan) for _ in range(repeats))
        for req in reqs:
            self._end(req)
        return Measurement(label, batch, statistics.median(samples), samples)

    def measure_restore(self, context: int, repeats: int) -> float:
        """Seconds to restore `context` tokens: a decode step with the restore minus one without
        (the fastest of each: contention only adds time, and the copy is short)."""
        req = self._request(context + 1)
        req.num_computed_tokens = context
        self.ex.put_host_copy(req.session_id, self._copies[context])
        item = [(req, 1, context)]
        self._run(self._plan(item, [(req, context)]))  # untimed: first touch of the cells
        with_copy = [self._run(self._plan(item, [(req, context)])) for _ in range(repeats)]
        plain = [self._run(self._plan(item, [])) for _ in range(repeats)]
        self._end(req)
        return max(0.0, min(with_copy) - min(plain))

    def kv_bytes_per_token(self) -> float:
        c = max(self._copies)
        return self._copies[c].nbytes / (c + 1)

    # ---- helpers ------------------------------------------------------------------------------
    def _make_copy(self, context: int) -> None:
        """A host copy of `context` + 1 tokens: restore the longest copy, trim it, offload it."""
        longest = max(self._copies)
        req = self._request(context + 1)
        req.num_computed_tokens = context
        self.ex.put_host_copy(req.session_id, self._copies[longest])
        self._run(self._plan([(req, 1, context)], [(req, context)]))
        self._save(req, context)

    def _save(self, req: Request, context: int) -> None:
        t0 = time.perf_counter()
        self.ex.offloaded(req.session_id, context + 1)
        self.offloads.append((context + 1, time.perf_counter() - t0))
        copy = self.ex.host_copy(req.session_id)
        assert copy is not None
        self._copies[context] = copy
        self._end(req)

    def _request(self, num_tokens: int) -> Request:
        self._ids += 1
        sid = f"calibrate-{self._ids}"
        req = Request(f"{sid}-0", sid, num_tokens, 1, 0, 0.0)
        prompt = [self._rng.randrange(self._vocab) for _ in range(num_tokens)]
        self.ex.add(req, prompt, SamplingParams())
        return req

    def _plan(
        self, items: Sequence[tuple[Request, int, int]], restores: list[tuple[Request, int]]
    ) -> StepPlan:
        return StepPlan(
            0,
            [r for r, _, _ in items],
            [n for _, n, _ in items],
            [c for _, _, c in items],
            restores=restores,
        )

    def _run(self, plan: StepPlan) -> float:
        t0 = time.perf_counter()
        self.ex.execute(plan)
        return time.perf_counter() - t0

    def _end(self, req: Request) -> None:
        self.ex.ended(req.session_id)
        self.ex.release(req.request_id)


def per_token(samples: Sequence[tuple[int, float]]) -> float:
    """Least-squares seconds per token of (tokens, seconds) samples, through the origin."""
    den = sum(n * n for n, _ in samples)
    return sum(n * s for n, s in samples) / den if den else 0.0
