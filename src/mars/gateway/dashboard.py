"""The gateway's figures for `/dashboard` (`mars.server.dashboard`): its admission (window,
admitted sessions, queue), the upstreams' pooled KV usage, and one row per upstream. The gateway
runs no GPU and no tools, so its event stream has admission, calls and inferred tool phases
only; each upstream's own `/dashboard` has the rest."""

from __future__ import annotations

from typing import Any

from mars.gateway.control import UNKNOWN_CAPACITY, Control
from mars.gateway.upstreams import Pool


def upstream_rows(upstreams: Pool) -> list[dict[str, Any]]:
    """Each replica's state, as `/v1/upstreams` and the dashboard show it."""
    return [
        {
            "url": r.url,
            "up": r.up,
            "error": r.error,
            "sessions": r.sessions,
            "requests": r.requests,
            "busy": r.busy,
            "failures": r.failures_total,
            "kv_usage": r.signal.kv_usage,
            "kv_tokens": r.signal.kv_tokens,
            "waiting": r.signal.waiting,
            "running": r.signal.running,
        }
        for r in upstreams.replicas
    ]


def gateway_gauges(control: Control, upstreams: Pool) -> dict[str, Any]:
    window = getattr(control.policy, "window", None)
    rows = upstream_rows(upstreams)
    known = [r["running"] for r in rows if r["up"] and r["running"] is not None]
    waiting = [r["waiting"] for r in rows if r["up"] and r["waiting"] is not None]
    capacity = control.kv.num_blocks
    return {
        "kind": "gateway",
        "policy": control.policy.name,
        "window": int(window) if isinstance(window, int | float) else None,
        "active": control.active,
        "queued": len(control.queue),
        "kv_usage": control.kv.usage,
        "kv_tokens": None if capacity == UNKNOWN_CAPACITY else capacity,
        "running": sum(known) if known else None,
        "waiting": sum(waiting) if waiting else None,
        "upstreams": rows,
    }
