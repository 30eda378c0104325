"""The live engine loop: the shared scheduler and policy driving a llama.cpp executor in a thread.

The loop is the simulator's: admit -> `schedule()` -> `execute()` -> `update()` -> publish, on a
`WallClock`. Clients submit requests from any thread or event loop and receive their tokens on an
asyncio queue; cancelling the consumer (a dropped client) aborts the request and frees its slot.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mars.control.admission import AdmissionLimits, AdmissionQueue, Overloaded
from mars.core.clock import WallClock
from mars.core.events import (
    Event,
    EventBus,
    SessionArrived,
    SessionDone,
    ToolEnd,
    ToolEnqueued,
    ToolStart,
)
from mars.core.request import Request, RequestStatus
from mars.core.session import Session, SessionStatus, ToolCall, Turn
from mars.engine.llamacpp import ExecutorConfig, LlamaCppExecutor, StepFailed
from mars.engine.logprobs import TokenLogprob
from mars.engine.loop import EngineCore
from mars.engine.model import Detokenizer, Model
from mars.engine.sampling import SamplingParams
from mars.kv.manager import KVConfig, KVManager
from mars.kv.prefix import common_prefix
from mars.sched.plan import StepPlan, StepResult
from mars.sched.policy import StepTimer
from mars.sched.registry import make_policy
from mars.sched.scheduler import Scheduler, SchedulerConfig
from mars.sched.timer import OnlineStepTimer


@dataclass(frozen=True)
class Chunk:
    """New output of one request: text since the last chunk, and the final state when done."""

    text: str
    token_ids: list[int]
    # "stop" | "length" | "abort" | "queue_full" | "queue_timeout" | "dead_end" (the output's
    # grammar admits no token the model can produce) | "stalled" (nothing could run for
    # `stall_timeout_s`)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None  # why, when finish_reason is "dead_end" or "stalled"
    # The log-probabilities (when the request asked) of the tokens whose text ends in this
    # chunk, in order. Not aligned with `token_ids`, which go out as they are sampled: a token's
    # text may be held back (the start of a stop string) and end in a later chunk. An
    # end-of-generation token (no text) comes with the last chunk; a token wholly inside a stop
    # string, or after it, is never reported.
    logprobs: tuple[TokenLogprob, ...] = ()


# Seconds calls may wait while no step can run before they end with a "stalled" error.
STALL_TIMEOUT_S = 60.0

# The engine took the call (it runs, or its session waits for admission): a stream's first chunk,
# so its status can go out before its headers.
_ACCEPTED = Chunk("", [])
_ABORTED = Chunk("", [], "abort")
_QUEUE_FULL = Chunk("", [], "queue_full")
_QUEUE_TIMEOUT = Chunk("", [], "queue_timeout")


@dataclass
class _Stream:
    req: Request
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Chunk]
    detok: Detokenizer
    text: str = ""  # text emitted so far (for stop strings)
    held: str = ""  # text held back because it may be the start of a stop string
    done: bool = False
    # Log-probabilities not sent yet, each with where its token's text starts and ends in
    # `text + held` (equal for a token with no text of its own, such as a byte of a character).
    placed: list[tuple[int, int, TokenLogprob]] = field(default_factory=list)

    def sent_logprobs(self, stopped: bool = False) -> tuple[TokenLogprob, ...]:
        """Take the log-probabilities of the tokens whose text is sent (`text`): whole, or, at
        a stop string (which ends the output there), in part. A token with no text of its own
        goes once text after it does (the rest of its character)."""
        sent = len(self.text)
        n = 0
        for start, end, _ in self.placed:
            whole = end <= sent and (start < end or start < sent)
            if not (start < sent if stopped else whole):
                break
            n += 1
        out = tuple(lp for _, _, lp in self.placed[:n])
        del self.placed[:n]
        return out


@dataclass
class _Pending:
    """A call that reached the engine thread; held there while its session awaits admission."""

    rid: str
    prompt: list[int]
    params: SamplingParams
    stream: _Stream
    arrival: float
    tool_name: str | None  # the tool the agent ran before this call (a marker), if named
    next_tool: str | None  # the tool its answer leads to: a marker, "unknown", None = the end
    salt: str = ""  # it shares KV across sessions only with calls of this salt


class LiveEngine:
    def __init__(
        self,
        model: Model,
        executor_config: ExecutorConfig | None = None,
        policy: str = "fcfs",
        host_kv_tokens: int = 0,
        bus: EventBus | None = None,
        limits: AdmissionLimits | None = None,
        tool_workers: int | None = None,
        settings: Mapping[str, object] | None = None,
        timer: StepTimer | None = None,
        stall_timeout_s: float = STALL_TIMEOUT_S,
    ) -> None:
        self.model = model
        # Calls waiting with no step run for this long end with a "stalled" error.
        self.stall_timeout_s = stall_timeout_s
        self._stalled_since: float | None = None
        self.clock = WallClock()
        self.bus = bus or EventBus()
        cfg = executor_config or ExecutorConfig()
        self.executor = LlamaCppExecutor(model, cfg)
        self.kv = KVManager(
            KVConfig(self.executor.kv_tokens, 1, host_kv_tokens, cfg.max_sequences),
            self.clock,
            self.bus,
            listener=self.executor,
        )
        self.sessions: dict[str, Session] = {}
        # What policies ask a recompute or a restore would cost: a calibration preset, or a
        # model learned from this engine's own steps.
        self.online_timer = OnlineStepTimer() if timer is None else None
        if self.online_timer is not None:
            self.executor.on_copy = self.online_timer.observe_copy
        self.scheduler = Scheduler(
            SchedulerConfig(cfg.batch_tokens, cfg.max_sequences),
            make_policy(policy, settings),
            self.kv,
            self.clock,
            self.bus,
            self.sessions,
            timer=timer or self.online_timer,
            tool_workers=tool_workers,
        )
        # The tool a finished call's output leads to: the agent's `this_func_call` marker, else
        # unknown (policies then use what they learned of all tools); None ends the session.
        self._next_tool: dict[str, str | None] = {}
        self.scheduler.on_output_done = self._reveal_tool
        self.limits = limits or AdmissionLimits()
        # The control plane: a new session's calls wait here (held) until the policy admits it.
        self.admission = AdmissionQueue(self.scheduler.policy, self.clock, self.bus, self._admitted)
        self._held: dict[str, list[_Pending]] = {}
        # Told of every session that ends (its past whole), e.g. the trace recorder.
        self.session_end_hooks: list[Callable[[Session], None]] = []
        self.policy_name = policy
        self.core = EngineCore(self.scheduler, self.executor)
        self._streams: dict[str, _Stream] = {}
        self._last_seq: dict[str, list[int]] = {}  # session -> tokens of its last finished call
        self._inbox: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.generated_tokens = 0
        self.failed_steps = 0
        self.error: BaseException | None = None

    @property
    def max_context(self) -> int:
        """Longest prompt + output one call may have: the KV cache (shared by all sessions), and
        no more than the model was trained on (past it, output degrades)."""
        trained = self.model.n_ctx_train
        return int(
            min(self.executor.kv_tokens, trained if trained > 0 else self.executor.kv_tokens)
        )

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mars-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for sid in [s for s in self.sessions if "#" not in s]:
            self._end_session(sid)  # the engine thread is gone: end what is open (hooks too)
        self.executor.close()

    def _post(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._inbox.append(fn)
        self._wake.set()

    # ---- client API (any thread / event loop) -------------------------------------------------
    async def generate(
        self,
        session_id: str,
        prompt: list[int],
        params: SamplingParams,
        tool_name: str | None = None,
        next_tool: str | None = "unknown",
        salt: str = "",
    ) -> AsyncIterator[Chunk]:
        """Stream a request's output; closing the iterator early aborts the request. The first
        chunk (empty) comes once the engine took the call: a full queue raises before it."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the "
                f"context of {self.max_context} tokens"
            )
        self.executor.check(params)
        self.check_queue(session_id)
        rid = f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk] = asyncio.Queue()
        arrival = self.clock.now()
        # The stream's request is a placeholder until the engine thread builds the real one.
        placeholder = Request(rid, session_id, len(prompt), params.max_tokens, 0, arrival)
        stream = _Stream(placeholder, params, loop, queue, Detokenizer(self.model))
        pending = _Pending(rid, prompt, params, stream, arrival, tool_name, next_tool, salt)
        self._post(lambda: self._arrive(session_id, pending))
        finished = False
        try:
            while True:
                chunk = await queue.get()
                if chunk.finish_reason in ("queue_full", "queue_timeout"):
                    finished = True
                    raise self._overloaded(chunk.finish_reason)
                yield chunk
                if chunk.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self._post(lambda: self._abort(rid))

    def check_queue(self, session_id: str) -> None:
        """Raise `Overloaded` (429) if a call of this session would find the admission queue
        full; so a stream can be refused before its headers go out. The engine thread checks
        again, exactly."""
        if session_id not in self.sessions and len(self.admission) >= self.limits.max_queued:
            raise self._overloaded("queue_full")

    def _overloaded(self, reason: str) -> Overloaded:
        retry = self.limits.retry_after_s
        if reason == "queue_full":
            return Overloaded(
                429,
                f"{self.limits.max_queued} sessions already wait for admission; retry in {retry} s",
                retry,
            )
        return Overloaded(
            503,
            f"the session waited {self.limits.queue_timeout_s:g} s without being admitted "
            f"(the server is at capacity); retry in {retry} s",
            retry,
        )

    def end_session(self, session_id: str) -> None:
        self._post(lambda: self._end_session(session_id))

    def tool_event(self, event: Event) -> None:
        """A tool run's event (from any thread): recorded in its session and published on the
        engine's bus, in order with the engine's own events."""
        self._post(lambda: self._tool_event(event))

    def stats(self) -> dict[str, Any]:
        kv = self.kv.stats()
        return {
            "kv_tokens": self.kv.num_blocks,
            "kv_usage": self.kv.usage,
            "kv_free_tokens": self.kv.num_free_blocks,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "sessions": len(self.sessions),
            "admission_queued": len(self.admission),
            "admission_window": _window(self.scheduler.policy),
            "prefix_hit_tokens": kv.hit_tokens,
            "prompt_tokens": self.scheduler.prompt_tokens,
            "recomputed_tokens": self.scheduler.recomputed_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "evicted_tokens": kv.evicted_tokens,
            "evictions": kv.evictions,
            "offloads": kv.offloads,
            "restores": kv.restores,
            "host_kv_bytes": self.executor.offload_bytes,
            "restore_fallbacks": self.executor.restore_fallbacks,
            "copy_s": self.executor.copy_s,  # offloads and restores (inside step_s for restores)
            "steps": self.core.steps,
            "generated_tokens": self.generated_tokens,
            "failed_steps": self.failed_steps,
            "step_s": self.core.execute_s,  # time inside llama_decode and sampling
            "sched_s": self.core.schedule_s,  # time in schedule() + update()
        }

    # ---- engine thread ------------------------------------------------------------------------
    def _arrive(self, session_id: str, call: _Pending) -> None:
        session = self.sessions.get(session_id)
        if session is None and len(self.admission) >= self.limits.max_queued:
            self._send(call.stream, _QUEUE_FULL)
            return
        self._send(call.stream, _ACCEPTED)
        if session is None:  # a new session: it waits in the control plane until admitted
            session = Session(session_id, call.arrival, first_prompt_tokens=len(call.prompt))
            self.sessions[session_id] = session
            self._held[session_id] = [call]
            self._streams[call.rid] = call.stream
            self.bus.publish(SessionArrived(call.arrival, session_id))
            self.admission.add(session)  # calls _admitted at once when the policy admits
        elif session.status is SessionStatus.QUEUED:
            self._held[session_id].append(call)
            self._streams[call.rid] = call.stream
        else:
            self._start(session_id, call)

    def _admitted(self, session: Session) -> None:
        session.status = SessionStatus.LLM
        for call in self._held.pop(session.session_id, []):
            self._start(session.session_id, call)

    def _expire_queued(self) -> None:
        """Turn away sessions that waited for admission past the deadline."""
        deadline = self.clock.now() - self.limits.queue_timeout_s
        for session in self.admission.queued:
            if session.arrival_time <= deadline:
                self._drop_queued(session.session_id, _QUEUE_TIMEOUT)

    def _drop_queued(self, session_id: str, chunk: Chunk) -> None:
        self.admission.remove(session_id)
        session = self.sessions.pop(session_id, None)
        for call in self._held.pop(session_id, []):
            if self._streams.pop(call.rid, None) is not None:
                self._send(call.stream, chunk)
        if session is not None:
            session.status = SessionStatus.REJECTED
            now = self.clock.now()
            self.bus.publish(SessionDone(now, session_id, now - session.arrival_time, True))

    def _start(self, session_id: str, call: _Pending) -> None:
        session = self.sessions.get(session_id)
        while (
            session is not None
            and session.current is not None
            and (not session.current.is_finished)
        ):
            # A call while the session's previous one still runs (parallel calls, or agents that
            # share a fingerprint) is its own sub-session: both run, each with its own KV.
            session_id = _sibling(session_id)
            session = self.sessions.get(session_id)
        if session is None:  # a sub-session: admitted with its parent
            session = Session(session_id, call.arrival, status=SessionStatus.LLM)
            session.admitted_time = session.arrival_time
            self.sessions[session_id] = session
        prev = self._last_seq.get(session_id, [])
        reuse = common_prefix(prev, call.prompt, len(prev))
        req = Request(
            call.rid,
            session_id,
            len(call.prompt),
            call.params.max_tokens,
            reuse,
            call.arrival,
            len(session.turns),
            prefix=call.prompt,  # other sessions' KV for the same leading tokens is shared
            prefix_salt=call.salt,
        )
        stream = call.stream
        stream.req = req
        try:
            self.executor.add(req, call.prompt, call.params)
        except Exception:  # checked in generate(); never let one request stop the engine
            self._streams.pop(call.rid, None)
            if not session.turns:
                del self.sessions[session_id]
            self._send(stream, _ABORTED)
            return
        last = session.turns[-1] if session.turns else None
        if last is not None and last.request.finish_time is not None and not last.tools:
            # Every answer opened a tool phase (the agent ran something or thought); this call
            # closes it. Tools run through the tools API are recorded as they run; otherwise
            # the phase is inferred, its category the marker's tool name when the agent sends
            # one.
            finished = last.request.finish_time
            phase = ToolCall(call.tool_name or "unknown", False, finished, call.arrival)
            last.tools.append(phase)
            self.bus.publish(
                ToolEnd(call.arrival, session_id, phase.category, call.arrival - finished, 0.0)
            )
        session.turns.append(Turn(req))
        session.status = SessionStatus.LLM
        self._next_tool[call.rid] = call.next_tool
        self._streams[call.rid] = stream
        self.scheduler.add_request(req)

    def _reveal_tool(self, req: Request) -> None:
        req.next_tool = self._next_tool.pop(req.request_id, "unknown")

    def _tool_event(self, event: Event) -> None:
        session = self.sessions.get(event.session_id)
        turn = session.turns[-1] if session is not None and session.turns else None
        if turn is not None and turn.request.is_finished:
            if isinstance(event, ToolStart):
                turn.tools.append(ToolCall(event.category, True, event.time))
            elif isinstance(event, ToolEnd):
                for call in reversed(turn.tools):
                    if call.category == event.category and call.end_time is None:
                        call.end_time, call.queue_wait_s = event.time, event.queue_wait_s
                        break
        if isinstance(event, ToolEnqueued | ToolStart | ToolEnd):
            self.bus.publish(event)

    def _abort(self, rid: str, stalled: str | None = None) -> None:
        """End a request (client gone, session ended, batch failed); with `stalled`, its client
        is told that reason instead."""
        self.scheduler.abort(rid)
        self._next_tool.pop(rid, None)
        stream = self._streams.pop(rid, None)
        self.executor.release(rid)
        for sid, calls in list(self._held.items()):  # a client that left while queued
            left = [c for c in calls if c.rid != rid]
            if len(left) < len(calls):
                if left:
                    self._held[sid] = left
                else:
                    self._drop_queued(sid, _ABORTED)
        if stream is not None and not stream.done:
            stream.done = True
            r = stream.req
            self._send(
                stream,
                Chunk(
                    "",
                    [],
                    "abort" if stalled is None else "stalled",
                    r.num_prompt_tokens,
                    r.num_output_tokens,
                    max(0, r.num_cached_tokens),
                    error=stalled,
                ),
            )

    def _end_session(self, session_id: str) -> None:
        """End a session and the sub-sessions its parallel calls opened."""
        if session_id in self.admission:
            self._drop_queued(session_id, _ABORTED)
        now = self.clock.now()
        for sid in [k for k in self.sessions if k == session_id or k.startswith(session_id + "#")]:
            session = self.sessions.pop(sid)
            for turn in session.turns:
                if not turn.request.is_finished:
                    self._abort(turn.request.request_id)
            self.kv.end_session(sid)
            self._last_seq.pop(sid, None)
            session.status, session.done_time = SessionStatus.DONE, now
            self.bus.publish(SessionDone(now, sid, now - session.arrival_time))
            for hook in self.session_end_hooks:
                hook(session)
        if len(self.admission):
            self.admission.poll()

    def _run(self) -> None:
        policy = self.scheduler.policy
        next_tick = self.clock.now()
        try:
            while not self._stop:
                with self._lock:
                    inbox, self._inbox = self._inbox, []
                    self._wake.clear()
                for fn in inbox:
                    fn()
                if policy.tick_s is not None and self.clock.now() >= next_tick:
                    policy.on_tick()  # TTL expiries, aging: between steps, as in the simulator
                    next_tick = self.clock.now() + policy.tick_s
                    if len(self.admission):
                        self.admission.poll()
                if len(self.admission):
                    self._expire_queued()
                if not self.scheduler.has_work:
                    self._wake.wait(0.5 if policy.tick_s is None else policy.tick_s)
                    continue
                self._step()
        except BaseException as e:  # surface to clients instead of dying silently
            self.error = e
            for stream in list(self._streams.values()):
                self._send(stream, Chunk("", [], "abort"))
            raise

    def _step(self) -> None:
        try:
            outcome = self.core.step(self._stops)
        except StepFailed as e:
            # Survive a batch llama.cpp refuses: its requests end with "abort" (the client gets
            # a retryable error), everything else goes on.
            self.failed_steps += 1
            for req in e.plan.requests:
                self._abort(req.request_id)
            return
        if outcome is None:
            self._stalled()
            self._wake.wait(0.01)
            return
        self._stalled_since = None
        if self.online_timer is not None:
            self.online_timer.observe(outcome.plan, outcome.execute_s)
        for req in outcome.finished:
            self._finish(req)
        if outcome.finished and len(self.admission):
            self.admission.poll()  # KV was freed: a queued session may fit now

    def _stalled(self) -> None:
        """Nothing could be scheduled although calls wait. The scheduler frees pins and slots
        as it can; if still nothing runs after `stall_timeout_s`, end the waiting calls with an
        error that says why, rather than leave their clients hanging."""
        now = self.clock.now()
        if self._stalled_since is None:
            self._stalled_since = now
            return
        waited = now - self._stalled_since
        if waited < self.stall_timeout_s:
            return
        self._stalled_since = None
        kv = self.kv
        for req in [*self.scheduler.waiting, *self.scheduler.running]:
            why = (
                f"the engine could not schedule this call for {waited:.0f} s: its "
                f"{req.num_tokens} tokens of KV do not fit beside what other sessions hold "
                f"({kv.num_free_blocks} of {kv.num_blocks} KV tokens free); retry, or start "
                "mars serve with more --kv-tokens"
            )
            self._abort(req.request_id, why)

    def _stops(self, plan: StepPlan, result: StepResult) -> frozenset[str]:
        stopped: set[str] = set()
        for req, tok in zip(plan.requests, result.token_ids or [], strict=True):
            if tok is not None:
                self.generated_tokens += 1
                if self._text(req, tok):
                    stopped.add(req.request_id)
        return frozenset(stopped)

    def _text(self, req: Request, tok: int) -> bool:
        """Turn a sampled token into text for its client; True if the output must stop here."""
        lp = self.executor.logprobs.pop(req.request_id, None)
        stream = self._streams.get(req.request_id)
        if stream is None or stream.done:
            return False
        if req.request_id in self.executor.dead_ends:
            return True
        p = stream.params
        masked = p.ignore_eos or req.num_output_tokens < p.min_tokens
        start = len(stream.text) + len(stream.held)
        if self.executor.is_eog(tok) and not masked:
            if lp is not None:
                stream.placed.append((start, start, lp))  # sent with the last chunk
            return True  # the end-of-generation token is not text
        text = stream.held + stream.detok.push(tok)
        if lp is not None:
            stream.placed.append((start, len(stream.text) + len(text), lp))
        stop = _find_stop(stream.text + text, p.stop) if p.stop else None
        if stop is not None:
            cut = stop - len(stream.text)
            stream.held = ""
            if cut > 0:
                stream.text += text[:cut]
            lps = stream.sent_logprobs(stopped=True)
            stream.placed.clear()  # the stop string's tokens, and any after it
            if cut > 0 or lps:
                self._send(
                    stream, Chunk(text[: max(cut, 0)], [tok] if cut > 0 else [], logprobs=lps)
                )
            return True
        keep = _stop_prefix_len(text, p.stop) if p.stop else 0
        emit, stream.held = text[: len(text) - keep], text[len(text) - keep :]
        stream.text += emit
        self._send(stream, Chunk(emit, [tok], logprobs=stream.sent_logprobs()))
        return False

    def _finish(self, req: Request) -> None:
        dead_end = self.executor.dead_ends.get(req.request_id)
        self._last_seq[req.session_id] = self.executor.prompt_of(req.request_id) + list(
            req.output_token_ids
        )
        self.executor.release(req.request_id)
        session = self.sessions.get(req.session_id)
        if session is not None:
            session.status = SessionStatus.TOOL
        stream = self._streams.pop(req.request_id, None)
        if stream is None or stream.done:
            return
        stream.done = True
        rest = tuple(lp for _, _, lp in stream.placed)  # all of their text goes now
        if stream.held:
            stream.text += stream.held
            self._send(stream, Chunk(stream.held, [], logprobs=rest))
            rest = ()
        reason = "stop" if req.status is RequestStatus.FINISHED_STOPPED else "length"
        reason = "dead_end" if dead_end is not None else reason
        self._send(
            stream,
            Chunk(
                "",
                [],
                reason,
                req.num_prompt_tokens,
                req.num_output_tokens,
                max(0, req.num_cached_tokens),
                error=dead_end,
                logprobs=rest,
            ),
        )

    def _send(self, stream: _Stream, chunk: Chunk) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, chunk)
        except RuntimeError:  # the client's event loop is gone: its abort is on the way
            stream.done = True


def _sibling(session_id: str) -> str:
    base, sep, n = session_id.rpartition("#")
    return f"{base}#{int(n) + 1}" if sep and n.isdigit() else f"{session_id}#1"


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


def _window(policy: object) -> int | None:
    """The policy's admission window, if it keeps one (AIMD)."""
    window = getattr(policy, "window", None)
    return int(window) if isinstance(window, int | float) else None
