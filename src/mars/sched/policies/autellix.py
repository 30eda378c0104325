"""`autellix`: Program-Level Attained Service (PLAS), after Autellix (Luo et al., 2025,
"Autellix: An Efficient Serving Engine for LLM Agents as General Programs", arXiv 2502.13965).

Rules implemented (single-threaded programs, as coding agents are):
- a session's priority is the service it has attained so far (tokens computed for it, over all
  its calls), discretised into multi-level feedback queues at 2,048 / 8,192 / 32,768 tokens:
  sessions that have received little service go first (least-attained-service), so short
  programs are not stuck behind long ones;
- within a level, the earliest arrival first; running requests are ordered the same way and the
  preemption victim is the lowest-priority running request (newest among equals);
- anti-starvation: a request that has waited more than `starvation_ratio` times the service its
  session attained (in seconds at the engine's nominal speed), and at least `starvation_s`, is
  promoted to the top level.
KV handling is vLLM's (free at the end of a call, prefix cache, recompute preemption).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from mars.core.request import Request
from mars.core.session import Session
from mars.sched.policy import BasePolicy


class AutellixPolicy(BasePolicy):
    name = "autellix"
    thresholds = (2048, 8192, 32768)
    starvation_s = 10.0

    def _sessions(self) -> dict[str, Session]:
        assert self.ctx is not None, "bind() first"
        return self.ctx.sessions

    def service(self, session: Session | None) -> int:
        """Tokens computed for the session so far (cache hits excluded)."""
        if session is None:
            return 0
        return sum(
            max(0, t.request.num_computed_tokens - max(0, t.request.num_cached_tokens))
            for t in session.turns
        )

    def level(self, req: Request) -> int:
        assert self.ctx is not None
        waited = self.ctx.clock.now() - req.arrival_time
        if req.first_scheduled_time is None and waited > self.starvation_s:
            return 0
        return bisect.bisect_right(
            self.thresholds, self.service(self._sessions().get(req.session_id))
        )

    def stable_until(self, waiting: Sequence[Request]) -> float:
        # Service only accrues to running sessions, whose order does not matter while every
        # one of them decodes; the clock changes a decision only when a waiting request starts
        # to starve.
        assert self.ctx is not None
        now = self.ctx.clock.now()
        due = [
            r.arrival_time + self.starvation_s
            for r in waiting
            if r.first_scheduled_time is None and r.arrival_time + self.starvation_s >= now
        ]
        return min(due, default=math.inf)

    def order_waiting(self, waiting: Sequence[Request]) -> Sequence[Request]:
        return sorted(waiting, key=lambda r: (self.level(r), r.arrival_time))

    def order_running(self, running: Sequence[Request]) -> Sequence[Request]:
        return sorted(running, key=lambda r: (self.level(r), r.first_scheduled_time or 0.0))

    def pick_victim(self, running: Sequence[Request], needed_by: Request) -> Request | None:
        if not running:
            return None
        return max(running, key=lambda r: (self.level(r), r.first_scheduled_time or 0.0))
