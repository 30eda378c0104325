"""Which tenant owns each session (`mars.server.tenants`), and the 404 for the others.

Session ids stay what the client sent (`mars.server.sessions`), so the engine, the event
stream, traces and the `X-Session-ID` echo are unchanged: ownership is a check in front of them,
not a rename. Namespacing the ids by tenant instead would have had to rename them in every
answer, event and trace, and a tenant's tools call naming another tenant's session would have
quietly made a second session of that name rather than a 404. Explicit ids are therefore one
namespace shared by all tenants: an id another tenant holds is refused with a 404 (use
unguessable ids, e.g. UUIDs, as agents do; the 404 says only that the id is not this key's). A
fingerprint id (a request that names no session) is salted by the tenant, so two tenants whose
conversations open alike never share a session.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.requests import Request

from mars.server.protocol import APIError
from mars.server.tenants import SCOPE_KEY, Tenant


def tenant_of(request: Request) -> Tenant | None:
    """The request's tenant (None: the server has no keys)."""
    tenant: Tenant | None = request.scope.get(SCOPE_KEY)
    return tenant


def not_found(session_id: str) -> APIError:
    return APIError(
        404,
        f"session {session_id!r} not found for this API key: send the key that created it, "
        "or name a new session with another id",
        param="session_id",
        code="session_not_found",
    )


class Owners:
    """Which tenant owns each session. Used on the event loop's thread only.

    An ended session stays its owner's for `linger_s` more, so the events the engine publishes
    after the end (`session_done`) reach the owner's `/v1/events` and no other tenant's."""

    def __init__(self, linger_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.linger_s, self.clock = linger_s, clock
        self._owner: dict[str, str] = {}
        self._ended: dict[str, float] = {}  # session -> when it ended, oldest first

    def claim(self, tenant: Tenant | None, session_id: str) -> None:
        """Make `tenant` the owner of a free session; 404 if another tenant owns it."""
        if tenant is None:
            return
        self.check(tenant, session_id)
        self._ended.pop(session_id, None)  # in use again
        self._owner.setdefault(session_id, tenant.name)  # an admin's call keeps the owner

    def check(self, tenant: Tenant | None, session_id: str) -> None:
        """404 unless `tenant` may act on the session: its own, a free one (nothing of anyone's
        is in it), or any for an admin."""
        owner = self._owner.get(session_id)
        if tenant is not None and not tenant.admin and owner not in (None, tenant.name):
            raise not_found(session_id)

    def sees(self, tenant: Tenant, session_id: str) -> bool:
        """Whether `tenant` may see the session's events (its own, or any for an admin)."""
        return tenant.admin or self._owner.get(session_id) == tenant.name

    def end(self, session_id: str) -> None:
        """The session ended: it is free once `linger_s` pass (unless used again)."""
        now = self.clock()
        self._ended.pop(session_id, None)
        if session_id in self._owner:
            self._ended[session_id] = now
        while self._ended:
            oldest, at = next(iter(self._ended.items()))
            if now - at <= self.linger_s:
                break
            del self._ended[oldest], self._owner[oldest]
