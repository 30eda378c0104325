"""Leading KV that several sessions share: the nodes of the KV manager's prefix tree.

Sessions of one agent framework open with the same system prompt and tool list. Their sequences
then share leading blocks, as vLLM's automatic prefix caching and SGLang's radix cache share them,
but at the granularity of runs of blocks rather than of single blocks, so that a GPU-scale
simulation still moves whole runs at a time. A `Segment` is one such run: the tokens
[start, end) of every sequence below it. Segments form a tree (a child continues its parent);
each session's own blocks continue the segment it hangs from, or start at 0.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

_CHUNK = 256


class Place(enum.IntEnum):
    """Where a segment's blocks are counted."""

    NONE = 0  # not yet (a new segment)
    HELD = 1  # a session below it runs: not free
    WAITING = 2  # free, but blocks that follow it are still cached: evicted after them
    CACHED = 3  # free, and its tail is the next to evict


class Segment:
    """Blocks that hold positions [start, end) of the sequences of every session below it.

    `key` identifies the content: its first `end` entries are the tokens (or any content ids)
    these positions hold. A segment is held while a session below it runs; otherwise its blocks
    are free prefix cache. Its tail cannot be evicted while a child segment exists or a session
    right below it holds blocks of its own (*busy*): their tokens follow it, and go first.
    """

    __slots__ = (
        "blocks",
        "busy",
        "children",
        "end",
        "held",
        "key",
        "parent",
        "place",
        "salt",
        "sessions",
        "start",
    )

    def __init__(
        self, key: Sequence[int], start: int, parent: Segment | None, salt: str = ""
    ) -> None:
        self.key = key
        self.salt = salt  # only calls of this salt may continue it
        self.start = start
        self.end = start
        self.parent = parent
        self.blocks: list[int] = []
        self.children: list[Segment] = []
        self.sessions: set[str] = set()  # sessions whose own blocks follow this segment
        self.busy = 0  # child segments, and sessions below that run or hold blocks of their own
        self.held = 0  # sessions below that run (or are pinned), and child segments with any
        self.place = Place.NONE

    def ancestors(self) -> list[Segment]:
        """This segment and those above it, nearest first."""
        out: list[Segment] = []
        seg: Segment | None = self
        while seg is not None:
            out.append(seg)
            seg = seg.parent
        return out

    def any_session(self) -> str | None:
        """A session whose sequence holds this segment's tokens (one below it), or None."""
        if self.sessions:
            return next(iter(self.sessions))
        for child in self.children:
            sid = child.any_session()
            if sid is not None:
                return sid
        return None


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading entries `a` and `b` share, at most `limit`."""
    limit = min(limit, len(a), len(b))
    if a is b:
        return limit
    n = 0
    while n < limit:  # compare whole slices (C speed), then find the first difference
        stop = min(n + _CHUNK, limit)
        sa, sb = a[n:stop], b[n:stop]
        if sa == sb or (type(sa) is not type(sb) and tuple(sa) == tuple(sb)):
            n = stop
            continue
        while a[n] == b[n]:
            n += 1
        return n
    return n
