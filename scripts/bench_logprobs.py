"""What logprobs cost per decoded token: one in-process live engine decodes 256 tokens (greedy,
ignore_eos) without logprobs, with `logprobs: 0` (the sampled token's only) and with 20
alternatives, interleaved over a few rounds; the ratio is the median time per token against
the median without. Also the log-softmax + top-k alone on a vector of the model's vocabulary.

Usage: .venv/bin/python scripts/bench_logprobs.py [--tokens 256] [--rounds 5] [--threads 1]
       [--out out/bench_logprobs.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np

from mars.engine.live import LiveEngine
from mars.engine.llamacpp import ExecutorConfig
from mars.engine.logprobs import token_logprob
from mars.engine.model import Model, default_model_path
from mars.engine.sampling import SamplingParams

MODES: dict[str, int | None] = {"off": None, "logprobs=0": 0, "top_logprobs=20": 20}


async def decode(
    eng: LiveEngine, sid: str, prompt: list[int], n: int, k: int | None
) -> tuple[float, float]:
    """Seconds per token from the first token to the last (prefill excluded), as the client
    sees them and inside the engine's steps (llama_decode, sampling, logprobs)."""
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=k)
    times: list[float] = []
    inside = 0.0
    async for chunk in eng.generate(sid, prompt, params, next_tool=None):
        if chunk.token_ids:
            times.append(time.perf_counter())
            if len(times) == 1:
                inside = eng.core.execute_s
    assert len(times) == n, (len(times), n)
    return (times[-1] - times[0]) / (n - 1), (eng.core.execute_s - inside) / (n - 1)


async def run(args: argparse.Namespace) -> dict[str, object]:
    model = Model(default_model_path())
    cfg = ExecutorConfig(kv_tokens=4096, max_sequences=4, batch_tokens=512, threads=args.threads)
    eng = LiveEngine(model, cfg)
    eng.start()
    prompt = model.tokenize("Write a long story about a lighthouse keeper and the sea.")
    try:
        await decode(eng, "warmup", prompt, 16, None)
        per_token: dict[str, list[float]] = {m: [] for m in MODES}
        in_step: dict[str, list[float]] = {m: [] for m in MODES}
        order = list(MODES.items())
        for r in range(args.rounds):
            for mode, k in order[r % 3 :] + order[: r % 3]:  # no mode always first
                wall, step = await decode(eng, f"{mode}-{r}", prompt, args.tokens, k)
                per_token[mode].append(wall)
                in_step[mode].append(step)
    finally:
        eng.shutdown()
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(model.n_vocab) * 4).astype(np.float32)
    alone = {}
    for mode, k in MODES.items():
        if k is not None:
            t0 = time.perf_counter()
            for _ in range(1000):
                token_logprob(logits, 5, k)
            alone[mode] = (time.perf_counter() - t0) / 1000
    base = statistics.median(per_token["off"])
    step_base = statistics.median(in_step["off"])
    return {
        "tokens": args.tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "vocab": model.n_vocab,
        "ms_per_token": {m: 1e3 * statistics.median(v) for m, v in per_token.items()},
        "ratio": {m: statistics.median(v) / base for m, v in per_token.items()},
        "step_ms_per_token": {m: 1e3 * statistics.median(v) for m, v in in_step.items()},
        "step_ratio": {m: statistics.median(v) / step_base for m, v in in_step.items()},
        "compute_alone_ms": {m: 1e3 * s for m, s in alone.items()},
        # What the extra work alone adds to a step without logprobs (the other ratios are
        # noisy on a shared machine: a few % either way).
        "compute_ratio": {m: 1 + s / step_base for m, s in alone.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("out/bench_logprobs.json"))
    args = ap.parse_args()
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    ratio, ms, alone = result["ratio"], result["ms_per_token"], result["compute_alone_ms"]
    sratio, sms = result["step_ratio"], result["step_ms_per_token"]
    cratio = result["compute_ratio"]
    assert isinstance(cratio, dict)
    assert isinstance(ratio, dict) and isinstance(ms, dict) and isinstance(alone, dict)
    assert isinstance(sratio, dict) and isinstance(sms, dict)
    print(
        f"logprobs cost per decoded token vs off: x{ratio['logprobs=0']:.3f} (k=0), "
        f"x{ratio['top_logprobs=20']:.3f} (k=20) as the client sees it; in the engine's steps "
        f"x{sratio['logprobs=0']:.3f}, x{sratio['top_logprobs=20']:.3f} "
        f"({result['tokens']} tokens, {args.rounds} rounds, medians); the work alone "
        f"x{cratio['logprobs=0']:.4f}, x{cratio['top_logprobs=20']:.4f}"
    )
    print(f"{'mode':<16} {'ms/token':>9} {'ratio':>7} {'step ms':>8} {'ratio':>7} {'alone ms':>9}")
    for mode in MODES:
        extra = f"{alone[mode]:.3f}" if mode in alone else "-"
        print(
            f"{mode:<16} {ms[mode]:>9.3f} {ratio[mode]:>7.3f} {sms[mode]:>8.3f} "
            f"{sratio[mode]:>7.3f} {extra:>9}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
