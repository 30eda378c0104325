"""Continuous batching with chunked prefill under a per-step token budget (vLLM V1's loop).

`schedule()` builds a `StepPlan`: running requests first (decode tokens and prefill chunks), then
waiting ones while budget, sequence slots and KV last; `update()` applies a `StepResult`. Every
choice (order, chunk, victim, retention) is a call on the `Policy`; nothing here names a policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mars.core.clock import Clock
from mars.core.events import EventBus, GpuEnd, GpuFirstToken, GpuPreempt, GpuSubmit, RequestEmit
from mars.core.request import Request, RequestStatus
from mars.core.session import Session
from mars.kv.manager import KVManager
from mars.sched.plan import StepPlan, StepResult
from mars.sched.policy import Policy, PolicyContext, StepTimer


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192  # per-step token budget (vLLM's chunked-prefill default)
    max_num_seqs: int = 256  # running requests at most (vLLM's default)

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError(f"bad scheduler config {self}")


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        policy: Policy,
        kv: KVManager,
        clock: Clock,
        bus: EventBus,
        sessions: dict[str, Session] | None = None,
        timer: StepTimer | None = None,
        tool_workers: int | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.kv = kv
        self.clock = clock
        self.bus = bus
        self.sessions: dict[str, Session] = {} if sessions is None else sessions
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._next_step = 0
        self._lost: dict[str, int] = {}  # request id -> computed tokens lost at its preemption
        # True while no waiting request can start until something finishes: the last schedule
        # tried the waiting queue, started nothing and stopped on KV or sequence slots (both only
        # get scarcer during pure decode), and nothing has arrived or finished since.
        self._waiting_blocked = False
        # Totals for metrics: prompt tokens at first schedule, of them served from cache, and
        # tokens computed a second time (after a preemption or an evicted session cache).
        self.prompt_tokens = self.hit_tokens = self.recomputed_tokens = 0
        self.num_preemptions = 0
        # Called when a call's output is complete, before the policy decides its KV's fate: the
        # agent side fills in what the output revealed (`Request.next_tool`).
        self.on_output_done: Callable[[Request], None] | None = None
        policy.bind(
            PolicyContext(
                clock, bus, kv, self.sessions, config.max_num_batched_tokens, timer, tool_workers
            )
        )

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)
        self._waiting_blocked = False
        if self.bus.wants(RequestEmit):
            self.bus.publish(
                RequestEmit(
                    req.arrival_time,
                    req.session_id,
                    req.request_id,
                    req.num_prompt_tokens,
                    req.reuse_tokens,
                )
            )

    # ---- schedule -------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan(self._next_step)
        self._next_step += 1
        budget = self._schedule_running(plan, self.config.max_num_batched_tokens)
        self._waiting_blocked = False
        # vLLM starts no waiting request in a step that preempted, so the victim is not taken
        # straight back; but if the preemptions emptied the batch, there would be no step at
        # all to wait for (an idle engine), so the waiting queue has its turn now.
        if not plan.preempted or plan.is_empty:
            self._waiting_blocked = self._schedule_waiting(plan, budget)
            if plan.total_tokens < self.config.max_num_batched_tokens:
                self._prefetch(plan)
        self._free_blocks_seen = self.kv.num_free_blocks
        self.stable_until = self.policy.stable_until(self.waiting)
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> int:
        policy, kv = self.policy, self.kv
        for req in list(policy.order_running(self.running)):
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = req.num_tokens - req.num_computed_tokens
            if req.num_computed_tokens < req.num_prompt_tokens:
                n = min(n, policy.chunk_tokens(req, budget))
            n = min(n, budget)
            while n > 0 and kv.allocate(req, n) is None:
                smaller = policy.shrink_chunk(req, n) if req.is_prefill else None
                if smaller is not None and 0 < smaller < n:
                    n = smaller  # a smaller chunk may fit without evicting anyone
                    continue
                victim = policy.pick_victim(self.running, req)
                if victim is None:
                    n = 0
                    break
                if victim in plan.requests:
                    budget += plan.remove(victim)
                self._preempt(victim, plan)
                if victim is req:
                    n = 0
            if n > 0:
                plan.add(req, n)
                budget -= n
        return budget

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> bool:
        """Start waiting requests; True if none could start for want of KV or sequence slots."""
        if len(self.running) >= self.config.max_num_seqs:
            return bool(self.waiting)  # no sequence slot: nothing can start (vLLM's check)
        policy, kv, now = self.policy, self.kv, self.clock.now()
        started: list[Request] = []
        out_of_budget = False
        for req in policy.order_waiting(self.waiting):
            if budget <= 0:
                out_of_budget = True
                break
            if len(self.running) + len(started) >= self.config.max_num_seqs:
                break
            limit = min(budget, policy.chunk_tokens(req, budget))
            start = kv.start(req, limit)
            while start is None and not self.running and not started and kv.unpin_oldest():
                # Nothing runs, so nothing else will free KV: pins are hints, not locks.
                start = kv.start(req, limit)
            if start is None:
                if policy.stop_after_failure():
                    break
                continue
            cached = start.hit.gpu_tokens + start.hit.host_tokens
            lost = self._lost.pop(req.request_id, None)
            if lost is None:  # first schedule of this call
                req.num_cached_tokens = cached
                req.first_scheduled_time = now
                self.prompt_tokens += req.num_prompt_tokens
                self.hit_tokens += cached
                recomputed = req.reuse_tokens - cached
            else:
                recomputed = lost - cached
            if recomputed > 0:
                req.num_recomputed_tokens += recomputed
                self.recomputed_tokens += recomputed
            if start.hit.host_tokens:
                plan.restores.append((req, start.hit.host_tokens))
            # Restored tokens count as context: the step attends over them, computes none.
            plan.add(req, start.num_new_tokens)
            budget -= start.num_new_tokens
            started.append(req)
            if self.bus.wants(GpuSubmit):
                self.bus.publish(GpuSubmit(now, req.session_id, req.request_id, cached))
        if started:
            ids = {id(r) for r in started}
            self.waiting = [r for r in self.waiting if id(r) not in ids]
            for req in started:
                req.status = RequestStatus.RUNNING
            self.running.extend(started)
        return bool(self.waiting) and not started and not out_of_budget

    def _prefetch(self, plan: StepPlan) -> None:
        """Warm restores in a step with slack (budget left, nothing preempted)."""
        for session_id in self.policy.prefetch():
            tokens = self.kv.prefetch(session_id)
            if tokens:
                plan.prefetches.append((session_id, tokens))

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        """Recompute preemption (vLLM V1): free the KV, back to the front of the queue."""
        self.running.remove(req)
        self.kv.free(req)
        self._lost[req.request_id] = req.num_computed_tokens
        if self.bus.wants(GpuPreempt):
            self.bus.publish(
                GpuPreempt(
                    self.clock.now(), req.session_id, req.request_id, req.num_computed_tokens
                )
            )
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)
        plan.preempted.append(req)

    # ---- update ---------------------------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply a finished step; return the requests that finished in it."""
        now = self.clock.now()
        finished: list[Request] = []
        token_ids = result.token_ids
        for i, req in enumerate(plan.requests):
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += plan.num_new_tokens[i]
            if req.num_computed_tokens < req.num_tokens:
                continue  # mid-prefill: nothing sampled
            req.num_output_tokens += 1
            if token_ids is not None:
                tok = token_ids[i]
                if tok is not None:
                    req.output_token_ids.append(tok)
            if req.first_token_time is None:
                req.first_token_time = now
                if self.bus.wants(GpuFirstToken):
                    self.bus.publish(GpuFirstToken(now, req.session_id, req.request_id))
            if req.request_id in result.stopped:
                self._finish(req, RequestStatus.FINISHED_STOPPED, now)
                finished.append(req)
            elif req.num_output_tokens >= req.max_tokens:
                self._finish(req, RequestStatus.FINISHED_LENGTH, now)
                finished.append(req)
        if finished:
            self._waiting_blocked = False
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
        return finished

    def _finish(self, req: Request, status: RequestStatus, now: float) -> None:
        req.status = status
        req.finish_time = now
        if self.bus.wants(GpuEnd):  # before what happens to its KV (kv_retain, ...)
            self.bus.publish(
                GpuEnd(
                    now,
                    req.session_id,
                    req.request_id,
                    req.num_output_tokens,
                    status is RequestStatus.FINISHED_ABORTED,
                )
            )
        session = self.sessions.get(req.session_id)
        if session is not None and status is not RequestStatus.FINISHED_ABORTED:
            if self.on_output_done is not None:
                self.on_output_done(req)
            self.kv.finish(req, self.policy.retention(session, req))
        else:
            self.kv.free(req)

    def abort(self, request_id: str) -> Request | None:
        """Cancel a request wherever it is (client gone); its KV is freed. None if unknown."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._waiting_blocked = False
                    was_running = req.status is RequestStatus.RUNNING
                    if was_running:
                        self._finish(req, RequestStatus.FINISHED_ABORTED, self.clock.now())
                    else:
                        req.status = RequestStatus.FINISHED_ABORTED
                        req.finish_time = self.clock.now()
                    self._lost.pop(request_id, None)
                    return req
        return None

    # ---- decode fast-forward ----------------------------------------------------------------
    def decode_horizon(self) -> int:
        """How many next steps are certain to be the same pure-decode batch.

        Nonzero only when every running request is decoding, no waiting request can start (the
        queue is empty, or it was blocked at the last schedule and free KV only shrinks while
        decoding), the policy's decisions cannot change, and KV has room for every step; the
        stretch ends with the first finish.
        """
        running = self.running
        if not running or not self.policy.fast_forward_ok:
            return 0
        if self.waiting and (
            not self._waiting_blocked or self.kv.num_free_blocks > self._free_blocks_seen
        ):
            return 0  # something may start: KV was freed (an unpin, a session end) since
        if self.clock.now() >= min(self.stable_until, self.policy.stable_until(self.waiting)):
            return 0  # (asked again: a control tick since the last schedule may have news)
        if len(running) > self.config.max_num_batched_tokens:
            return 0
        k = min(r.max_tokens - r.num_output_tokens for r in running)
        if any(
            r.num_computed_tokens != r.num_tokens - 1 or r.num_output_tokens == 0 for r in running
        ):
            return 0  # a prefill chunk (even a one-token one) is due: its first token is stamped
        free = self.kv.num_free_blocks
        kv = self.kv
        while k > 0 and sum(kv.blocks_needed(r, k) for r in running) > free:
            k //= 2
        return k

    def advance_decode(self, steps: int) -> list[Request]:
        """Apply `steps` pure-decode steps at once (the clock is at the end of the last one)."""
        assert 0 < steps <= self.decode_horizon()
        self._next_step += steps
        for req in self.running:
            blocks = self.kv.allocate(req, steps)
            assert blocks is not None
            req.num_computed_tokens += steps - 1
            req.num_output_tokens += steps - 1
        plan = StepPlan(self._next_step - 1)
        for req in self.policy.order_running(self.running):  # the order schedule() would use
            plan.add(req, 1)
        return self.update(plan, StepResult(plan.step_id, 0.0))
