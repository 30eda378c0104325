"""The KV manager's vocabulary: retention choices, residencies, config and result types."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class Retention(enum.IntEnum):
    """What happens to a session's KV when its turn ends in a tool call."""

    DROP = 0  # free the blocks; they stay reusable as prefix cache until evicted (vLLM default)
    PIN = 1  # keep the blocks held on the GPU through the tool phase
    OFFLOAD = 2  # free the blocks as with DROP, copied to host memory before they are evicted


class Residency(enum.IntEnum):
    NONE = 0  # nothing cached
    GPU = 1  # held on the GPU (running or pinned)
    CACHED = 2  # free on the GPU but not yet evicted (prefix cache)
    HOST = 3  # only a host copy is left
    DROPPED = 4  # was cached, all evicted


class KVListener(Protocol):
    """A real engine mirroring the manager's decisions in its own cache (the simulator has none)."""

    def truncated(self, session_id: str, num_tokens: int) -> None:
        """The session's GPU KV now holds only its first `num_tokens` tokens (0: none)."""
        ...

    def shared(self, session_id: str, source_id: str, num_tokens: int) -> None:
        """The session's sequence (holding nothing) now starts with the first `num_tokens` tokens
        of KV that session `source_id`'s sequence holds: the same cells, not a copy."""
        ...

    def offloaded(self, session_id: str, num_tokens: int) -> None:
        """Copy the session's first `num_tokens` tokens of KV to host memory now."""
        ...

    def ended(self, session_id: str) -> None:
        """The session is gone: drop its GPU and host KV."""
        ...

    def prefetched(self, session_id: str, num_tokens: int) -> bool:
        """Load the session's host copy (first `num_tokens` tokens) back into GPU KV now, as
        its prefix cache; False, with nothing changed, if the engine cannot place it."""
        ...


@dataclass(frozen=True, slots=True)
class KVConfig:
    num_blocks: int
    block_size: int = 16
    host_capacity_tokens: int = 0  # 0 = no offloading
    # Sessions that may have KV on the GPU at once (a real engine's sequence slots); None = any.
    max_sequences: int | None = None

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1 or self.host_capacity_tokens < 0:
            raise ValueError(f"bad KV config {self}")


@dataclass(frozen=True, slots=True)
class PrefixHit:
    gpu_tokens: int  # served from blocks still on the GPU
    host_tokens: int  # further tokens restored from the host copy


@dataclass(frozen=True, slots=True)
class KVStats:
    hit_tokens: int
    restored_tokens: int
    evicted_tokens: int
    evictions: int  # blocks of cached content taken for other work
    offloads: int
    restores: int
    retains: int


@dataclass(frozen=True, slots=True)
class Start:
    """A first schedule that fits: the prefix found, and the new tokens room was made for."""

    hit: PrefixHit
    num_new_tokens: int
