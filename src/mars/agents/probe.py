"""Ideal times for live runs (DESIGN.md section 5), until `mars calibrate` exists.

DESIGN.md defines a live session's ideal time as "the calibrated cost model plus the nominal tool
times". Without a calibrated cost model of the embedded engine, `probe_rates` measures the idle
server once: a call's fixed cost, its prefill rate and its decode rate, from three single-session
requests. `ideal_time` is an approximation built on them: every call prefills only the tokens the
trace says are new (a perfect prefix cache), decodes alone, and every tool step takes its nominal
time. A calibrated cost model (batching effects, context-length-dependent attention) replaces
`ideal_time` without touching its callers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mars.agents.client import ServerClient
from mars.agents.prompts import TOKEN_RANGE
from mars.sim.workload import SessionSpec

_SHORT, _LONG, _DECODE = 16, 512, 128  # probe prompt and output lengths, tokens


@dataclass(frozen=True)
class EngineRates:
    """One request alone on the idle server."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    call_overhead_s: float  # HTTP, scheduling and the first step's fixed cost


def ideal_time(spec: SessionSpec, rates: EngineRates) -> float:
    """Approximate ideal time of `spec`: its calls alone on the idle engine with a perfect prefix
    cache, plus its nominal tool times."""
    llm = sum(
        rates.call_overhead_s
        + turn.new_prompt_tokens / rates.prefill_tokens_per_s
        + turn.output_tokens / rates.decode_tokens_per_s
        for turn in spec.turns
    )
    return llm + spec.total_tool_time_s


async def probe_rates(base_url: str, api_key: str | None = None, repeats: int = 2) -> EngineRates:
    """Measure the idle server (a few seconds): the fastest of `repeats` runs of each probe.

    Probes: A = 512 prompt tokens, 1 output; B = 16 prompt tokens, 129 outputs; C = 16 prompt
    tokens, 1 output. Prefill rate = 496 / (A - C), decode rate = 128 / (B - C). Each probe is a
    fresh session with fresh ids, so nothing is a prefix hit.
    """
    client = ServerClient(base_url, api_key=api_key, timeout_s=120.0, retry_limit_s=60.0)
    lo, hi = TOKEN_RANGE
    n = 0

    async def call(prompt_len: int, outputs: int) -> float:
        nonlocal n
        n += 1
        # Ids from a counter, distinct per probe: no probe reuses another's prefix.
        prompt = [lo + (n * 7919 + 31 * i) % (hi - lo) for i in range(prompt_len)]
        t0 = time.monotonic()
        await client.complete(f"probe-{n}-{time.time_ns()}", prompt, outputs, last_step=True)
        return time.monotonic() - t0

    try:
        await call(_SHORT, 1)  # warm-up: first-call costs are not a rate
        short = min([await call(_SHORT, 1) for _ in range(repeats)])
        long = min([await call(_LONG, 1) for _ in range(repeats)])
        decode = min([await call(_SHORT, _DECODE + 1) for _ in range(repeats)])
    finally:
        await client.aclose()
    prefill_rate = (_LONG - _SHORT) / max(long - short, 1e-6)
    decode_rate = _DECODE / max(decode - short, 1e-6)
    overhead = max(0.0, short - _SHORT / prefill_rate - 1 / decode_rate)
    return EngineRates(prefill_rate, decode_rate, overhead)


async def tools_api_status(base_url: str, api_key: str | None = None) -> int:
    """HTTP status of a trivial tool run (`true`): 200 when the server's tools API is on; 404
    when the server has no such route (or it is off)."""
    client = ServerClient(base_url, api_key=api_key, timeout_s=60.0, retry_limit_s=30.0)
    sid = f"tools-probe-{time.time_ns()}"
    try:
        body = {"command": "true", "timeout_s": 30, "name": "probe"}
        resp = await client.http.post(f"/v1/sessions/{sid}/tools", json=body)
        await client.end_session(sid)
        return resp.status_code
    finally:
        await client.aclose()
