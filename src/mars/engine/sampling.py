"""Per-request sampling parameters (OpenAI's, plus vLLM's `min_tokens`, `ignore_eos`, `min_p`
and `repetition_penalty`)."""

from __future__ import annotations

from dataclasses import dataclass

# Most alternatives a request may ask for per token (vLLM's default `max_logprobs`, OpenAI's
# `top_logprobs` limit).
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None  # None: a fresh random seed per request (as vLLM)
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # end-of-generation tokens are masked until this many were generated
    ignore_eos: bool = False
    # OpenAI's penalties count the output's tokens; vLLM's repetition penalty (1 = off) counts
    # the prompt's too. `logit_bias` adds to the logits of the tokens it names.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None  # GBNF that constrains the output (forced tool calls, JSON)
    # None: no log-probabilities; k: each sampled token's, with the k most likely at its place.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature >= 0, 0 < top_p <= 1 and top_k >= 0 are required")
        if not 0 <= self.min_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("0 <= min_p <= 1 and repetition_penalty > 0 are required")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS} (or None)")
