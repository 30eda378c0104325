"""Block-level KV manager with prefix reuse across turns and across sessions, and three residencies.

Each session owns one chain: the blocks that hold the KV of its latest sequence, in order. A
chain is either *held* (its request is running, or a policy pinned it through a tool phase) or
*cached* (free to evict, still reusable as prefix cache: what vLLM does with finished requests).
A chain can also have a copy in host memory (offloaded), restorable into any free blocks.

A chain may continue a shared `Segment` (see `mars.kv.prefix`): leading blocks that hold the same
tokens for several sessions, held once. A call whose own session has nothing to reuse looks for
the longest run of leading tokens (`Request.prefix`) that another session's KV holds; the blocks
that hold it become a segment (the other chain is split, or a segment is split) and the call's
chain continues it. A segment is kept while any session below it runs or holds blocks, and is
evicted (from its tail) only after all of theirs.

Only a session's own tokens are ever served to it: a new call may reuse at most the tokens its
`reuse_tokens` says are identical to the previous sequence, or the tokens its `prefix` says are
identical to another's, and only full blocks (as vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence

from mars.core.clock import Clock
from mars.core.events import EventBus, KvEvict, KvOffload, KvRestore, KvRetain
from mars.core.request import Request
from mars.kv.block_pool import BlockPool, Chain
from mars.kv.prefix import Place, Segment, common_prefix
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
        "base",
        "base_reuse",
        "blocks",
        "finished",
        "held",
        "host_tokens",
        "key",
        "num_tokens",
        "offload_on_evict",
        "parent",
        "pinned",
        "request_id",
        "salt",
        "session_id",
    )

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.parent: Segment | None = None  # the shared segment the own blocks continue
        self.base = 0  # tokens before the own blocks: the parent's end (0 without one)
        self.blocks: list[int] = []  # own blocks, holding positions from `base` on
        self.key: Sequence[int] = ()  # content of the latest request's leading tokens
        self.salt = ""  # its `prefix_salt`: whose calls may share this chain's blocks
        # Tokens with valid KV, `base` included (held: may end mid-block; cached: full blocks).
        self.num_tokens = 0
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
        self._segments: dict[Segment, None] = {}
        self._host_used = 0
        self._pending_evict: dict[str, int] = {}
        self._pinned: dict[str, None] = {}  # sessions pinned through a tool call, oldest first
        self._num_held = 0  # blocks not free: held chains' and busy segments'
        self._hit = self._restored = self._evicted_tokens = self._shared = 0
        self._evictions = self._offloads = self._restores = self._retains = 0
        # Shared-prefix matches: request id -> (tree version, node, tokens); any change to the
        # tree or to a chain's blocks bumps the version.
        self._version = 0
        self._matches: dict[str, tuple[int, Segment | KVBlocks | None, int]] = {}

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

    @property
    def shared_tokens(self) -> int:
        """Prompt tokens served from KV that another session computed."""
        return self._shared

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
        if chain.blocks or chain.base:
            return Residency.CACHED
        return Residency.HOST if chain.host_tokens else Residency.DROPPED

    def offload_pending(self, session_id: str) -> bool:
        """True if the session's cached KV goes to host memory once it is evicted."""
        chain = self._chains.get(session_id)
        return chain is not None and chain.offload_on_evict

    def cached_tokens(self, session_id: str) -> int:
        chain = self._chains.get(session_id)
        return 0 if chain is None else chain.num_tokens

    def shared_prefix_tokens(self, session_id: str) -> int:
        """Leading tokens of the session's sequence held in shared segments: they stay on the
        GPU while any session below them needs them, so keeping the session's KV costs only
        what follows, and so does computing it again."""
        chain = self._chains.get(session_id)
        return 0 if chain is None else chain.base

    @property
    def segment_tokens(self) -> int:
        """Tokens held in shared segments, each counted once."""
        return sum(seg.end - seg.start for seg in self._segments)

    def host_tokens(self, session_id: str) -> int:
        """Tokens of the session's KV with a copy in host memory."""
        chain = self._chains.get(session_id)
        return 0 if chain is None else chain.host_tokens

    def block_table(self, session_id: str) -> list[int]:
        """The blocks that hold the session's sequence, in position order (shared ones first)."""
        chain = self._chains.get(session_id)
        if chain is None:
            return []
        path = chain.parent.ancestors() if chain.parent is not None else []
        return [b for seg in reversed(path) for b in seg.blocks] + chain.blocks

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        chain = self._chains.get(req.session_id)
        have = 0 if chain is None else chain.base // self.block_size + len(chain.blocks)
        return max(0, -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - have)

    def lookup(self, req: Request) -> PrefixHit:
        """What a first schedule of `req` would find cached, without changing anything."""
        own, host = self._own_hit(req)
        gpu = own if own else self._shared_hit(req)[1]
        return PrefixHit(gpu, max(0, host - gpu))

    # ---- transitions ----------------------------------------------------------------------
    def start(self, req: Request, limit: int, restore: bool = True) -> Start | None:
        """Claim `req`'s cached prefix and room for up to `limit` new tokens; None if it won't fit.

        All or nothing: on None, no block has moved (but for a cached session evicted whole
        when every sequence slot was taken).
        """
        hit = self.lookup(req)
        cached = hit.gpu_tokens + (hit.host_tokens if restore else 0)
        if min(req.num_tokens - cached, limit) <= 0:
            return None
        chain = self._chains.get(req.session_id)
        if (chain is None or not (chain.blocks or chain.base)) and not self._free_a_sequence():
            return None
        hit = self.lookup(req)  # freeing a slot may have evicted what it found
        if not restore:
            hit = PrefixHit(hit.gpu_tokens, 0)
        cached = hit.gpu_tokens + hit.host_tokens
        n = min(req.num_tokens - cached, limit)
        if n <= 0:
            return None
        bs = self.block_size
        own = self._own_hit(req)[0]
        avail = self._pool.num_free
        if chain is not None:
            keep = (own - chain.base) // bs if own else 0
            avail += len(chain.blocks) - keep if chain.held else -keep
            if own and not chain.held:
                avail -= self._free_above(chain.parent)
        if not own:  # (what it drops of its own is not counted: it may free less)
            avail -= self._claimed(req)
        # Blocks its sequence has once begun: the prefix found (own, or shared), whole blocks.
        if -(-(cached + n) // bs) - hit.gpu_tokens // bs > avail:
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
        if limit is None or self._num_sequences() < limit:
            return True
        victim = self._pool.oldest_cached()
        if isinstance(victim, Segment):  # every session below it is idle and holds no blocks
            sid = victim.any_session()
            assert sid is not None, "a segment with no session"
            self._detach(self._chains[sid])
        elif isinstance(victim, KVBlocks):
            self._pool.remove_cached(victim)
            self._pool.put_empty(list(victim.blocks))
            self._evict(victim, len(victim.blocks))
            self._detach(victim)
        else:
            idle = next((c for c in self._chains.values() if c.base and not c.held), None)
            if idle is None:
                return False
            self._detach(idle)
        self._flush_evictions()
        return True

    def begin(self, req: Request, restore: bool = True) -> PrefixHit:
        """Claim the cached prefix for `req` (first schedule, or again after preemption).

        Blocks beyond the reusable prefix are released as empty. With `restore`, tokens held only
        on the host are brought back into newly allocated blocks if they fit; the executor is told
        through the step plan and pays the copy.
        """
        own, host_cap = self._own_hit(req)
        shared_node, shared = (None, 0) if own else self._shared_hit(req)
        chain = self._chains.get(req.session_id)
        if chain is None:
            chain = self._chains[req.session_id] = KVBlocks(req.session_id)
        elif chain.held and not chain.pinned:
            raise RuntimeError(f"session {req.session_id} already has a request running")
        gpu = own or shared
        # The host copy stays valid only as far as the new sequence shares it.
        self._host_used -= chain.host_tokens - host_cap
        chain.host_tokens = host_cap
        if own:
            keep = (own - chain.base) // self.block_size
            self._take_hold(chain)
            self._num_held -= len(chain.blocks) - keep
            self._pool.put_empty(chain.blocks[keep:])
            if keep < len(chain.blocks) and self.listener is not None:
                self.listener.truncated(req.session_id, own)
            del chain.blocks[keep:]  # keep > 0: its state in the parent is unchanged
        elif shared_node is not None:
            self._attach(chain, self._split(shared_node, shared))
            self._shared += shared
        else:
            self._detach(chain)
            self._take_hold(chain)
        chain.request_id, chain.key, chain.salt = req.request_id, req.prefix, req.prefix_salt
        chain.offload_on_evict = False
        chain.finished, chain.base_reuse = False, req.reuse_tokens
        chain.num_tokens = gpu
        restored = 0
        hit_host = max(0, host_cap - gpu)
        if restore and hit_host:
            blocks = self._take(hit_host // self.block_size)
            if blocks is not None:
                chain.blocks.extend(blocks)
                self._num_held += len(blocks)
                restored = hit_host
                chain.num_tokens += restored
                self._restored += restored
                self._restores += 1
                self._emit(KvRestore, req.session_id, restored)
        self._hit += gpu
        self._version += 1
        return PrefixHit(gpu, restored)

    def allocate(self, req: Request, num_new_tokens: int) -> KVBlocks | None:
        """Make room for `num_new_tokens` beyond `req.num_computed_tokens`; None if KV is full."""
        chain = self._chains[req.session_id]
        need = self.blocks_needed(req, num_new_tokens)
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
            self._version += 1
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
        bs = self.block_size
        full = min(tokens // bs, chain.base // bs + len(chain.blocks)) * bs
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
        n = (chain.host_tokens - chain.base) // self.block_size - len(chain.blocks)
        limit = self.config.max_sequences
        if n > self._pool.num_empty or (
            not (chain.blocks or chain.base)
            and limit is not None
            and self._num_sequences() >= limit
        ):
            return 0
        tokens = chain.host_tokens
        if self.listener is not None and not self.listener.prefetched(session_id, tokens):
            return 0
        before = self._state(chain)
        self._pool.remove_cached(chain)
        blocks = self._take(n)
        assert blocks is not None, "prefetch: room was checked"
        chain.blocks.extend(blocks)
        self._restored += tokens - chain.num_tokens
        chain.num_tokens = tokens
        self._pool.put_cached(chain)
        self._settle(chain, before)
        self._version += 1
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
        chain = self._chains.get(session_id)
        if chain is None:
            return
        self._detach(chain)
        del self._chains[session_id]
        self._host_used -= chain.host_tokens
        if self.listener is not None:
            self.listener.ended(session_id)

    # ---- internals ------------------------------------------------------------------------
    def _num_sequences(self) -> int:
        """Sessions whose sequence holds GPU KV (of their own, or shared)."""
        return sum(1 for c in self._chains.values() if c.blocks or c.base)

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

    def _own_hit(self, req: Request) -> tuple[int, int]:
        """(GPU tokens, host-copy tokens) the session's own KV offers `req`. GPU tokens that end
        inside the shared segments are none: the call then goes by the prefix tree."""
        chain = self._chains.get(req.session_id)
        if chain is None:
            return 0, 0
        cap = self._reuse_cap(chain, req)
        gpu = min(cap, chain.num_tokens // self.block_size * self.block_size)
        if gpu <= chain.base and chain.base:
            gpu = 0
        return gpu, min(cap, chain.host_tokens)

    def _shared_hit(self, req: Request) -> tuple[Segment | KVBlocks | None, int]:
        """The node of the prefix tree that holds the most leading tokens of `req.prefix`
        (another session's finished chain, or a segment) and how many it holds (whole blocks)."""
        key = req.prefix
        if not key:
            return None, 0
        memo = self._matches.get(req.request_id)
        if memo is not None and memo[0] == self._version:
            return memo[1], memo[2]
        bs = self.block_size
        limit = min(len(key), req.num_tokens - 1) // bs * bs
        best: tuple[Segment | KVBlocks | None, int] = (None, 0)
        level: list[Segment | KVBlocks] = [s for s in self._segments if s.parent is None]
        level += [c for c in self._chains.values() if c.parent is None]
        floor = 0
        while level and limit > floor:
            pick: Segment | KVBlocks | None = None
            got = floor
            for node in level:
                if node.salt != req.prefix_salt:
                    continue
                if isinstance(node, KVBlocks):
                    if node.session_id == req.session_id or (node.held and not node.pinned):
                        continue  # a running call's blocks may not be computed yet
                    end = node.num_tokens // bs * bs
                else:
                    end = node.end
                m = common_prefix(key, node.key, min(limit, end)) // bs * bs
                if m > got:
                    pick, got = node, m
            if pick is None:
                break
            best = (pick, got)
            if not isinstance(pick, Segment) or got < pick.end:
                break
            floor = got
            level = [*pick.children, *(self._chains[s] for s in pick.sessions)]
        if len(self._matches) > 4096:
            self._matches.clear()
        self._matches[req.request_id] = (self._version, *best)
        return best

    def _claimed(self, req: Request) -> int:
        """Free blocks that attaching `req` to its shared match would take out of the free ones."""
        node, m = self._shared_hit(req)
        if node is None:
            return 0
        if isinstance(node, Segment):
            if node.held:
                return 0
            part = (m - node.start) // self.block_size if m < node.end else len(node.blocks)
            return part + self._free_above(node.parent)
        if node.held:
            return 0
        return (m - node.base) // self.block_size + self._free_above(node.parent)

    @staticmethod
    def _free_above(seg: Segment | None) -> int:
        """Blocks of `seg` and the segments above it that are free (no session below runs)."""
        n = 0
        while seg is not None and not seg.held:
            n += len(seg.blocks)
            seg = seg.parent
        return n

    @staticmethod
    def _state(chain: KVBlocks) -> tuple[int, int]:
        """What a session counts for in its parent segment: (busy, held)."""
        return int(chain.held or bool(chain.blocks)), int(chain.held)

    def _settle(self, chain: KVBlocks, before: tuple[int, int]) -> None:
        """Tell the chain's parent segment how the chain's state changed since `before`."""
        after = self._state(chain)
        if chain.parent is not None and after != before:
            self._adjust(chain.parent, after[0] - before[0], after[1] - before[1])

    def _adjust(self, seg: Segment, busy: int, held: int) -> None:
        was_held = seg.held > 0
        seg.busy += busy
        seg.held += held
        assert seg.busy >= 0 and seg.held >= 0, "segment counts below zero"
        self._place(seg)
        if seg.parent is not None and (seg.held > 0) != was_held:
            self._adjust(seg.parent, 0, 1 if seg.held else -1)

    def _unplace(self, seg: Segment) -> None:
        if seg.place is Place.HELD:
            self._num_held -= len(seg.blocks)
        elif seg.place is Place.WAITING:
            self._pool.wait(-len(seg.blocks))
        elif seg.place is Place.CACHED:
            self._pool.remove_cached(seg)
        seg.place = Place.NONE

    def _place(self, seg: Segment) -> None:
        """Count the segment's blocks where its state says."""
        place = Place.HELD if seg.held else Place.WAITING if seg.busy else Place.CACHED
        if place is seg.place:
            return
        self._unplace(seg)
        if place is Place.HELD:
            self._num_held += len(seg.blocks)
        elif place is Place.WAITING:
            self._pool.wait(len(seg.blocks))
        else:
            self._pool.put_cached(seg)
        seg.place = place

    def _split(self, node: Segment | KVBlocks, m: int) -> Segment:
        """The segment that ends at position `m` of `node`'s sequence, cutting `node` there."""
        if isinstance(node, Segment) and m == node.end:
            return node
        bs = self.block_size
        start = node.start if isinstance(node, Segment) else node.base
        k = (m - start) // bs
        assert 0 < k <= len(node.blocks), "a split inside the node"
        seg = Segment(node.key, start, node.parent, node.salt)
        parent = node.parent
        if isinstance(node, Segment):
            self._unplace(node)
            seg.blocks, seg.end = node.blocks[:k], m
            del node.blocks[:k]
            node.start = m
            if parent is not None:
                parent.children[parent.children.index(node)] = seg
            seg.children.append(node)
            seg.busy, seg.held = 1, int(node.held > 0)
            node.parent = seg
            self._place(node)
        else:
            cached = self._pool.is_cached(node)
            if cached:
                self._pool.remove_cached(node)
            elif node.held:
                self._num_held -= k
            seg.blocks, seg.end = node.blocks[:k], m
            del node.blocks[:k]
            if cached:
                self._pool.put_cached(node)
            if parent is not None:  # its place below the parent is the segment's now
                parent.sessions.discard(node.session_id)
                parent.children.append(seg)
            seg.sessions.add(node.session_id)
            seg.busy, seg.held = self._state(node)
            node.parent, node.base = seg, m
        self._segments[seg] = None
        self._place(seg)
        self._version += 1
        return seg

    def _attach(self, chain: KVBlocks, seg: Segment) -> None:
        """Make `chain` (held from now on) continue `seg`, dropping the KV it had."""
        below = chain.parent is not None and seg in chain.parent.ancestors()
        source = None if below else seg.any_session()
        if below:  # its own path: cut its sequence back to the segment's end
            self._drop_own(chain)
            if self.listener is not None:
                self.listener.truncated(chain.session_id, seg.end)
        else:
            self._detach(chain)
        old = self._unlink(chain)
        chain.held, chain.pinned = True, False
        chain.parent, chain.base = seg, seg.end
        seg.sessions.add(chain.session_id)
        self._adjust(seg, 1, 1)
        self._prune(old)
        if source is not None and self.listener is not None:
            self.listener.shared(chain.session_id, source, seg.end)
        self._version += 1

    def _take_hold(self, chain: KVBlocks) -> None:
        """Mark a chain held (its blocks, and the segments it continues, stop being free)."""
        before = self._state(chain)
        if not chain.held:
            self._pool.remove_cached(chain)
            self._num_held += len(chain.blocks)
        chain.held, chain.pinned = True, False
        self._settle(chain, before)

    def _drop_own(self, chain: KVBlocks) -> None:
        """Release a chain's own blocks as empty (the shared segments it continues stay)."""
        before = self._state(chain)
        if chain.held:
            self._num_held -= len(chain.blocks)
        else:
            self._pool.remove_cached(chain)
        self._pool.put_empty(chain.blocks)
        chain.blocks = []
        chain.num_tokens = chain.base
        self._settle(chain, before)

    def _detach(self, chain: KVBlocks) -> None:
        """Drop all the GPU KV the chain's sequence holds, shared or own (held stays as it was)."""
        had = chain.base or chain.blocks
        self._drop_own(chain)
        if self.listener is not None and had:
            self.listener.truncated(chain.session_id, 0)
        self._prune(self._unlink(chain))
        chain.base = chain.num_tokens = 0
        self._version += 1

    def _unlink(self, chain: KVBlocks) -> Segment | None:
        """Take the chain from below its parent segment (which it no longer counts in); the
        parent, or None."""
        parent = chain.parent
        if parent is not None:
            state = self._state(chain)
            parent.sessions.discard(chain.session_id)
            chain.parent = None
            self._adjust(parent, -state[0], -state[1])
        return parent

    def _prune(self, seg: Segment | None) -> None:
        """Drop segments no session's sequence holds any more (nothing refers to their cells)."""
        while seg is not None and not seg.sessions and not seg.children:
            self._unplace(seg)
            self._pool.put_empty(seg.blocks)
            seg.blocks = []
            del self._segments[seg]
            parent = seg.parent
            if parent is not None:
                parent.children.remove(seg)
                self._adjust(parent, -1, -int(seg.held > 0))
            seg = parent
            self._version += 1

    def _release(self, chain: KVBlocks, tokens: int) -> None:
        before = self._state(chain)
        bs = self.block_size
        full = min((tokens - chain.base) // bs, len(chain.blocks))
        self._num_held -= len(chain.blocks)
        self._pool.put_empty(chain.blocks[full:])
        end = chain.base + full * bs
        if self.listener is not None and end < tokens:
            self.listener.truncated(chain.session_id, end)
        del chain.blocks[full:]
        self._pool.put_cached(chain)
        chain.held = chain.pinned = False
        chain.num_tokens = end
        self._settle(chain, before)
        self._version += 1

    def _evict(self, chain: Chain, n: int) -> None:
        tokens = n * self.block_size
        self._evicted_tokens += tokens
        self._evictions += n
        self._version += 1
        pending = self._pending_evict
        if isinstance(chain, Segment):
            self._evict_segment(chain, n)
            for sid in chain.sessions:
                pending[sid] = pending.get(sid, 0) + tokens
            return
        assert isinstance(chain, KVBlocks)
        if chain.offload_on_evict:
            chain.offload_on_evict = False
            self.offload(chain.session_id, chain.num_tokens)
        before = self._state(chain)
        del chain.blocks[len(chain.blocks) - n :]
        chain.num_tokens -= tokens
        if self.listener is not None:
            self.listener.truncated(chain.session_id, chain.num_tokens)
        self._settle(chain, before)
        pending[chain.session_id] = pending.get(chain.session_id, 0) + tokens

    def _evict_segment(self, seg: Segment, n: int) -> None:
        """The tail of an idle segment was taken (the pool has unlisted it if it took all):
        every session below it, none holding blocks of its own, loses those tokens."""
        del seg.blocks[len(seg.blocks) - n :]
        seg.end -= n * self.block_size
        for sid in seg.sessions:
            chain = self._chains[sid]
            chain.base = chain.num_tokens = seg.end
            if self.listener is not None:
                self.listener.truncated(sid, seg.end)
        if seg.blocks:
            return
        seg.place = Place.NONE
        del self._segments[seg]
        parent = seg.parent
        for sid in seg.sessions:
            self._chains[sid].parent = parent
            if parent is not None:
                parent.sessions.add(sid)
        if parent is not None:
            parent.children.remove(seg)
            self._adjust(parent, -1, 0)

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
        held = waiting = 0
        host = 0
        bs = self.block_size
        pool = self._pool
        for sid, chain in self._chains.items():
            assert chain.session_id == sid, f"chain of {sid} labelled {chain.session_id}"
            host += chain.host_tokens
            assert chain.host_tokens % bs == 0, f"{sid}: host copy not whole blocks"
            end = chain.base + len(chain.blocks) * bs
            assert chain.base <= chain.num_tokens <= end, f"{sid}: tokens beyond blocks"
            parent = chain.parent
            assert chain.base == (parent.end if parent else 0), f"{sid}: base is not its parent's"
            assert parent is None or sid in parent.sessions, f"{sid}: not below its parent"
            assert parent is None or parent in self._segments, f"{sid}: below a dropped segment"
            if chain.held:
                held += len(chain.blocks)
                assert not pool.is_cached(chain), f"{sid}: held chain listed as free"
            else:
                assert not chain.pinned, f"{sid}: pinned but not held"
                assert chain.num_tokens == end, f"{sid}: partial cached block"
                assert pool.is_cached(chain) == bool(chain.blocks), f"{sid}: cache listing wrong"
            for block in chain.blocks:
                assert block not in seen, f"block {block} in chains {seen.get(block)} and {sid}"
                seen[block] = sid
        for seg in self._segments:
            name = f"segment [{seg.start}, {seg.end})"
            assert seg.blocks and seg.end == seg.start + len(seg.blocks) * bs, f"{name}: size"
            assert seg.start == (seg.parent.end if seg.parent else 0), f"{name}: start"
            assert seg.parent is None or seg in seg.parent.children, f"{name}: orphan"
            assert seg.any_session() is not None, f"{name}: no session below it"
            states = [self._state(self._chains[s]) for s in seg.sessions]
            busy = len(seg.children) + sum(b for b, _ in states)
            held_below = sum(1 for c in seg.children if c.held) + sum(h for _, h in states)
            assert seg.busy == busy, f"{name}: busy {seg.busy} != {busy}"
            assert seg.held == held_below, f"{name}: held {seg.held} != {held_below}"
            place = Place.HELD if seg.held else Place.WAITING if busy else Place.CACHED
            assert seg.place is place, f"{name}: counted {seg.place.name}, is {place.name}"
            assert pool.is_cached(seg) == (place is Place.CACHED), f"{name}: listing wrong"
            if place is Place.HELD:
                held += len(seg.blocks)
            elif place is Place.WAITING:
                waiting += len(seg.blocks)
            for block in seg.blocks:
                assert block not in seen, f"block {block} in {seen.get(block)} and {name}"
                seen[block] = name
        for listed in pool.cached_chains():
            if isinstance(listed, Segment):
                assert listed in self._segments, "cached segment of no tree"
                continue
            assert isinstance(listed, KVBlocks), "foreign chain in the pool"
            assert self._chains.get(listed.session_id) is listed, "cached chain of no session"
        empty = pool.empty_blocks()
        assert len(set(empty)) == len(empty), "a block freed twice"
        assert not set(empty) & seen.keys(), "an empty block is still in a chain"
        assert held == self._num_held, f"held count {self._num_held} != {held}"
        assert len(empty) + len(seen) == self.num_blocks, "blocks leaked"
        assert pool.num_free == self.num_blocks - held, "free count wrong"
        assert pool.num_free - pool.num_empty - waiting == sum(
            len(c.blocks) for c in pool.cached_chains()
        ), "waiting count wrong"
        assert all(0 <= b < self.num_blocks for b in empty), "block id out of range"
        assert host == self._host_used <= self.config.host_capacity_tokens, "host usage wrong"
