"""The global load balancer's order of sessions waiting for admission (DESIGN.md section 2).

Modes, chosen by the control plane from its signals each time it polls the queue:
- `arrival`: first come, first served (both resources healthy and everything queued fits);
- `short`: shortest estimated first prefill first, so that many small sessions are not held
  behind one big one (shortest-job-first on the only size known before a session runs);
- `long`: longest first, while the tool CPUs are overloaded: a long prompt keeps its session on
  the GPU longer before it adds tool work.
In `short` and `long` modes, very long sessions (estimated context above `long_tokens`) go to
the tail, where admission's KV-fit check packs them into what the budget has left.

Both size orders age, so that a sustained overload cannot starve a big session: a session's
size counts as `tokens / (1 + waited / aging_s)` in `short` mode (highest response ratio next,
with the first prefill's tokens standing in for its service time), and as
`tokens * (1 + waited / aging_s)` in `long` mode. A session that waited `aging_s` ranks as one
half (twice) its size that just arrived, so a big session overtakes new small ones after a
bounded wait. The tail is decided on the aged size in `short` mode (a very long session leaves
it once it has waited), on the real one in `long` mode.
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
    queued: Sequence[Session],
    mode: BalancerMode,
    long_tokens: int,
    now: float | None = None,
    aging_s: float | None = None,
) -> Sequence[Session]:
    """`queued` in the mode's order; with `now` and `aging_s`, sizes age with their wait."""
    if mode is BalancerMode.ARRIVAL or len(queued) < 2:
        return queued
    short = mode is BalancerMode.SHORT_FIRST

    def key(s: Session) -> tuple[bool, float, float]:
        tokens = size = float(s.context_tokens)
        if now is not None and aging_s:
            aged = 1.0 + max(0.0, now - s.arrival_time) / aging_s
            size = size / aged if short else size * aged
        tail = (size if short else tokens) > long_tokens
        return (tail, size if short else -size, s.arrival_time)

    return sorted(queued, key=key)
