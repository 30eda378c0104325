"""Token-id prompts that grow as a trace says (DESIGN.md section 4).

Call i sends `reuse_tokens` of the previous call's prompt + output, then `prompt_tokens -
reuse_tokens` new random ids: an appending history keeps all of the previous context, an elided
one (SWE-agent) keeps the first prompt (system prompt and task).

The server's prefix cache hits where the new prompt's ids equal the previous call's prompt +
output ids (`_common_prefix` in `mars.engine.live`). A `/v1/completions` answer carries text, and
re-tokenizing text does not give back the sampled ids. So the previous output's ids are taken from
the answer when it has them (`choices[0].token_ids`, vLLM's `return_token_ids`), else a seeded
filler of the output's length stands in for them. With the filler the server reuses the previous
prompt and prefills the previous output again: per appending call, `output_{i-1}` tokens fewer
hits than the trace's reuse, the same as an agent that re-renders the model's answer into its
history in its own words. The token counts of every call are exactly the trace's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mars.sim.workload import SessionSpec, TurnSpec

# Ids of ordinary tokens: SmolLM2's special and control tokens sit below 1000 and nothing is
# above 30000 in any vocabulary the server loads by default (49152 ids).
TOKEN_RANGE = (1000, 30000)


@dataclass
class PromptBuilder:
    """The token ids one session sends, call after call; seeded per session."""

    spec: SessionSpec
    seed: int = 0
    token_range: tuple[int, int] = TOKEN_RANGE
    _context: list[int] = field(default_factory=list)  # previous call's prompt + output ids
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        # Seeded by (seed, session, trajectory), not a shared stream: every policy of a bench
        # sends the same ids for the same session.
        self._rng = random.Random(f"prompts/{self.seed}/{self.spec.session_id}/{self.spec.traj_id}")

    def prompt(self, turn: TurnSpec) -> list[int]:
        """The prompt of `turn`: its reusable prefix, then new ids up to `prompt_tokens`."""
        keep = min(turn.reuse_tokens, len(self._context))
        return self._context[:keep] + self.ids(turn.prompt_tokens - keep)

    def answered(self, prompt: list[int], turn: TurnSpec, output_ids: list[int] | None) -> None:
        """Record the call's output: its ids when the server returned them, else the filler."""
        ids = output_ids if output_ids is not None else self.ids(turn.output_tokens)
        self._context = prompt + ids

    def ids(self, n: int) -> list[int]:
        lo, hi = self.token_range
        return [self._rng.randrange(lo, hi) for _ in range(max(0, n))]
