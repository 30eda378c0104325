"""Block-level KV manager with per-session prefix reuse across turns and three residencies.

Each session owns one chain: the blocks that hold the KV of its latest sequence, in order. A
chain is either *held* (its request is running, or a policy pinned it through a tool phase) or
*cached* (free to evict, still reusable as prefix cache: what vLLM does with finished requests).
A chain can also have a copy in host memory (offloaded), restorable into any free blocks.

Only a session's own tokens are ever served to it: a new call may reuse at most the tokens its
`reuse_tokens` says are identical to the previous sequence, and only full blocks (as vLLM).
"""

from __future__ import annotations

from mars.core.clock import Clock
from mars.core.events import EventBus, KvEvict, KvOffload, KvRestore, KvRetain
from mars.core.request import Request
from mars.kv.block_pool import BlockPool, Chain
from mars.kv.types import (
    KVConfig,
    KVListener,
    KVStats,
    PrefixHit,
    Residency,
    Retention,
    Start,
)

__all__ = [
    "KVBlocks",
    "KVConfig",
    "KVListener",
    "KVManager",
    "KVStats",
    "PrefixHit",
    "Residency",
    "Retention",
    "Start",
]


class KVBlocks:
    """A session's chain. Opaque outside this module: read `num_blocks` and `num_tokens` only."""

    __slots__ = (
        "base_reuse",
        "blocks",
        "finished",
        "held",
        "host_tokens",
        "num_tokens",
        "offload_on_evict",
        "pinned",
        "request_id",
        "session_id",
    )

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.blocks: list[int] = []
        self.num_tokens = 0  # tokens with valid KV (held: may end mid-block; cached: full blocks)
        self.held = False
        self.pinned = False
        self.request_id = ""  # whose sequence the blocks hold
        self.finished = True  # that request finished (its sequence is the session's latest)
        self.base_reuse = 0  # that request's reuse_tokens (its prefix shared with the latest)
        self.host_tokens = 0
        self.offload_on_evict = False  # copy to host memory before the first block is evicted

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


