"""Policies by name. Built-ins load lazily; out-of-tree ones register through the
`mars.policies` entry-point group (a name pointing at a zero-argument `Policy` factory)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

from mars.core.errors import UsageError
from mars.sched.policy import Policy

_BUILTIN: dict[str, str] = {
    "fcfs": "mars.sched.policies.fcfs:FCFSPolicy",
    "continuum": "mars.sched.policies.continuum:ContinuumPolicy",
    "continuum-dynamic": "mars.sched.policies.continuum:ContinuumDynamicPolicy",
    "autellix": "mars.sched.policies.autellix:AutellixPolicy",
    "infercept": "mars.sched.policies.infercept:InferCeptPolicy",
    "mars": "mars.sched.policies.mars:MarsPolicy",
    "mars-no-priority": "mars.sched.policies.mars:MarsNoPriority",
    "mars-no-admission": "mars.sched.policies.mars:MarsNoAdmission",
    "mars-no-retention": "mars.sched.policies.mars:MarsNoRetention",
    # A clairvoyant bound for the simulator, not a baseline: it reads each session's future.
    "oracle": "mars.sched.policies.oracle:OraclePolicy",
}
_registered: dict[str, Callable[[], Policy]] = {}


def register(name: str, factory: Callable[[], Policy]) -> None:
    """Register a policy factory under `name` (for tests and embedding applications)."""
    _registered[name] = factory


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="mars.policies")}


def policy_names() -> list[str]:
    return sorted({*_BUILTIN, *_registered, *_plugins()})


def check_policy(name: str) -> None:
    """A clear error for a name no policy has, listing the valid ones."""
    if name not in policy_names():
        raise UsageError(f"unknown policy {name!r}; valid policies: {', '.join(policy_names())}")


def make_policy(
    name: str, settings: Mapping[str, object] | None = None, *, simulated: bool = False
) -> Policy:
    """A fresh policy; `settings` override its parameters (`--set key=value`). A clairvoyant
    one (`oracle`) only where `simulated`: nothing else has the future it reads."""
    if name in _registered:
        policy = _registered[name]()
    else:
        target = _BUILTIN.get(name) or _plugins().get(name)
        if target is None:
            raise UsageError(
                f"unknown policy {name!r}; valid policies: {', '.join(policy_names())}"
            )
        module, _, attr = target.partition(":")
        factory: Callable[[], Policy] = getattr(importlib.import_module(module), attr)
        policy = factory()
    if getattr(policy, "clairvoyant", False) and not simulated:
        raise UsageError(
            f"policy {name!r} reads each session's future calls and tool times: it is a bound "
            "for the simulator (mars sim, sweep, capacity), not a scheduler; choose another"
        )
    for key, value in (settings or {}).items():
        _set(policy, key, value)
    return policy


def parameters(policy: Policy) -> dict[str, object]:
    """A policy's settable parameters and their values (printed into every result)."""
    out: dict[str, object] = {}
    for cls in reversed(type(policy).__mro__):
        for key, value in vars(cls).items():
            if not key.startswith("_") and isinstance(value, _SETTABLE) and key not in _FIXED:
                out[key] = getattr(policy, key)
    return out


_SETTABLE = (bool, int, float, tuple)
# Properties of the implementation, not parameters.
_FIXED = ("name", "fast_forward_ok", "clairvoyant")


def _set(policy: Policy, key: str, value: object) -> None:
    known = parameters(policy)
    if key not in known:
        raise UsageError(
            f"policy {policy.name} has no parameter {key!r}; its parameters: "
            f"{', '.join(f'{k}={v}' for k, v in known.items()) or '(none)'}"
        )
    current = known[key]
    try:
        if isinstance(current, bool):
            text = str(value).lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError(value)
            coerced: object = text in ("true", "1")
        elif isinstance(current, tuple):
            parts = value if isinstance(value, list | tuple) else str(value).split(",")
            coerced = tuple(type(current[0])(p) for p in parts) if current else tuple(parts)
        elif isinstance(current, int):
            coerced = int(str(value))
        else:
            coerced = float(str(value))
    except (TypeError, ValueError):
        raise UsageError(
            f"--set {key}={value}: expected a {type(current).__name__} like {current!r}"
        ) from None
    setattr(policy, key, coerced)
