"""A cluster of engine replicas behind a router, for `mars sim|sweep --replicas N --router R`.

Every replica is a whole engine (`Replica`: its own KV manager, scheduler, step clock and policy
instance, on the same cost model). The routers:

- `mars`: session affinity and one global admission control. A session waits for admission
  outside the replicas, in one queue, under the policy's own admission (one AIMD window over
  the whole cluster, fed by every replica's KV and CPU signals through `ClusterKV`); once
  admitted it goes to the replica under the least pressure (`mars.control.placement`, the
  gateway's rule) and every later call of it goes to that replica, which holds its KV. The
  replicas' own policies then schedule with their admission switched off (the `admission`
  parameter, where the policy has one).
- `round-robin` and `least-load` (fewest calls waiting or running): per call, no affinity. A
  session's next call may land on another replica and prefill there again (what that replica
  still caches of the session is a prefix hit). Admission is per replica, as with one engine:
  a new session joins the admission queue of the replica the router picks, whose policy
  counts the sessions whose latest call it served; later calls need no admission.

Tools: `--tool-cores` and `--tool-workers` are per replica, and the cluster's tools share one
pool of N times that (a tool does not care which GPU served the call before it).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from mars.control.placement import pressure
from mars.core.errors import UsageError
from mars.core.session import Session
from mars.kv.manager import KVConfig, KVManager, Residency
from mars.sched.policy import Policy, PolicyContext, StepTimer
from mars.sched.registry import make_policy, parameters
from mars.sim.replica import Replica

ROUTERS = ("mars", "round-robin", "least-load")
ROUTER_HELP = (
    "mars: a session stays on the replica holding its KV (new ones go where KV usage and queued "
    "work are lowest), one admission window across replicas; round-robin / least-load (fewest "
    "calls waiting or running): per call, no affinity, admission per replica"
)


def check_cluster(replicas: int, router: str) -> None:
    if replicas < 1:
        raise UsageError(f"--replicas must be at least 1, got {replicas}")
    if router not in ROUTERS:
        raise UsageError(f"unknown --router {router!r}; valid: {', '.join(ROUTERS)}")


@dataclass(frozen=True, slots=True)
class Cluster:
    """Replicas' policies (one each, their engine's own) and the router in front of them."""

    router: str
    policies: tuple[Policy, ...]

    @property
    def global_admission(self) -> bool:
        return self.router == "mars"


def cluster_policies(
    name: str, settings: Mapping[str, object], replicas: int, router: str
) -> tuple[Policy, Cluster | None]:
    """The control plane's policy, and the cluster (None for one replica: one engine, as ever).

    With global admission the control plane's policy admits for the whole cluster and each
    replica gets a fresh one without admission; with per-replica admission the control plane's
    policy is replica 0's own."""
    check_cluster(replicas, router)
    control = make_policy(name, settings, simulated=True)
    if replicas == 1:
        return control, None
    own: dict[str, object] = dict(settings)
    if router == "mars" and "admission" in parameters(control):
        own["admission"] = False
    fresh = [make_policy(name, own, simulated=True) for _ in range(replicas)]
    if router != "mars":
        fresh[0] = control
    return control, Cluster(router, tuple(fresh))


def replica_sessions(sessions: dict[str, Session], n: int) -> list[dict[str, Session]]:
    """Each replica's `sessions`: with one replica, every session (the one engine's, as ever);
    in a cluster, each its own (those whose latest call it was given)."""
    return [sessions] if n == 1 else [{} for _ in range(n)]


def bind_to_cluster(
    policy: Policy,
    replicas: Sequence[Replica],
    router: Router,
    sessions: dict[str, Session],
    timer: StepTimer,
) -> None:
    """Bind the control plane's policy to the whole cluster for one admission: every replica's
    KV as one (`ClusterKV`), every session, every replica's tool workers."""
    first = replicas[0].scheduler
    policy.bind(
        PolicyContext(
            first.clock,
            first.bus,
            ClusterKV(replicas, router).as_manager(),
            sessions,
            first.config.max_num_batched_tokens,
            timer,
            sum(r.tool_workers for r in replicas),
        )
    )


