"""The global load balancer's order of sessions waiting for admission (DESIGN.md section 2).

Modes, chosen by the control plane from its signals each time it polls the queue:
- `arrival`: first come, first served (both resources healthy and everything queued fits);
- `short`: shortest estimated first prefill first, so that many small sessions are not held
  behind one big one (shortest-job-first on the only size known before a session runs);
- `long`: longest first, while the tool CPUs are overloaded: a long prompt keeps its session on
  the GPU longer before it adds tool work.
In `short` and `long` modes, very long sessions (estimated context above `long_tokens`) go to
the tail, where admission's KV-fit check packs them into what the budget has left.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from mars.core.session import Session


class BalancerMode(enum.Enum):
    ARRIVAL = "arrival"
    SHORT_FIRST = "short"
    LONG_FIRST = "long"


def order_sessions(
    queued: Sequence[Session], mode: BalancerMode, long_tokens: int
) -> Sequence[Session]:
    if mode is BalancerMode.ARRIVAL or len(queued) < 2:
        return queued
    sign = 1 if mode is BalancerMode.SHORT_FIRST else -1

    def key(s: Session) -> tuple[bool, int, float]:
        tokens = s.context_tokens
        return (tokens > long_tokens, sign * tokens, s.arrival_time)

    return sorted(queued, key=key)
