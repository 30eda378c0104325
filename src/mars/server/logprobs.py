"""OpenAI's `logprobs` objects (chat's and the legacy completions') from the engine's
`TokenLogprob`s, whole or one stream chunk at a time.

A token's text is its piece as the output's text is made of it (UTF-8, control tokens such as the
end of the answer as ""), so the tokens of an answer join to its text; `bytes` are the piece's
own bytes, which matter where a character spans several tokens. JSON has no -inf: a logprob
below -9999 is sent as -9999, as vLLM does."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mars.engine.logprobs import TokenLogprob
from mars.engine.model import Model

FLOOR = -9999.0


class Pieces:
    """Token id -> its text and bytes (cached: an answer's alternatives repeat)."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._model.piece(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit


def chat_content(pieces: Pieces, lps: Iterable[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat's `logprobs.content`: one entry per token, its `top_logprobs` the k most likely."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = pieces(token_id)
        return {"token": text, "logprob": max(logprob, FLOOR), "bytes": raw}

    return [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
        for lp in lps
    ]


def completion(pieces: Pieces, lps: Iterable[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Completions' `logprobs`; `text_offset` counts from `offset` (the text sent before). Its
    `top_logprobs` maps the k most likely tokens' texts to their logprobs, and the sampled
    token's too (so k or k + 1 of them, as OpenAI and vLLM)."""
    tokens: list[str] = []
    values: list[float] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    for lp in lps:
        text = pieces(lp.token_id)[0]
        top = {pieces(i)[0]: max(v, FLOOR) for i, v in lp.top}
        top.setdefault(text, max(lp.logprob, FLOOR))
        tokens.append(text)
        values.append(max(lp.logprob, FLOOR))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


class StreamLogprobs:
    """A stream's logprobs, one chunk's worth at a time: `add` what a chunk of the engine
    brought, `take` what an event sent now carries (a dict to merge into its choice: empty when
    the request did not ask). Tokens whose chunk sent no event (a tool call's text, parsed
    before it goes out) ride on the next event."""

    def __init__(self, model: Model, asked: bool, chat: bool) -> None:
        self.asked, self.chat = asked, chat
        self._pieces = Pieces(model)
        self._held: list[TokenLogprob] = []
        self._offset = 0  # completions: text_offset of the next token

    @property
    def pending(self) -> bool:
        return bool(self._held)

    def add(self, lps: Iterable[TokenLogprob]) -> None:
        if self.asked:
            self._held += lps

    def take(self) -> dict[str, Any]:
        if not self.asked:
            return {}
        held, self._held = self._held, []
        if self.chat:
            return {"logprobs": {"content": chat_content(self._pieces, held)}}
        body = completion(self._pieces, held, self._offset)
        self._offset += sum(len(t) for t in body["tokens"])
        return {"logprobs": body}


def whole(model: Model, asked: bool, chat: bool, lps: Iterable[TokenLogprob]) -> Any:
    """A whole answer's `logprobs` (None when the request did not ask)."""
    if not asked:
        return None
    pieces = Pieces(model)
    return {"content": chat_content(pieces, lps)} if chat else completion(pieces, lps)
