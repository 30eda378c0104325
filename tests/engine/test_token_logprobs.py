"""Token logprobs without a model: the log-softmax and top k against a plain reference, and which
logprobs a stream sends while a stop string holds its text back."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mars.engine.logprobs import TokenLogprob, token_logprob, top_ids


def reference(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_log_softmax_matches_the_reference(scale: float) -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(49152) * scale).astype(np.float32)
    want = reference(logits)
    for token in (0, int(logits.argmax()), 777):
        got = token_logprob(logits, token, 5)
        assert got.token_id == token and got.logprob <= 0
        assert got.logprob == pytest.approx(want[token], abs=1e-5)
        best = np.argsort(-want, kind="stable")[:5]
        assert [i for i, _ in got.top] == best.tolist()
        assert [v for _, v in got.top] == pytest.approx(want[best].tolist(), abs=1e-5)


def test_no_alternatives_when_none_are_asked() -> None:
    logits = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    assert token_logprob(logits, 1, 0).top == ()


@pytest.mark.parametrize("k", [1, 2, 3, 20])
@pytest.mark.parametrize("seed", range(20))
def test_top_ids_are_the_k_largest(k: int, seed: int) -> None:
    """The strided-sample prefilter is exact: on skewed, repetitive and tiny vocabularies too."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([5, 21, 300, 49152]))
    shape = seed % 3
    if shape == 0:
        logits = rng.standard_normal(n)
    elif shape == 1:
        logits = np.sort(rng.standard_normal(n))  # the largest all at the end
    else:
        logits = rng.integers(0, 4, n).astype(float)  # many ties
    logits = logits.astype(np.float32)
    got = top_ids(logits, k)
    assert len(got) == min(k, n) and len(set(got.tolist())) == len(got)
    assert np.all(np.diff(logits[got]) <= 0)
    assert np.sort(logits[got]).tolist() == np.sort(logits)[-min(k, n) :].tolist()


def test_what_a_stream_sends_around_a_held_stop_prefix() -> None:
    pytest.importorskip("llama_cpp", exc_type=ImportError)
    from mars.engine.live import _Stream

    stream: Any = _Stream(None, None, None, None, None)  # type: ignore[arg-type]
    lp = [TokenLogprob(i, -1.0, ()) for i in range(5)]
    # "ab" sent, "c" held (a stop string may start there): token 1 ("bc") waits.
    stream.text, stream.held = "ab", "c"
    stream.placed = [(0, 1, lp[0]), (1, 3, lp[1])]
    assert stream.sent_logprobs() == (lp[0],)
    # A byte of a character (no text of its own) at the end waits for the text after it.
    stream.text, stream.held = "abc", ""
    stream.placed += [(3, 3, lp[2])]
    assert stream.sent_logprobs() == (lp[1],)
    stream.text = "abcé"
    stream.placed += [(3, 4, lp[3])]
    assert stream.sent_logprobs() == (lp[2], lp[3])
    # At a stop string: a token with part of its text sent is reported, the rest are not.
    stream.placed = [(4, 6, lp[4])]
    stream.text = "abcéx"
    assert stream.sent_logprobs(stopped=True) == (lp[4],)
    stream.placed = [(5, 7, lp[4])]
    assert stream.sent_logprobs(stopped=True) == ()
