"""Where a new session goes among engine replicas: the one under the least pressure.

One rule for the live gateway's upstreams and the simulator's clusters: KV usage first, in 5 %
steps so that noise does not decide, then queued work (waiting requests), then sessions already
placed there. A session then stays where its KV is (affinity); this only places newcomers.
"""

from __future__ import annotations

USAGE_STEP = 0.05  # KV usage differences below this do not decide where a session goes


def pressure(kv_usage: float, waiting: int, sessions: int) -> tuple[int, int, int]:
    """The sort key of a replica: the lowest goes first."""
    return (int(kv_usage / USAGE_STEP), waiting, sessions)
