"""The unified event stream: typed, frozen events on one bus, with stable session ids.

Every component publishes here (control plane, scheduler, KV manager, tools); signals, online
learning and metrics subscribe. Publishing to a type nobody listens to costs one dict lookup.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, TypeVar


@dataclass(frozen=True, slots=True)
class Event:
    kind: ClassVar[str] = "event"
    time: float
    session_id: str

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, **asdict(self)}


@dataclass(frozen=True, slots=True)
class SessionArrived(Event):
    kind: ClassVar[str] = "session_arrived"


@dataclass(frozen=True, slots=True)
class SessionAdmitted(Event):
    kind: ClassVar[str] = "session_admitted"
    wait_s: float


@dataclass(frozen=True, slots=True)
class SessionDone(Event):
    kind: ClassVar[str] = "session_done"
    latency_s: float
    rejected: bool = False


@dataclass(frozen=True, slots=True)
class RequestEmit(Event):
    """An LLM call reached the engine's waiting queue."""

    kind: ClassVar[str] = "request_emit"
    request_id: str
    prompt_tokens: int
    reuse_tokens: int


@dataclass(frozen=True, slots=True)
class GpuSubmit(Event):
    """A request was scheduled for the first time (or again after a preemption)."""

    kind: ClassVar[str] = "gpu_submit"
    request_id: str
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class GpuFirstToken(Event):
    kind: ClassVar[str] = "gpu_first_token"
    request_id: str


@dataclass(frozen=True, slots=True)
class GpuEnd(Event):
    kind: ClassVar[str] = "gpu_end"
    request_id: str
    output_tokens: int
    aborted: bool = False


@dataclass(frozen=True, slots=True)
class GpuPreempt(Event):
    kind: ClassVar[str] = "gpu_preempt"
    request_id: str
    lost_tokens: int


@dataclass(frozen=True, slots=True)
class ToolEnqueued(Event):
    kind: ClassVar[str] = "tool_enqueued"
    category: str
    cpu_heavy: bool


@dataclass(frozen=True, slots=True)
class ToolStart(Event):
    kind: ClassVar[str] = "tool_start"
    category: str


@dataclass(frozen=True, slots=True)
class ToolEnd(Event):
    kind: ClassVar[str] = "tool_end"
    category: str
    duration_s: float
    queue_wait_s: float


@dataclass(frozen=True, slots=True)
class KvRetain(Event):
    """A finished turn's KV stays pinned on the GPU through the tool phase."""

    kind: ClassVar[str] = "kv_retain"
    tokens: int


@dataclass(frozen=True, slots=True)
class KvEvict(Event):
    """Cached tokens of a session were lost (reused for other work)."""

    kind: ClassVar[str] = "kv_evict"
    tokens: int


@dataclass(frozen=True, slots=True)
class KvOffload(Event):
    kind: ClassVar[str] = "kv_offload"
    tokens: int


@dataclass(frozen=True, slots=True)
class KvRestore(Event):
    kind: ClassVar[str] = "kv_restore"
    tokens: int


@dataclass(frozen=True, slots=True)
class AdmissionWindow(Event):
    kind: ClassVar[str] = "admission_window"
    window: int
    active: int


E = TypeVar("E", bound=Event)
Handler = Callable[[Any], None]


class EventBus:
    """Synchronous publish/subscribe keyed by event class."""

    def __init__(self) -> None:
        self._handlers: dict[type[Event], list[Handler]] = defaultdict(list)
        self._all: list[Handler] = []

    def subscribe(self, kind: type[E], handler: Callable[[E], None]) -> None:
        self._handlers[kind].append(handler)

    def subscribe_all(self, handler: Callable[[Event], None]) -> None:
        self._all.append(handler)

    def wants(self, kind: type[Event]) -> bool:
        """Cheap check so hot paths skip building events nobody reads."""
        return bool(self._all) or kind in self._handlers

    def publish(self, event: Event) -> None:
        for handler in self._handlers.get(type(event), ()):
            handler(event)
        for handler in self._all:
            handler(event)
