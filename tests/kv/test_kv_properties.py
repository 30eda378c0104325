"""Property tests of the KV manager: no block leaked or double-freed, and a prefix hit only ever
serves KV that was computed for exactly the same tokens, by the same session or, through the
shared prefix tree, by another session whose prompt began with them."""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mars.core.clock import SimClock
from mars.core.request import Request
from mars.kv.manager import KVConfig, KVManager, Retention

BS = 4
_fresh = itertools.count(1)
# Leading tokens that sessions' first prompts share (a framework's system prompt), and a second
# system prompt that begins as the first does: the tree splits where they part.
_SYSTEM = [-i for i in range(1, 14)]
_PREFIXES = ([], _SYSTEM, _SYSTEM[:6] + [-100 - i for i in range(9)])


class KVMachine(RuleBasedStateMachine):
    max_sequences: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVManager(
            KVConfig(24, BS, host_capacity_tokens=40, max_sequences=self.max_sequences),
            SimClock(),
        )
        self.seq: dict[str, list[int]] = {}  # session -> token ids of its latest sequence
        self.running: dict[str, tuple[Request, list[int]]] = {}
        self.content: dict[int, dict[int, int]] = {}  # block -> offset -> token id written
        self.salt: dict[int, str] = {}  # block -> the salt of the session that wrote it
        self.turn = itertools.count()

    def _blocks(self, sid: str) -> list[int]:
        return self.kv.block_table(sid)

    def _check_served(self, req: Request, tokens: list[int], upto: int) -> None:
        blocks = self._blocks(req.session_id)
        for pos in range(upto):
            written = self.content.get(blocks[pos // BS], {}).get(pos % BS)
            assert written == tokens[pos], (
                f"{req.session_id} served token {written} at {pos}, wanted {tokens[pos]}"
            )
            assert self.salt[blocks[pos // BS]] == req.prefix_salt, "KV crossed a salt"

    def _write(self, req: Request, tokens: list[int], start: int, n: int) -> None:
        blocks = self._blocks(req.session_id)
        for pos in range(start, start + n):
            self.content.setdefault(blocks[pos // BS], {})[pos % BS] = tokens[pos]
            self.salt[blocks[pos // BS]] = req.prefix_salt

    @rule(
        sid=st.sampled_from(["a", "b", "c", "d"]),
        keep=st.floats(0, 1),
        new=st.integers(1, 30),
        out=st.integers(1, 6),
        limit=st.integers(1, 40),
        restore=st.booleans(),
        system=st.sampled_from(range(len(_PREFIXES))),
    )
    def start_call(
        self, sid: str, keep: float, new: int, out: int, limit: int, restore: bool, system: int
    ) -> None:
        if sid in self.running:
            return
        prev = self.seq.get(sid, [])
        reuse = int(len(prev) * keep)  # keep < 1: the history was rewritten
        head = prev[:reuse] if prev else list(_PREFIXES[system])
        tokens = head + [next(_fresh) for _ in range(new)]
        # Two tenants: a and b may share each other's KV, c and d each other's, never across.
        salt = "ab" if sid in "ab" else "cd"
        req = Request(
            f"{sid}-{next(self.turn)}",
            sid,
            len(tokens),
            out,
            reuse,
            0.0,
            prefix=tokens,
            prefix_salt=salt,
        )
        start = self.kv.start(req, limit, restore=restore)
        if start is None:
            return
        cached = start.hit.gpu_tokens + start.hit.host_tokens
        assert cached < len(tokens) and cached % BS == 0
        assert start.hit.host_tokens == 0 or start.hit.gpu_tokens + start.hit.host_tokens <= reuse
        # Restored tokens come back from the host copy: the executor writes them.
        self._write(req, tokens, start.hit.gpu_tokens, start.hit.host_tokens)
        self._check_served(req, tokens, cached)
        self._write(req, tokens, cached, start.num_new_tokens)
        req.num_computed_tokens = cached + start.num_new_tokens
        self.running[sid] = (req, tokens)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), n=st.integers(1, 12))
    def step(self, data: st.DataObject, n: int) -> None:
        sid = data.draw(st.sampled_from(sorted(self.running)))
        req, tokens = self.running[sid]
        if req.num_computed_tokens == req.num_tokens:  # sample one token first
            tokens.append(next(_fresh))
            req.num_output_tokens += 1
        n = min(n, req.num_tokens - req.num_computed_tokens)
        if self.kv.allocate(req, n) is None:
            return
        self._write(req, tokens, req.num_computed_tokens, n)
        req.num_computed_tokens += n

    @precondition(lambda self: self.running)
    @rule(data=st.data(), how=st.sampled_from([*list(Retention), "preempt"]))
    def stop(self, data: st.DataObject, how: Retention | str) -> None:
        sid = data.draw(st.sampled_from(sorted(self.running)))
        req, tokens = self.running.pop(sid)
        if how == "preempt":
            self.kv.free(req)
            return
        assert isinstance(how, Retention)
        self.kv.finish(req, how)
        self.seq[sid] = tokens

    @rule(sid=st.sampled_from(["a", "b", "c", "d"]))
    def unpin(self, sid: str) -> None:
        self.kv.unpin(sid)

    @rule(sid=st.sampled_from(["a", "b", "c", "d"]))
    def end_session(self, sid: str) -> None:
        if sid not in self.running:
            self.kv.end_session(sid)
            self.seq.pop(sid, None)

    @invariant()
    def integrity(self) -> None:
        self.kv.check_integrity()
        if self.max_sequences is not None:
            on_gpu = sum(1 for c in self.kv._chains.values() if c.blocks or c.base)
            assert on_gpu <= self.max_sequences, f"{on_gpu} sessions hold KV"


class SlotLimitedKVMachine(KVMachine):
    """As a llama.cpp context: at most 2 sessions hold KV at once (sequence slots)."""

    max_sequences = 2


KVMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
SlotLimitedKVMachine.TestCase.settings = KVMachine.TestCase.settings
TestKVProperties = KVMachine.TestCase
TestSlotLimitedKVProperties = SlotLimitedKVMachine.TestCase