class KVManager:
    def __init__(
        self,
        config: KVConfig,
        clock: Clock,
        bus: EventBus | None = None,
        listener: KVListener | None = None,
    ) -> None:
        self.config = config
        self.listener = listener
        self.block_size = config.block_size
        self._clock = clock
        self._bus = bus or EventBus()
        self._pool = BlockPool(config.num_blocks, self._evict)
        self._chains: dict[str, KVBlocks] = {}
        self._host_used = 0
        self._pending_evict: dict[str, int] = {}
        self._pinned: dict[str, None] = {}  # sessions pinned through a tool call, oldest first
        self._num_held = 0
        self._hit = self._restored = self._evicted_tokens = 0
        self._evictions = self._offloads = self._restores = self._retains = 0

    # ---- read-only views -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (empty or evictable cache)."""
        return self._pool.num_free

    @property
    def used_blocks(self) -> int:
        """Blocks with content: held, or cached and still reusable (not empty)."""
        return self.config.num_blocks - self._pool.num_empty

    @property
    def usage(self) -> float:
        """Fraction of blocks held (vLLM's `kv_cache_usage_perc`)."""
        return self._num_held / self.config.num_blocks

    @property
    def host_used_tokens(self) -> int:
        return self._host_used

    def stats(self) -> KVStats:
        return KVStats(
            self._hit,
            self._restored,
            self._evicted_tokens,
            self._evictions,
            self._offloads,
            self._restores,
            self._retains,
        )

    def residency(self, session_id: str) -> Residency:
        chain = self._chains.get(session_id)
        if chain is None:
            return Residency.NONE
        if chain.held:
            return Residency.GPU
        if chain.blocks:
            return Residency.CACHED
        return Residency.HOST if chain.host_tokens else Residency.DROPPED

    def offload_pending(self, session_id: str) -> bool:
        """True if the session's cached KV goes to host memory once it is evicted."""
        chain = self._chains.get(session_id)
        return chain is not None and chain.offload_on_evict

    def cached_tokens(self, session_id: str) -> int:
        chain = self._chains.get(session_id)
        return 0 if chain is None else chain.num_tokens

    def host_tokens(self, session_id: str) -> int:
        """Tokens of the session's KV with a copy in host memory."""
        chain = self._chains.get(session_id)
        return 0 if chain is None else chain.host_tokens

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        chain = self._chains.get(req.session_id)
        have = 0 if chain is None else len(chain.blocks)
        return max(0, -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - have)

    def lookup(self, req: Request) -> PrefixHit:
        """What a first schedule of `req` would find cached, without changing anything."""
        chain = self._chains.get(req.session_id)
        if chain is None:
            return PrefixHit(0, 0)
        cap = self._reuse_cap(chain, req)
        gpu = min(cap, chain.num_tokens // self.block_size * self.block_size)
        return PrefixHit(gpu, max(0, min(cap, chain.host_tokens) - gpu))

    # ---- transitions ----------------------------------------------------------------------
    def start(self, req: Request, limit: int, restore: bool = True) -> Start | None:
        """Claim `req`'s cached prefix and room for up to `limit` new tokens; None if it won't fit.

        All or nothing: on None, no block has moved.
        """
        hit = self.lookup(req)
        if not restore:
            hit = PrefixHit(hit.gpu_tokens, 0)
        cached = hit.gpu_tokens + hit.host_tokens
        n = min(req.num_tokens - cached, limit)
        if n <= 0:
            return None
        bs = self.block_size
        keep = hit.gpu_tokens // bs
        chain = self._chains.get(req.session_id)
        if (chain is None or not chain.blocks) and not self._free_a_sequence():
            return None
        avail = self._pool.num_free
        if chain is not None:
            avail += len(chain.blocks) - keep if chain.held else -keep
        if -(-(cached + n) // bs) - keep > avail:
            return None
        got = self.begin(req, restore)
        req.num_computed_tokens = got.gpu_tokens + got.host_tokens
        blocks = self.allocate(req, n)
        assert blocks is not None and got == hit, "start: room was checked"
        return Start(got, n)

    def _free_a_sequence(self) -> bool:
        """Make sure one more session may hold GPU KV, evicting the least recently used cached
        session whole if every sequence slot is taken. False if all are held."""
        limit = self.config.max_sequences
        if limit is None:
            return True
        if sum(1 for c in self._chains.values() if c.blocks) < limit:
            return True
        victim = self._pool.oldest_cached()
        if victim is None:
            return False
        assert isinstance(victim, KVBlocks)
        self._pool.remove_cached(victim)
        self._pool.put_empty(list(victim.blocks))
        self._evict(victim, len(victim.blocks))
        self._flush_evictions()
        return True

    def begin(self, req: Request, restore: bool = True) -> PrefixHit:
        """Claim the cached prefix for `req` (first schedule, or again after preemption).

        Blocks beyond the reusable prefix are released as empty. With `restore`, tokens held only
        on the host are brought back into newly allocated blocks if they fit; the executor is told
        through the step plan and pays the copy.
        """
        hit = self.lookup(req)
        chain = self._chains.get(req.session_id)
        if chain is None:
            chain = self._chains[req.session_id] = KVBlocks(req.session_id)
        elif chain.held and not chain.pinned:
            raise RuntimeError(f"session {req.session_id} already has a request running")
        # The host copy stays valid only as far as the new sequence shares it.
        host = min(chain.host_tokens, self._reuse_cap(chain, req))
        self._host_used -= chain.host_tokens - host
        chain.host_tokens = host
        keep = hit.gpu_tokens // self.block_size
        if chain.held:
            self._num_held -= len(chain.blocks) - keep
        else:
            self._pool.remove_cached(chain)
            self._num_held += keep
        self._pool.put_empty(chain.blocks[keep:])
        if keep < len(chain.blocks) and self.listener is not None:
            self.listener.truncated(req.session_id, keep * self.block_size)
        del chain.blocks[keep:]
        chain.held, chain.pinned, chain.request_id = True, False, req.request_id
        chain.offload_on_evict = False
        chain.finished, chain.base_reuse = False, req.reuse_tokens
        chain.num_tokens = hit.gpu_tokens
        restored = 0
        if restore and hit.host_tokens:
            blocks = self._take(hit.host_tokens // self.block_size)
            if blocks is not None:
                chain.blocks.extend(blocks)
                self._num_held += len(blocks)
                restored = hit.host_tokens
                chain.num_tokens += restored
                self._restored += restored
                self._restores += 1
                self._emit(KvRestore, req.session_id, restored)
        self._hit += hit.gpu_tokens
        return PrefixHit(hit.gpu_tokens, restored)

    def allocate(self, req: Request, num_new_tokens: int) -> KVBlocks | None:
        """Make room for `num_new_tokens` beyond `req.num_computed_tokens`; None if KV is full."""
        chain = self._chains[req.session_id]
        need = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - len(chain.blocks)
        if need > 0:
            blocks = self._take(need)
            if blocks is None:
                return None
            chain.blocks.extend(blocks)
            self._num_held += need
        return chain

    def free(self, req: Request) -> None:
        """Release a preempted request's blocks; full blocks stay cached for its resumption."""
        self._release(self._chains[req.session_id], req.num_computed_tokens)

    def finish(self, req: Request, retention: Retention) -> None:
        chain = self._chains[req.session_id]
        chain.finished = True
        tokens = req.num_computed_tokens
        if retention is Retention.PIN:
            chain.pinned, chain.num_tokens = True, tokens
            self._pinned[chain.session_id] = None
            self._retains += 1
            self._emit(KvRetain, chain.session_id, tokens)
            return
        # OFFLOAD is write-back: the chain stays cached on the GPU and is copied to host memory
        # only when its first block is about to be evicted, so a session whose KV nobody needs
        # during its tool call never pays the copy.
        chain.offload_on_evict = retention is Retention.OFFLOAD
        self._release(chain, tokens)

    def offload(self, session_id: str, tokens: int) -> bool:
        """Copy the first `tokens` (whole blocks) of a chain to host memory, if there is room."""
        chain = self._chains[session_id]
        full = min(tokens // self.block_size, len(chain.blocks)) * self.block_size
        extra = full - chain.host_tokens
        if full == 0 or self._host_used + extra > self.config.host_capacity_tokens:
            return False
        if self.listener is not None:
            self.listener.offloaded(session_id, full)
        self._host_used += extra
        chain.host_tokens = full
        self._offloads += 1
        self._emit(KvOffload, session_id, full)
        return True

    def prefetch(self, session_id: str) -> int:
        """Bring back what of a session's host copy is not on the GPU, into empty blocks, as its
        prefix cache ahead of its next call; the tokens it now has on the GPU (0: nothing to
        bring back, no empty room, no free sequence slot, or the engine could not place it).
        Never evicts, so it costs others nothing but the copy."""
        chain = self._chains.get(session_id)
        if chain is None or chain.held or chain.host_tokens <= chain.num_tokens:
            return 0
        n = chain.host_tokens // self.block_size - len(chain.blocks)
        limit = self.config.max_sequences
        if n > self._pool.num_empty or (
            not chain.blocks
            and limit is not None
            and sum(1 for c in self._chains.values() if c.blocks) >= limit
        ):
            return 0
        tokens = chain.host_tokens
        if self.listener is not None and not self.listener.prefetched(session_id, tokens):
            return 0
        self._pool.remove_cached(chain)
        blocks = self._take(n)
        assert blocks is not None, "prefetch: room was checked"
        chain.blocks.extend(blocks)
        self._restored += tokens - chain.num_tokens
        chain.num_tokens = tokens
        self._pool.put_cached(chain)
        self._restores += 1
        self._emit(KvRestore, session_id, tokens)
        return tokens

    def unpin(self, session_id: str, offload: bool = False) -> None:
        """A pinned chain becomes ordinary prefix cache (evictable); with `offload`, written back
        to host memory if it is evicted (as `finish` with OFFLOAD)."""
        self._pinned.pop(session_id, None)
        chain = self._chains.get(session_id)
        if chain is not None and chain.pinned:
            chain.offload_on_evict = offload
            self._release(chain, chain.num_tokens)

    def unpin_oldest(self) -> bool:
        """Release the longest-held pin (the engine would stall otherwise); False if none."""
        while self._pinned:
            sid = next(iter(self._pinned))
            chain = self._chains.get(sid)
            self._pinned.pop(sid)
            if chain is not None and chain.pinned:
                self._release(chain, chain.num_tokens)
                return True
        return False

    def end_session(self, session_id: str) -> None:
        self._pinned.pop(session_id, None)
        chain = self._chains.pop(session_id, None)
        if chain is None:
            return
        if chain.held:
            self._num_held -= len(chain.blocks)
        else:
            self._pool.remove_cached(chain)
        self._pool.put_empty(chain.blocks)
        self._host_used -= chain.host_tokens
        if self.listener is not None:
            self.listener.ended(session_id)

    # ---- internals ------------------------------------------------------------------------
    def _reuse_cap(self, chain: KVBlocks, req: Request) -> int:
        # A resumed request may reuse its own sequence; a new call only the prefix it shares with
        # the latest finished sequence (and, if the chain holds an unfinished call's tokens, only
        # what that call shared with it too). At least one prompt token is always computed so
        # the step samples (as vLLM).
        if chain.request_id == req.request_id:
            limit = req.num_tokens - 1
        elif chain.finished:
            limit = req.reuse_tokens
        else:
            limit = min(req.reuse_tokens, chain.base_reuse)
        limit = min(limit, req.num_tokens - 1)
        return limit // self.block_size * self.block_size

    def _release(self, chain: KVBlocks, tokens: int) -> None:
        full = min(tokens // self.block_size, len(chain.blocks))
        self._num_held -= len(chain.blocks)
        self._pool.put_empty(chain.blocks[full:])
        if self.listener is not None and full * self.block_size < tokens:
            self.listener.truncated(chain.session_id, full * self.block_size)
        del chain.blocks[full:]
        self._pool.put_cached(chain)
        chain.held = chain.pinned = False
        chain.num_tokens = full * self.block_size

    def _evict(self, chain: Chain, n: int) -> None:
        assert isinstance(chain, KVBlocks)
        if chain.offload_on_evict:
            chain.offload_on_evict = False
            self.offload(chain.session_id, chain.num_tokens)
        del chain.blocks[len(chain.blocks) - n :]
        tokens = n * self.block_size
        chain.num_tokens -= tokens
        if self.listener is not None:
            self.listener.truncated(chain.session_id, chain.num_tokens)
        self._evicted_tokens += tokens
        self._evictions += n
        pending = self._pending_evict
        pending[chain.session_id] = pending.get(chain.session_id, 0) + tokens

    def _take(self, n: int) -> list[int] | None:
        """Blocks from the pool; one `kv_evict` event per session that lost cached tokens."""
        blocks = self._pool.take(n)
        self._flush_evictions()
        return blocks

    def _flush_evictions(self) -> None:
        pending = self._pending_evict
        if pending:
            if self._bus.wants(KvEvict):
                now = self._clock.now()
                for sid, tokens in pending.items():
                    self._bus.publish(KvEvict(time=now, session_id=sid, tokens=tokens))
            pending.clear()

    def _emit(self, kind: type[KvOffload | KvRestore | KvRetain], sid: str, n: int) -> None:
        if self._bus.wants(kind):
            self._bus.publish(kind(time=self._clock.now(), session_id=sid, tokens=n))

    def check_integrity(self) -> None:
        """Raise AssertionError if any block is leaked, double-owned or mislabelled."""
        seen: dict[int, str] = {}
        held = 0
        host = 0
        bs = self.block_size
        pool = self._pool
        for sid, chain in self._chains.items():
            assert chain.session_id == sid, f"chain of {sid} labelled {chain.session_id}"
            host += chain.host_tokens
            assert chain.host_tokens % bs == 0, f"{sid}: host copy not whole blocks"
            assert chain.num_tokens <= len(chain.blocks) * bs, f"{sid}: tokens beyond blocks"
            if chain.held:
                held += len(chain.blocks)
                assert not pool.is_cached(chain), f"{sid}: held chain listed as free"
            else:
                assert not chain.pinned, f"{sid}: pinned but not held"
                assert chain.num_tokens == len(chain.blocks) * bs, f"{sid}: partial cached block"
                assert pool.is_cached(chain) == bool(chain.blocks), f"{sid}: cache listing wrong"
            for block in chain.blocks:
                assert block not in seen, f"block {block} in chains {seen.get(block)} and {sid}"
                seen[block] = sid
        for listed in pool.cached_chains():
            assert isinstance(listed, KVBlocks), "foreign chain in the pool"
            assert self._chains.get(listed.session_id) is listed, "cached chain of no session"
        empty = pool.empty_blocks()
        assert len(set(empty)) == len(empty), "a block freed twice"
        assert not set(empty) & seen.keys(), "an empty block is still in a chain"
        assert held == self._num_held, f"held count {self._num_held} != {held}"
        assert len(empty) + len(seen) == self.num_blocks, "blocks leaked"
        assert pool.num_free == self.num_blocks - held, "free count wrong"
        assert all(0 <= b < self.num_blocks for b in empty), "block id out of range"
        assert host == self._host_used <= self.config.host_capacity_tokens, "host usage wrong"
