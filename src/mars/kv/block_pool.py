"""The GPU block pool: free blocks in eviction order.

Free blocks are either empty or still hold a session's cached KV (prefix cache). Empty blocks are
used first; then cached chains are evicted least recently released first, each from its tail, so a
chain loses its tail before its head (vLLM's `FreeKVCacheBlockQueue` order, where a freed request's
blocks are appended tail first). Chains move as a whole, so taking N blocks costs one step per
chain touched, not per block, which is what keeps GPU-scale simulations fast.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol


class Chain(Protocol):
    """A session's cached blocks, in sequence order (the pool evicts from the end)."""

    blocks: list[int]


class BlockPool:
    def __init__(self, num_blocks: int, on_evict: Callable[[Chain, int], None]) -> None:
        """`on_evict(chain, n)` is called after the last `n` blocks of `chain` were taken."""
        if num_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() from the end
        self._cached: OrderedDict[Chain, None] = OrderedDict()  # least recently released first
        self._num_cached = 0
        self._num_waiting = 0  # free blocks that become evictable once what follows them goes
        self._on_evict = on_evict

    @property
    def num_free(self) -> int:
        return len(self._empty) + self._num_cached + self._num_waiting

    @property
    def num_empty(self) -> int:
        return len(self._empty)

    def is_cached(self, chain: Chain) -> bool:
        return chain in self._cached

    def cached_chains(self) -> Iterator[Chain]:
        return iter(self._cached)

    def empty_blocks(self) -> list[int]:
        return list(self._empty)

    def take(self, n: int) -> list[int] | None:
        """`n` blocks, empty ones first, then evicting cached tails; None (no change) if short."""
        if n > self.num_free:
            return None
        empty = self._empty
        k = min(n, len(empty))
        out = empty[len(empty) - k :]
        del empty[len(empty) - k :]
        while len(out) < n:
            chain = next(iter(self._cached))
            blocks = chain.blocks
            k = min(n - len(out), len(blocks))
            out.extend(blocks[len(blocks) - k :])
            if k == len(blocks):
                del self._cached[chain]
            self._num_cached -= k
            self._on_evict(chain, k)
        return out

    def oldest_cached(self) -> Chain | None:
        return next(iter(self._cached), None)

    def put_empty(self, blocks: list[int]) -> None:
        """Return blocks whose content is worthless: they are reused first."""
        self._empty.extend(blocks)

    def put_cached(self, chain: Chain) -> None:
        """A chain's blocks become free but keep their content, most recently released."""
        if chain.blocks:
            self._cached[chain] = None
            self._num_cached += len(chain.blocks)

    def wait(self, n: int) -> None:
        """`n` blocks are free but not evictable yet: blocks that follow them are cached, and
        are evicted first (taking them is how these become cached)."""
        self._num_waiting += n
        assert self._num_waiting >= 0, "waiting blocks below zero"

    def remove_cached(self, chain: Chain) -> None:
        """Take a cached chain back out of the free blocks (a prefix hit, or its session ended)."""
        if chain in self._cached:
            del self._cached[chain]
            self._num_cached -= len(chain.blocks)
