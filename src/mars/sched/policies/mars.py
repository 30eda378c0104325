"""`mars`: the agent-centric scheduler and control plane of MARS (arXiv 2604.26963), with the
departures below, and its ablations.

- Priority coordinator: a multi-level feedback queue over requests. Decoding requests run first;
  a continuation of an admitted session starts at level 0 and a new session's first call at
  level 1; a prefill that uses its level's whole token quantum drops a level; a request waiting
  `aging_s` without service rises a level. (Departure: quanta are 1, 1/2, 1/4, 1/8 of the step's
  token budget, i.e. the paper's 2048/1024/512/256 at its 2,048-token budget; with vLLM's 8,192
  default, fixed 2,048-token quanta stretch every 10-40K-token agent prefill 4x and hold its KV
  that much longer: 220 s vs 182 s mean latency at fcfs capacity, 100 sessions, seed 0.)
- Priority-aligned eviction: when KV runs out, the chunk is first halved (down to one block),
  then the victim is the lowest-priority request that is not decoding, the one with the least KV
  among equals (the newest running request if all are decoding). As in vLLM, a step stops
  starting waiting requests at the first that does not fit (letting smaller ones past it, as
  this policy did before, measured 120.4 s against 116.7 s mean with KV halved at 1.0x fcfs
  capacity, 300 sessions, seeds 1-3).
- Adaptive retention at each tool call: keep the KV on the GPU, offload it to host memory, or
  drop it, whichever costs the session's critical path least. Not keeping it costs the restore
  (host link) or the recompute (step-time model) on return; keeping it costs the memory it denies
  everyone else for the expected time away T, priced by current pressure p as
  `T * (C / capacity) * p / (1 - p)` seconds. T is the running mean of how long sessions stayed
  away after calls ending in that tool category (call end to next call, learned online): what a
  pin must outlast is the run plus its queue wait, the turn's further tools and the agent's own
  time, not the run alone (live, 0.66 s away against 0.24 s of tool run per call). A pin
  lapses after twice T into a write-back offload, not a drop. (Departure: a closed-form price
  instead of the paper's distribution integral; both pin only when a warm resume pays at
  current pressure.)
- Control plane: an AIMD window of admitted sessions (start 30, min 4, +1 per healthy 0.2 s
  tick while the window binds, x0.7 when overloaded) with a KV-fit check at admission.
  (Departure, `window_validate`: the paper grows the window on every healthy tick; unbounded
  growth while fewer sessions than the window are admitted left it in the thousands, so overload
  took dozens of decreases to bite. Measured trade-off, 200 sessions at 1.3x fcfs capacity, 3
  seeds: 199.8 s mean / 479 s p95 with it, 179.8 / 451 without; kept on for a window that means
  what it says.) Overloaded: KV usage >= 0.90
  (clears at 0.85), or the admitted sessions' footprint >= the KV capacity, or CPU-heavy tools
  in flight per tool worker >= 2 (clears at 1). (Departure, from the design's known hazard: KV
  usage alone reacts only once KV is squeezed and thrashes when contexts grow; the footprint
  signal sees the growth coming.) The footprint is the expected KV demand: the latest context
  of each session in a call or holding its KV, and the learned duty (share of a session's
  cycle spent in a call) of the context of each session away without its KV; summing whole
  contexts held sessions back that spend most of their time in tools: with tools 3x longer,
  218.1 s mean with it, 231.9 s with `--set duty_footprint=false` (`mars sim --gpu h100-nvl
  --sessions 300 --time-scale 3 --rate 0.0575`, 1.0x fcfs capacity, seeds 1-3).
  CPU overload also when the EMA of tool queue wait reaches 5 s (clears at 2.5 s; the simulated
  pool has a queue only with `--tool-workers`, else only the in-flight count speaks).
- Load balancer (`mars.control.balancer`): arrival order while healthy and everything queued
  fits; otherwise shortest estimated first prefill first, or longest first while the CPUs are
  overloaded; sessions estimated above 50K tokens wait at the tail, packed by the KV-fit check.
- Opportunistic co-scheduler: at each control tick with KV usage under `kv_low`, it picks the
  sessions in a tool call whose KV was offloaded and whose tool is expected to end within
  `prefetch_s`, earliest expected end first; the next step with budget left restores them into
  empty GPU blocks (never evicting), the copy overlapping the step. It is off by itself at
  light load (nothing is evicted, so nothing is on the host) and under pressure (no empty
  blocks). (Departure: no prefetch of dropped sessions by recompute: that would spend GPU
  compute on a guess, where a restore spends only the link.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mars.control.balancer import BalancerMode, order_sessions
from mars.control.signals import RecentTail, ToolQueueWait
from mars.core.events import (
    AdmissionWindow,
    RequestEmit,
    SessionDone,
    ToolEnd,
    ToolEnqueued,
    ToolStart,
)
from mars.core.request import Request, RequestStatus
from mars.core.session import Session, SessionStatus
from mars.kv.manager import Residency, Retention
from mars.sched.policies.continuum import ToolDurations
from mars.sched.policy import Admission, BasePolicy, PolicyContext


class MarsPolicy(BasePolicy):
    name = "mars"
    tick_s = 0.2
    # priority coordinator
    priority = True
    quanta = (1.0, 0.5, 0.25, 0.125)  # shares of the step's token budget per level
    aging_s = 30.0
    # retention
    retention_on = True
    pin_lapse = 2.0  # a pin lapses after this many expected times away
    # A session away, unpinned, this many times the p95 of times away (at least the floor)
    # stops counting for admission.
    dormant_after = 2.0
    dormant_floor_s = 2.0
    # admission (AIMD)
    admission = True
    window_start = 30
    window_min = 4
    window_inc = 1
    window_dec = 0.7
    window_validate = True  # grow only while the window binds
    kv_high = 0.90
    kv_low = 0.85
    footprint_high = 1.0
    duty_footprint = True  # weigh sessions away without their KV by the learned duty
    cpu_high = 2.0  # CPU-heavy tools in flight per tool worker: overloaded at 2, clear at 1
    cpu_low = 1.0
    queue_wait_high = 5.0  # EMA of tool queue wait, seconds: overloaded at 5, clear at 2.5
    queue_wait_low = 2.5
    # load balancer
    balancer = True
    long_session_tokens = 50_000
    queue_aging_s = 60.0  # a session's size in the balancer's order halves per this wait; 0: off
    # opportunistic co-scheduler
    coschedule = True
    prefetch_s = 1.0  # restore a tool's session when its expected end is this close
    max_prefetch = 4  # restores started per step at most

    def __init__(self) -> None:
        super().__init__()
        self.durations = ToolDurations()  # tool runs: when a running tool should end
        self.away = ToolDurations()  # call end to next call, per tool category: what a pin spans
        self.away_tail = RecentTail()  # their recent p95: past it, a session has likely left
        self.calls = ToolDurations()  # call emit to call end, by the tool the call ends in
        self._left: dict[str, tuple[float, str]] = {}  # session -> (its call ended, tool category)
        self.queue_wait = ToolQueueWait()
        self._cpu_overloaded = False
        self._prefetches: list[str] = []  # the co-scheduler's restores due at the next step
        self._count = 0  # admitted sessions, as counted at `_count_at`
        self._count_at: float | None = None
        self._pins: dict[str, float] = {}
        self.window = float(self.window_start)
        self._window_sent: tuple[int, int] | None = None  # the last AdmissionWindow published
        self._overloaded = False

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.window = float(self.window_start)
        ctx.bus.subscribe(ToolEnd, self.durations.observe)
        ctx.bus.subscribe(ToolEnqueued, self.queue_wait.enqueued)
        ctx.bus.subscribe(ToolStart, self.queue_wait.started)
        ctx.bus.subscribe(SessionDone, self._session_done)
        ctx.bus.subscribe(RequestEmit, self._returned)

    def _now(self) -> float:
        assert self.ctx is not None, "bind() first"
        return self.ctx.clock.now()

    # ---- priority coordinator -----------------------------------------------------------------
    def _quantum(self, level: int) -> int:
        assert self.ctx is not None
        share = self.quanta[min(level, len(self.quanta) - 1)]
        return max(self.ctx.kv.block_size, int(share * self.ctx.max_num_batched_tokens))

    def level(self, req: Request, now: float | None = None) -> int:
        """The request's queue level, a pure function of its state and the clock (so that
        repeated asks change nothing): feedback from the quanta its prefill has used up, aging
        from how long it has waited."""
        if not req.is_prefill:
            return 0
        level = 0 if req.turn_index > 0 else 1
        done = req.num_computed_tokens - max(0, req.num_cached_tokens)
        last = len(self.quanta) - 1
        while level < last:
            quantum = self._quantum(level)
            if done < quantum:
                break
            done -= quantum
            level += 1
        if req.status is not RequestStatus.RUNNING:
            waited = (self._now() if now is None else now) - req.arrival_time
            level -= int(waited // self.aging_s)
        return max(0, level)

    def order_waiting(self, waiting: Sequence[Request]) -> Sequence[Request]:
        if not self.priority:
            return waiting
        now = self._now()
        return sorted(waiting, key=lambda r: (self.level(r, now), r.arrival_time))

    def order_running(self, running: Sequence[Request]) -> Sequence[Request]:
        if not self.priority:
            return running
        return sorted(running, key=lambda r: (r.is_prefill, self.level(r)))

    def chunk_tokens(self, req: Request, budget: int) -> int:
        if not self.priority or not req.is_prefill:
            return budget
        return min(budget, self._quantum(self.level(req)))

    def shrink_chunk(self, req: Request, num_tokens: int) -> int | None:
        if not self.priority:
            return None
        assert self.ctx is not None
        block = self.ctx.kv.block_size
        return num_tokens // 2 if num_tokens // 2 >= block else None

    def pick_victim(self, running: Sequence[Request], needed_by: Request) -> Request | None:
        if not self.priority:
            return super().pick_victim(running, needed_by)
        prefills = [r for r in running if r.is_prefill]
        if not prefills:
            return running[-1] if running else None
        # Lowest priority first; among equals the one cheapest to recompute. (Departure: the
        # paper's "most KV" victim, under recompute preemption, throws away the most work and
        # is re-admitted at once: the prototype's ping-pong.)
        return max(prefills, key=lambda r: (self.level(r), -r.num_computed_tokens))

    def stable_until(self, waiting: Sequence[Request]) -> float:
        now = self._now()
        if self._prefetches:
            return now  # restores are due at the next step: no fast-forwarded stretch first
        if not self.priority:
            return math.inf
        due = math.inf
        for r in waiting:
            waited = now - r.arrival_time
            due = min(due, r.arrival_time + self.aging_s * (int(waited // self.aging_s) + 1))
        return due

    # ---- retention ----------------------------------------------------------------------------
    def _returned(self, event: RequestEmit) -> None:
        left = self._left.pop(event.session_id, None)
        if left is not None:
            self.away.add(left[1], event.time - left[0])
            self.away_tail.add(left[1], event.time - left[0])

    def expected_away(self, category: str) -> float:
        """Expected seconds until a session whose call ended in a `category` tool call calls
        again: learned times away, else tool run times, else 1 s."""
        for learned in (self.away, self.durations):
            mean = learned.mean(category)
            if mean is None:
                mean = learned.mean_any()
            if mean is not None:
                return mean
        return 1.0

    def time_away(self, session: Session, req: Request) -> float:
        """Seconds until the session calls again after `req`, as retention weighs it."""
        assert req.next_tool is not None
        return self.expected_away(req.next_tool)

    def retention(self, session: Session, req: Request) -> Retention:
        assert self.ctx is not None
        timer = self.ctx.timer
        self._pins.pop(session.session_id, None)  # a pin of an earlier call is spent
        if req.next_tool is not None:
            self._left[session.session_id] = (self._now(), req.next_tool)
            self.calls.add(req.next_tool, max(0.0, self._now() - req.arrival_time))
        if not self.retention_on or req.next_tool is None or timer is None:
            return Retention.DROP
        kv = self.ctx.kv
        c = req.num_computed_tokens
        # A shared prefix stays while other sessions need it: keeping, computing again and
        # restoring concern only the tokens after it.
        base = min(kv.shared_prefix_tokens(session.session_id), c)
        own = c - base
        expected = self.time_away(session, req)
        recompute = timer.step_seconds(1, own, (c * (c + 1) - base * (base + 1)) // 2, c)
        host_room = kv.config.host_capacity_tokens - kv.host_used_tokens >= c
        restore = timer.transfer_seconds(own) if host_room else math.inf
        capacity = kv.num_blocks * kv.block_size
        p = min(kv.usage, 0.99)
        pin_cost = expected * (own / capacity) * p / (1.0 - p)
        if pin_cost < min(recompute, restore):
            self._pins[session.session_id] = self._now() + self.pin_lapse * expected
            return Retention.PIN
        return Retention.OFFLOAD if restore < recompute else Retention.DROP

    # ---- opportunistic co-scheduler -----------------------------------------------------------
    def prefetch(self) -> list[str]:
        """The restores the last control tick's look found, if their sessions still wait."""
        assert self.ctx is not None
        due, self._prefetches = self._prefetches, []
        sessions, kv = self.ctx.sessions, self.ctx.kv
        return [
            sid
            for sid in due
            if sid in sessions
            and sessions[sid].status is SessionStatus.TOOL
            and kv.residency(sid) is not Residency.GPU
        ]

    def _due_restores(self) -> list[str]:
        """The co-scheduler's look, once a control tick: the host copies to bring back."""
        assert self.ctx is not None
        kv = self.ctx.kv
        if not self.coschedule or kv.usage >= self.kv_low or not kv.host_used_tokens:
            return []
        now, due = self._now(), []
        for s in self.ctx.sessions.values():
            sid = s.session_id
            if s.status is not SessionStatus.TOOL or kv.residency(sid) is Residency.GPU:
                continue
            if kv.host_tokens(sid) <= kv.cached_tokens(sid):
                continue  # all it has is on the GPU (or it has no host copy)
            tools = [t for t in s.turns[-1].tools if t.end_time is None] if s.turns else []
            ends = []
            for t in tools:
                mean = self.durations.mean(t.category) or self.durations.mean_any()
                ends.append(t.start_time + (mean if mean is not None else 1.0))
            end = max(ends, default=now)  # between two tools, or before the first: soon
            if end - now <= self.prefetch_s:
                due.append((end, sid))
        due.sort()
        return [sid for _, sid in due[: self.max_prefetch]]

    # ---- control plane ------------------------------------------------------------------------
    def _active(self) -> list[Session]:
        """The admitted sessions that occupy the system: all but those gone dormant."""
        assert self.ctx is not None
        now = self._now()
        return [
            s
            for s in self.ctx.sessions.values()
            if s.admitted_time is not None
            and s.status < SessionStatus.DONE
            and not self.dormant(s, now)
        ]

    def dormant(self, session: Session, now: float) -> bool:
        """Away without its KV for longer than `dormant_after` times the 95th percentile of
        the learned times away (and `dormant_floor_s`): real agents
        (OpenHands, plain `mini`, OpenAI clients) never end their sessions, and counting the
        finished ones as admitted locked an idle server out. A dormant session that calls again
        is back at once: it was admitted, and its call goes straight to the engine."""
        req = session.current
        if session.status is not SessionStatus.TOOL or req is None or req.finish_time is None:
            return False
        if session.session_id in self._pins:
            return False  # it holds its KV
        category = req.next_tool or "unknown"
        tail = self.away_tail.value(category)
        usual = self.expected_away(category) if tail is None else tail
        return now - req.finish_time > max(self.dormant_after * usual, self.dormant_floor_s)

    def _active_count(self) -> int:
        """`len(self._active())`, counted once per clock instant: the admission queue asks
        `admit` for each of possibly thousands of queued sessions in one poll."""
        now = self._now()
        if self._count_at != now:
            self._count, self._count_at = len(self._active()), now
        return self._count

    def _session_done(self, event: SessionDone) -> None:
        self._count_at = None
        self._left.pop(event.session_id, None)

    def duty(self) -> float:
        """Share of a session's cycle (a call, then its time away) spent in the call: call
        emit to end against call end to next emit, both learned online (1 before any)."""
        call, away = self.calls.mean_any(), self.away.mean_any()
        if call is None or away is None or call + away <= 0:
            return 1.0
        return call / (call + away)

    def footprint(self) -> float:
        """The admitted sessions' expected KV demand as a share of capacity: the latest context
        of each session in a call or pinned, plus `duty` of it for each away unpinned (it holds
        its KV that share of the time, on average)."""
        assert self.ctx is not None
        kv = self.ctx.kv
        duty = self.duty() if self.duty_footprint else 1.0
        total = float(kv.segment_tokens)  # shared prefixes, once
        for s in self._active():
            own = max(0, s.context_tokens - kv.shared_prefix_tokens(s.session_id))
            if s.status is SessionStatus.TOOL and s.session_id not in self._pins:
                total += own * duty
            else:
                total += own
        return total / (kv.num_blocks * kv.block_size)

    def cpu_load(self) -> float:
        """CPU-heavy tools in flight per tool worker (0 when the workers are unknown)."""
        assert self.ctx is not None
        workers = self.ctx.tool_workers
        if not workers:
            return 0.0
        busy = 0
        for s in self.ctx.sessions.values():
            tools = s.turns[-1].tools if s.status is SessionStatus.TOOL and s.turns else []
            busy += sum(1 for t in tools if t.cpu_heavy and t.end_time is None)
        return busy / workers

    def cpu_overloaded(self) -> bool:
        """The CPU half of the overload signal, with hysteresis: tools per worker, or the EMA
        of their queue wait (or a queued run already waiting that long)."""
        load = self.cpu_load()
        wait = max(self.queue_wait.value, self.queue_wait.oldest_wait(self._now()))
        if load >= self.cpu_high or wait >= self.queue_wait_high:
            self._cpu_overloaded = True
        elif load <= self.cpu_low and wait < self.queue_wait_low:
            self._cpu_overloaded = False
        return self._cpu_overloaded

    def balancer_mode(self, queued: Sequence[Session]) -> BalancerMode:
        assert self.ctx is not None
        if self._cpu_overloaded:
            return BalancerMode.LONG_FIRST
        kv = self.ctx.kv
        fits = sum(s.context_tokens for s in queued) <= kv.num_free_blocks * kv.block_size
        room = self._active_count() + len(queued) <= int(self.window)
        if not self._overloaded and fits and room:
            return BalancerMode.ARRIVAL
        return BalancerMode.SHORT_FIRST

    def order_admission(self, queued: Sequence[Session]) -> Sequence[Session]:
        if not self.admission or not self.balancer:
            return queued
        mode = self.balancer_mode(queued)
        return order_sessions(
            queued, mode, self.long_session_tokens, self._now(), self.queue_aging_s
        )

    def admit(self, session: Session) -> Admission:
        if not self.admission:
            return Admission.ADMIT
        assert self.ctx is not None
        active = self._active_count()
        if active:
            if active >= int(self.window):
                return Admission.DEFER
            kv = self.ctx.kv
            if session.first_prompt_tokens > kv.num_free_blocks * kv.block_size:
                return Admission.DEFER
        self._count += 1  # the queue admits it now
        return Admission.ADMIT

    def on_tick(self) -> None:
        assert self.ctx is not None
        now = self._now()
        for sid, t in list(self._pins.items()):
            if t <= now:
                del self._pins[sid]
                self.ctx.kv.unpin(sid, offload=True)  # if it is evicted now, it goes to host
        self._prefetches = self._due_restores()
        if not self.admission:
            return
        usage, fp, cpu = self.ctx.kv.usage, self.footprint(), self.cpu_overloaded()
        if usage >= self.kv_high or fp >= self.footprint_high or cpu:
            self._overloaded = True
        elif usage < self.kv_low and fp < self.footprint_high and not cpu:
            self._overloaded = False
        active = self._active_count()
        if self._overloaded:
            self.window = max(float(self.window_min), self.window * self.window_dec)
        elif (
            not self.window_validate
            or active >= int(self.window) - self.window_inc
            or self.window < self.window_start
        ):
            # Grow only while the window binds (as TCP validates its window, RFC 7661): a
            # window far above what is admitted would let a burst in unchecked, and take many
            # decreases to bite once overload comes. Below its start it grows back while
            # healthy, bound or not: a window cut by one big prefill must recover once the
            # system is idle, or it stays at its minimum for good.
            self.window += self.window_inc
        state = (int(self.window), active)
        if state != self._window_sent and self.ctx.bus.wants(AdmissionWindow):
            # On a change only: at every tick (5 a second) it drowned the event stream.
            self._window_sent = state
            self.ctx.bus.publish(AdmissionWindow(now, "", *state))


class MarsNoPriority(MarsPolicy):
    name = "mars-no-priority"
    priority = False


class MarsNoAdmission(MarsPolicy):
    name = "mars-no-admission"
    admission = False


class MarsNoRetention(MarsPolicy):
    name = "mars-no-retention"
    retention_on = False