class Router:
    """Which replica admits a new session (per-replica admission) and which serves each call;
    keeps each replica's `sessions` to those whose latest call it was given."""

    def __init__(self, name: str, replicas: Sequence[Replica]) -> None:
        self.name = name
        self.replicas = list(replicas)
        self.moves = 0  # calls sent to another replica than the session's previous call
        self._at: dict[str, Replica] = {}  # session -> the replica of its latest call
        self._next = itertools.cycle(self.replicas)

    def admitting(self, session: Session) -> Replica:
        """The replica whose admission a new session waits for (per-replica admission)."""
        replica = self._pick()
        self._move(session, replica)
        return replica

    def route(self, session: Session) -> Replica:
        """The replica for the session's next call."""
        sid = session.session_id
        current = self._at.get(sid)
        if current is not None and (self.name == "mars" or sid not in current.served):
            # Affinity; or the first call of a session admitted there.
            replica = current
        else:
            replica = self._pick()
        if current is not None and replica is not current:
            self.moves += 1
        self._move(session, replica)
        replica.served.add(sid)
        return replica

    def replica_of(self, session_id: str) -> Replica | None:
        """The replica of the session's latest call (None before its first)."""
        return self._at.get(session_id)

    def forget(self, session_id: str) -> None:
        """The session ended: it leaves every replica (and their caches)."""
        current = self._at.pop(session_id, None)
        if current is not None and len(self.replicas) > 1:
            current.sessions.pop(session_id, None)
        for r in self.replicas:
            if session_id in r.served:
                r.kv.end_session(session_id)

    def _pick(self) -> Replica:
        if self.name == "round-robin":
            return next(self._next)
        if self.name == "least-load":
            return min(self.replicas, key=lambda r: (r.outstanding(), r.index))
        return min(
            self.replicas,
            key=lambda r: pressure(r.kv.usage, len(r.scheduler.waiting), len(r.sessions)),
        )

    def _move(self, session: Session, replica: Replica) -> None:
        sid = session.session_id
        current = self._at.get(sid)
        if current is not replica and len(self.replicas) > 1:
            if current is not None:
                current.sessions.pop(sid, None)
            replica.sessions[sid] = session
        self._at[sid] = replica


class ClusterKV:
    """The whole cluster's KV as one manager, as the global admission control reads it: sums
    of the replicas' blocks, and per session the replica that holds it. Read-only: the
    replicas' own policies decide what their KV does (`unpin` is theirs)."""

    def __init__(self, replicas: Sequence[Replica], router: Router) -> None:
        self._kvs = [r.kv for r in replicas]
        self._router = router
        first = self._kvs[0].config
        self.block_size = first.block_size
        self.config = KVConfig(
            sum(k.num_blocks for k in self._kvs),
            first.block_size,
            sum(k.config.host_capacity_tokens for k in self._kvs),
        )

    def as_manager(self) -> KVManager:
        """This view where a policy's context wants a manager (it reads only what is here)."""
        return cast(KVManager, self)

    def _of(self, session_id: str) -> KVManager | None:
        replica = self._router.replica_of(session_id)
        return None if replica is None else replica.kv

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return sum(k.num_free_blocks for k in self._kvs)

    @property
    def used_blocks(self) -> int:
        return sum(k.used_blocks for k in self._kvs)

    @property
    def usage(self) -> float:
        return sum(k.usage * k.num_blocks for k in self._kvs) / self.num_blocks

    @property
    def host_used_tokens(self) -> int:
        return sum(k.host_used_tokens for k in self._kvs)

    @property
    def segment_tokens(self) -> int:
        return sum(k.segment_tokens for k in self._kvs)

    def shared_prefix_tokens(self, session_id: str) -> int:
        kv = self._of(session_id)
        return 0 if kv is None else kv.shared_prefix_tokens(session_id)

    def cached_tokens(self, session_id: str) -> int:
        kv = self._of(session_id)
        return 0 if kv is None else kv.cached_tokens(session_id)

    def host_tokens(self, session_id: str) -> int:
        kv = self._of(session_id)
        return 0 if kv is None else kv.host_tokens(session_id)

    def residency(self, session_id: str) -> Residency:
        kv = self._of(session_id)
        return Residency.NONE if kv is None else kv.residency(session_id)

    def unpin(self, session_id: str, offload: bool = False) -> None:
        return None


def replica_stats(replicas: Sequence[Replica], span_s: float) -> list[dict[str, Any]]:
    """Per replica: sessions it served a call of, its prefix hit rate, busy fraction, steps."""
    out = []
    for r in replicas:
        s = r.scheduler
        out.append(
            {
                "replica": r.index,
                "sessions": len(r.served),
                "hit_rate": s.hit_tokens / s.prompt_tokens if s.prompt_tokens else 0.0,
                "busy_fraction": r.executor.busy_s / (span_s or 1.0),
                "steps": r.steps,
                "preemptions": s.num_preemptions,
            }
        )
    return out
