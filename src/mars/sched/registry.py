"""Policies by name. Built-ins load lazily; out-of-tree ones register through the
`mars.policies` entry-point group (a name pointing at a zero-argument `Policy` factory)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points

from mars.core.errors import UsageError
from mars.sched.policy import Policy

_BUILTIN: dict[str, str] = {
    "fcfs": "mars.sched.policies.fcfs:FCFSPolicy",
    "continuum": "mars.sched.policies.continuum:ContinuumPolicy",
    "autellix": "mars.sched.policies.autellix:AutellixPolicy",
    "infercept": "mars.sched.policies.infercept:InferCeptPolicy",
}
_registered: dict[str, Callable[[], Policy]] = {}


def register(name: str, factory: Callable[[], Policy]) -> None:
    """Register a policy factory under `name` (for tests and embedding applications)."""
    _registered[name] = factory


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="mars.policies")}


def policy_names() -> list[str]:
    return sorted({*_BUILTIN, *_registered, *_plugins()})


def make_policy(name: str) -> Policy:
    if name in _registered:
        return _registered[name]()
    target = _BUILTIN.get(name) or _plugins().get(name)
    if target is None:
        raise UsageError(f"unknown policy {name!r}; valid policies: {', '.join(policy_names())}")
    module, _, attr = target.partition(":")
    factory: Callable[[], Policy] = getattr(importlib.import_module(module), attr)
    return factory()
