"""`oracle`: a clairvoyant bound, for the simulator only. NOT a baseline and never a scheduler.

Every other policy sees only the past (`mars.sched.policy`); this one is handed each session's
future by the simulator before the first step (`foresee`) and uses it as a good offline schedule
would, on top of `mars`'s mechanisms:
- retention with the exact time away: the tool time that follows each call (not a learned mean);
- shortest remaining work first where it pays: waiting calls of one priority level, and the
  admission queue whenever the load balancer would reorder it, by the tokens their sessions
  have left to prefill and decode;
- admission by exact footprint (off by default, `--set exact_footprint=true`): each admitted
  session counts its largest context still to come, weighted by the share of its remaining time
  it will spend in calls, and a new session waits while its own peak context does not fit
  beside them. Measured on the shared traces (300 sessions, H100 NVL, seeds 1-3) it cost 6% of
  the mean at fcfs's capacity and 6% at twice it: a peak still to come is no reason to keep a
  session out now.

It is a clairvoyant heuristic on `mars`'s mechanisms, not a proven optimum: its distance to
`mars` is the headroom that knowing the future leaves to them. Live engines refuse it (they
have no future to give it); reports keep it out of "best other".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mars.control.balancer import BalancerMode
from mars.core.request import Request
from mars.core.session import Session, SessionStatus
from mars.sched.policies.mars import MarsPolicy
from mars.sched.policy import Admission


@dataclass(frozen=True, slots=True)
class SessionFuture:
    """A whole session, as only a clairvoyant scheduler could know it: per call, the context
    when it ends, the tokens it prefills and decodes (with an ideal prefix cache), and the tool
    time after it."""

    context_tokens: tuple[int, ...]
    work_tokens: tuple[int, ...]
    tool_time_s: tuple[float, ...]

    def remaining_work(self, turn: int) -> int:
        return sum(self.work_tokens[turn:])

    def peak_context(self, turn: int) -> int:
        return max(self.context_tokens[turn:], default=0)


class OraclePolicy(MarsPolicy):
    name = "oracle"
    clairvoyant = True  # needs `foresee`: the simulator's, never a live engine's
    # Each use of the future, on its own switch (`--set`), to see which one pays.
    exact_away = True
    remaining_first = True
    exact_footprint = False

    def __init__(self) -> None:
        super().__init__()
        self.future: Mapping[str, SessionFuture] = {}

    def foresee(self, future: Mapping[str, SessionFuture]) -> None:
        self.future = future

    def _turn(self, session: Session) -> int:
        return max(0, len(session.turns) - 1)

    # ---- retention: the exact time away -------------------------------------------------------
    def time_away(self, session: Session, req: Request) -> float:
        f = self.future.get(session.session_id)
        if not self.exact_away or f is None or req.turn_index >= len(f.tool_time_s):
            return super().time_away(session, req)
        return f.tool_time_s[req.turn_index]

    # ---- shortest remaining work first --------------------------------------------------------
    def _remaining(self, session_id: str, turn: int) -> int:
        f = self.future.get(session_id)
        return f.remaining_work(turn) if f is not None else 0

    def order_waiting(self, waiting: Sequence[Request]) -> Sequence[Request]:
        if not self.remaining_first:
            return super().order_waiting(waiting)
        if not self.priority:
            return waiting
        now = self._now()
        return sorted(
            waiting,
            key=lambda r: (
                self.level(r, now),
                self._remaining(r.session_id, r.turn_index),
                r.arrival_time,
            ),
        )

    def order_admission(self, queued: Sequence[Session]) -> Sequence[Session]:
        if not self.remaining_first:
            return super().order_admission(queued)
        if not self.admission or not self.balancer:
            return queued
        if self.balancer_mode(queued) is BalancerMode.ARRIVAL:
            return queued
        return sorted(queued, key=lambda s: (self._remaining(s.session_id, 0), s.arrival_time))

    # ---- admission by exact footprint ---------------------------------------------------------
    def _duty_of(self, f: SessionFuture, turn: int) -> float:
        """Share of the session's remaining time in calls, with calls timed at the learned
        seconds per call (the only rate the policy has): 1 without tools to come."""
        calls = len(f.work_tokens) - turn
        tools = math.fsum(f.tool_time_s[turn:])
        call_s = self.calls.mean_any() or 1.0
        return calls * call_s / (calls * call_s + tools) if tools > 0 else 1.0

    def footprint(self) -> float:
        if not self.exact_footprint:
            return super().footprint()
        assert self.ctx is not None
        kv = self.ctx.kv
        total = float(kv.segment_tokens)
        for s in self._active():
            f = self.future.get(s.session_id)
            if f is None:
                return super().footprint()
            turn = self._turn(s)
            own = max(0, f.peak_context(turn) - kv.shared_prefix_tokens(s.session_id))
            away = s.status is SessionStatus.TOOL and s.session_id not in self._pins
            total += own * (self._duty_of(f, turn) if away else 1.0)
        return total / (kv.num_blocks * kv.block_size)

    def admit(self, session: Session) -> Admission:
        verdict = super().admit(session)
        f = self.future.get(session.session_id)
        if verdict is Admission.DEFER or f is None or not self.admission:
            return verdict
        if not self.exact_footprint:
            return verdict
        assert self.ctx is not None
        kv = self.ctx.kv
        peak = f.peak_context(0) * self._duty_of(f, 0) / (kv.num_blocks * kv.block_size)
        if self._active_count() > 1 and self.footprint() + peak > self.footprint_high:
            self._count -= 1  # `super().admit` counted it in
            return Admission.DEFER
        return verdict
