"""Embedded-engine benchmark: `mars serve` against raw llama-cpp-python, side by side, one run.

1. Decode throughput: 8 concurrent streams through `mars serve` (HTTP, streaming, ignore_eos)
   against raw llama-cpp-python batched decode of 8 sequences built the same way (same model,
   context size, threads, batch size and sampler chain: greedy). Ratio = mars / raw.
2. Warm resume: a session with a ~2,000-token context returns after a tool call; time to first
   token of its second turn against a cold prefill of a same-size context in a new session.
   Threads: 1 for both engines. On this 2-core machine the HTTP server and the client need the
   other core; with 2 llama threads both engines would fight them for it.
3. Scheduling overhead: the engine's time in schedule() + update() as a share of step time
   (from /v1/kv_cache_stats).

Usage: .venv/bin/python scripts/bench_engine.py [--out out/bench_engine.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KV_TOKENS = 8192
BATCH = 512
THREADS = 1
STREAMS = 8
DECODE_TOKENS = 128
CONTEXT_WORDS = 690  # about 2,000 tokens with the default model's tokenizer


def raw_batched_decode(threads: int) -> float:
    """Tokens/s of llama-cpp-python's low-level API decoding 8 sequences in one batch."""
    import llama_cpp as L

    from mars.engine.model import Model, default_model_path

    model = Model(default_model_path())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = KV_TOKENS, BATCH, BATCH, 32
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = True
    ctx = L.llama_init_from_model(model.ptr, cp)
    batch = L.llama_batch_init(BATCH, 0, 1)
    samplers = []
    for _ in range(STREAMS):
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        samplers.append(chain)
    prompts = [model.tokenize(_prompt(i, 40)) for i in range(STREAMS)]

    def run(entries: list[tuple[list[int], int, int]]) -> None:
        batch.n_tokens = 0
        for toks, pos0, seq in entries:
            for j, t in enumerate(toks):
                i = batch.n_tokens
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + j, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = j == len(toks) - 1
                batch.n_tokens += 1
        assert L.llama_decode(ctx, batch) == 0

    last = []
    for s, p in enumerate(prompts):
        run([(p, 0, s)])
        last.append(L.llama_sampler_sample(samplers[s], ctx, len(p) - 1))
    pos = [len(p) for p in prompts]
    t0 = time.perf_counter()
    for _ in range(DECODE_TOKENS - 1):
        run([([last[s]], pos[s], s) for s in range(STREAMS)])
        for s in range(STREAMS):
            pos[s] += 1
            last[s] = L.llama_sampler_sample(samplers[s], ctx, s)
    dt = time.perf_counter() - t0
    for chain in samplers:
        L.llama_sampler_free(chain)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    return STREAMS * (DECODE_TOKENS - 1) / dt


def _prompt(i: int, words: int) -> str:
    return f"Story {i}: " + " ".join(f"word{(i * 7 + k) % 97}" for k in range(words))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _stream(client: httpx.AsyncClient, body: dict, headers: dict) -> list[float]:
    """Arrival times (perf_counter) of the content chunks of one streaming chat request."""
    times: list[float] = []
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("choices") and data["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return times


async def _ttft(client: httpx.AsyncClient, body: dict, headers: dict) -> float:
    t0 = time.perf_counter()
    times = await _stream(client, body, headers)
    return times[0] - t0


async def serve_measurements(base: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        def body(i: int, n: int, words: int, history: list[dict] | None = None) -> dict:
            msgs = history or [{"role": "user", "content": _prompt(i, words)}]
            return {
                "model": "default",
                "messages": msgs,
                "max_tokens": n,
                "temperature": 0,
                "ignore_eos": True,
                "min_tokens": n,
                "stream": True,
                "stream_options": {"include_usage": True},
            }

        await _stream(client, body(99, 4, 10), {"X-Session-ID": "warmup"})
        streams = await asyncio.gather(
            *[
                _stream(client, body(i, DECODE_TOKENS, 40), {"X-Session-ID": f"tp{i}"})
                for i in range(STREAMS)
            ]
        )
        # Steady decode: from the moment every stream has its first token (all prefills done,
        # as in the raw loop below) to the last token.
        start = max(t[0] for t in streams)
        end = max(t[-1] for t in streams)
        decode_tps = sum(1 for t in streams for x in t if x > start) / (end - start)
        # Warm resume vs cold prefill of the same size (about 2,000 tokens of context).
        history = [{"role": "user", "content": _prompt(1000, CONTEXT_WORDS)}]
        first = await client.post(
            "/v1/chat/completions",
            headers={"X-Session-ID": "warm"},
            json={**body(0, 16, 0, history), "stream": False},
        )
        context_tokens = first.json()["usage"]["prompt_tokens"]
        first_reply = "word1 " * 16
        history2 = [
            *history,
            {"role": "assistant", "content": first_reply},
            {"role": "user", "content": "tool output: ok"},
        ]
        warm = await _ttft(client, body(0, 4, 0, history2), {"X-Session-ID": "warm"})
        cold_hist = [
            {"role": "user", "content": _prompt(2000, 1000)},
            {"role": "assistant", "content": first_reply},
            {"role": "user", "content": "tool output: ok"},
        ]
        cold = await _ttft(client, body(0, 4, 0, cold_hist), {"X-Session-ID": "cold"})
        stats = (await client.get("/v1/kv_cache_stats")).json()
    return {
        "decode_tokens_per_s": decode_tps,
        "warm_ttft_s": warm,
        "cold_ttft_s": cold,
        "context_tokens": context_tokens,
        "sched_s": stats["sched_s"],
        "step_s": stats["step_s"],
        "steps": stats["steps"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_engine.json"))
    args = ap.parse_args()
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MARS_API_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "mars",
        "serve",
        "--port",
        str(port),
        "--kv-tokens",
        str(KV_TOKENS),
        "--threads",
        str(THREADS),
    ]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise SystemExit("mars serve did not come up")
        serve = asyncio.run(serve_measurements(base))
    finally:
        server.terminate()
        server.wait(timeout=30)
    raw = raw_batched_decode(THREADS)
    res = {
        **serve,
        "raw_decode_tokens_per_s": raw,
        "decode_ratio": serve["decode_tokens_per_s"] / raw,
        "warm_speedup": serve["cold_ttft_s"] / serve["warm_ttft_s"],
        "sched_overhead_share": serve["sched_s"] / serve["step_s"],
        "threads": THREADS,
        "kv_tokens": KV_TOKENS,
        "streams": STREAMS,
    }
    print("| measurement | mars serve | raw llama-cpp-python | ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| decode tokens/s, {STREAMS} streams | {res['decode_tokens_per_s']:.1f} | {raw:.1f} "
        f"| {res['decode_ratio']:.2f} |"
    )
    print(
        f"| time to first token, {res['context_tokens']}-token context, warm resume vs cold "
        f"| {res['warm_ttft_s'] * 1e3:.0f} ms | {res['cold_ttft_s'] * 1e3:.0f} ms (cold prefill) "
        f"| {res['warm_speedup']:.1f}x |"
    )
    print(
        f"| scheduling overhead (schedule+update / step) | {res['sched_overhead_share']:.2%} | | |"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(
        f"decode {res['decode_ratio']:.0%} of raw, warm resume {res['warm_speedup']:.0f}x "
        f"sooner, overhead {res['sched_overhead_share']:.2%}; JSON in {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
