"""`MarsRequestRouter`: Ray Serve's routing seam, deciding by session.

Ray Serve asks a deployment's request router `choose_replicas(candidate_replicas,
pending_request)` for every call made through a handle (Ray 2.60, `ray.serve.request_router`,
an alpha API). This one reads the call's `session_id` keyword argument and asks the control
actor (`mars.ray.control`), which holds the placement for every router, which candidate takes
it: the session's own replica while it is alive (its KV is there), else the replica under the
least pressure. A call without a session goes where pressure is lowest. When the control actor
cannot answer (it is restarting), the router falls back to the candidate with the shortest
queue, as Ray's own routers do, rather than stall the call.

Configure it on any deployment whose calls pass `session_id=`:

    RequestRouterConfig(request_router_class="mars.ray.router:MarsRequestRouter")

which is what `mars.ray.app` does for the engine deployment; Ray Serve LLM takes the same in
`LLMConfig(deployment_config={"request_router_config": ...})` (README, "mars on Ray Serve").
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from mars.ray.control import NAME, NAMESPACE

log = logging.getLogger("mars.ray")
PLACE_TIMEOUT_S = 5.0  # how long a call waits for the control actor's placement at most


class MarsRequestRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        """`request_router_kwargs`: `control` and `namespace`, the control actor's name."""
        self._control_name = kwargs.get("control", NAME)
        self._namespace = kwargs.get("namespace", NAMESPACE)
        self._control: Any = None

    def _actor(self) -> Any:
        if self._control is None:
            self._control = ray.get_actor(self._control_name, namespace=self._namespace)
        return self._control

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        sid = None if pending_request is None else _session(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        try:
            ref = self._actor().place.remote(sid, list(by_id))
            chosen = await asyncio.wait_for(ref, PLACE_TIMEOUT_S)
        except Exception as e:  # the control actor is gone or slow: route anyway
            log.warning("mars control did not place the call (%s): shortest queue instead", e)
            self._control = None
            return [self.select_available_replicas(candidate_replicas) or candidate_replicas]
        if chosen in by_id:
            return [[by_id[chosen]]]
        return [candidate_replicas]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        try:
            self._actor().lost.remote(replica_id.unique_id, "its Ray actor died")
        except Exception as e:  # the control actor's own staleness check catches it later
            log.warning("could not tell mars control that %s died: %s", replica_id, e)


def _session(pending: PendingRequest) -> str | None:
    """The call's session: the `session_id=` keyword (mars's front), else the OpenAI request
    object's `session_id` or `vllm_xargs["session_id"]` (Ray Serve LLM passes the request as
    the first argument)."""
    sid = pending.kwargs.get("session_id")
    if sid is None and pending.args:
        request = pending.args[0]
        xargs = getattr(request, "vllm_xargs", None)
        sid = getattr(request, "session_id", None)
        if sid is None and isinstance(xargs, dict):
            sid = xargs.get("session_id")
    return None if sid is None else str(sid)
