"""Trace replay through the gateway on vLLM's CPU build: fcfs against mars, side by side, one run.

For each policy, a fresh vLLM server (scripts/setup_vllm.sh's venv, SmolLM2-135M, the plug-in
`--scheduler-cls mars.vllm.scheduler.MarsScheduler` with `MARS_POLICY=<policy>`) and a fresh
gateway in front of it (`mars serve --engine vllm --policy <policy>`). The same seeded trace
sessions are replayed through the gateway (`mars.agents.replay`; tool steps are waited on the
client: the gateway has no tools runtime), after an idle probe that also warms the server up. The
prefix hit rate is vLLM's own (`vllm:prefix_cache_hits_total` / `queries_total`, taken before and
after the replay); KV usage and the gateway's admission queue are sampled every second.

KV is set in blocks (`--num-gpu-blocks-override`), not with VLLM_CPU_KVCACHE_SPACE: that counts
whole GiB, ~46,000 tokens of this model, more than a few scaled sessions ever hold.

Usage: .venv/bin/python scripts/bench_vllm_gateway.py [--sessions 6] [--out out/vllm_gateway.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mars.agents.probe import EngineRates, ideal_time, probe_rates
from mars.agents.replay import ReplayConfig, ReplayOutcome, replay
from mars.bench.liveserver import free_port
from mars.bench.metrics import result_json
from mars.core.errors import UsageError
from mars.sched.registry import check_policy
from mars.sim.experiment import SimSpec, load_specs
from mars.sim.workload import SessionSpec

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "mars"
SAMPLE_S = 1.0  # how often vLLM's and the gateway's /metrics are sampled during a replay
DEAD_S = 30.0  # no /metrics answer for this long during a replay: the run stops
COUNTERS = ("prefix_cache_hits", "prefix_cache_queries", "num_preemptions")
_PLUGIN = re.compile(r"MarsScheduler: policy (\S+) .*?, (\d+ KV blocks of \d+ tokens)")
_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)$")


class BenchError(Exception):
    """Something the user can fix: printed as one line, exit status 1."""


@dataclass(frozen=True)
class Servers:
    vllm: str  # base URLs
    gateway: str
    logs: Path  # their logs' folder


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", type=Path, default=ROOT.parent / "shared/traces/traces.jsonl")
    p.add_argument("--policies", default="fcfs,mars", help="comma-separated (default fcfs,mars)")
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-scale", type=float, default=0.02)
    p.add_argument("--time-scale", type=float, default=0.1)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop (default 3)")
    load.add_argument("--rate", type=float, help="open loop: Poisson sessions/s")
    p.add_argument("--max-model-len", type=int, default=864)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--block-size", type=int, default=32, help="KV block, tokens (CPU: 32 x k)")
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=28,
        help="KV capacity in blocks (default 28: 864 tokens, less than 3 sessions' contexts)",
    )
    p.add_argument(
        "--vllm-args",
        default="",
        help="more vLLM server options for every run, e.g. '--max-num-queued-reqs 2' (its queue "
        "caps: their 503s, which the gateway waits out, are counted as upstream_busy)",
    )
    p.add_argument("--vllm-venv", type=Path, default=CACHE / "vllm-venv")
    p.add_argument("--model", type=Path, default=CACHE / "smollm2-135m-hf")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds per server start")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "vllm_gateway.json")
    args = p.parse_args()
    if args.rate is None and args.concurrency is None:
        args.concurrency = 3
    return args


def main() -> int:
    args = parse_args()
    try:
        return run(args)
    except (BenchError, UsageError) as e:
        print(f"bench_vllm_gateway: error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for name in policies:
        check_policy(name)
    check_inputs(args)
    spec = SimSpec(
        traces=str(args.traces),
        rate=1.0,
        sessions=args.sessions,
        seed=args.seed,
        token_scale=args.token_scale,
        time_scale=args.time_scale,
    )
    specs = load_specs(spec)
    too_long = sum(1 for s in specs if s.max_context > args.max_model_len)
    kv_tokens = args.kv_blocks * args.block_size
    print(
        f"{len(specs)} sessions, {sum(len(s.turns) for s in specs)} calls, largest context "
        f"{max(s.max_context for s in specs)} tokens ({too_long} over --max-model-len "
        f"{args.max_model_len}: rejected); KV {kv_tokens} tokens; "
        + (f"concurrency {args.concurrency}" if args.rate is None else f"rate {args.rate}/s")
    )
    logs = args.out.parent / (args.out.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    rates: EngineRates | None = None
    results = []
    for policy in policies:
        with servers(args, policy, logs) as urls:
            probed = asyncio.run(probe_rates(urls.gateway))  # also the warm-up
            rates = rates or probed  # one ideal time per session for every policy
            print(
                f"{policy}: idle probe: prefill {probed.prefill_tokens_per_s:.0f} tokens/s, "
                f"decode {probed.decode_tokens_per_s:.1f} tokens/s, "
                f"{probed.call_overhead_s * 1e3:.0f} ms per call"
            )
            config = ReplayConfig(
                urls.gateway,
                rate=args.rate,
                concurrency=args.concurrency,
                seed=args.seed,
                tools="client",
                tool_markers=True,
                max_context=args.max_model_len,
                timeout_s=600.0,
            )
            before = {**vllm_counters(urls.vllm), "busy": upstream_busy(urls.gateway)}
            outcome, samples = asyncio.run(replay_sampled(specs, config, urls))
            after = {**vllm_counters(urls.vllm), "busy": upstream_busy(urls.gateway)}
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (*COUNTERS, "busy")}
        result = policy_result(policy, spec, specs, outcome, rates, probed, delta, samples, args)
        result["plugin_events"] = count_events(logs / f"events-{policy}.jsonl")
        results.append(result)
        print(summary_line(result))
    wall = time.monotonic() - t0
    print()
    print(table(results))
    print(f"\nwall {wall:.0f} s (both server starts included); logs in {logs}")
    out = {
        "bench": "vllm_gateway",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "kv_tokens": kv_tokens,
        "ideal_rates": asdict(rates) if rates else None,
        "results": results,
        "ratios": ratios(results),
        "wall_s": wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"results: {args.out}")
    return 0 if all(r["completed"] == r["sessions"] - r["rejected"] for r in results) else 1


def check_inputs(args: argparse.Namespace) -> None:
    python = args.vllm_venv / "bin" / "python"
    if not python.exists():
        raise BenchError(f"no vLLM venv at {args.vllm_venv}: run scripts/setup_vllm.sh")
    if not (args.model / "config.json").exists():
        raise BenchError(
            f"no model at {args.model}: run scripts/test_vllm.sh (or scripts/convert_smollm2.py "
            f"{args.model} with the vLLM venv's python)"
        )
    if not args.traces.is_file():
        raise BenchError(f"trace file {args.traces} not found: pass --traces FILE (JSONL)")
    usable = (args.kv_blocks - 1) * args.block_size  # vLLM keeps one block as its null block
    if usable < args.max_model_len:
        raise BenchError(
            f"--kv-blocks {args.kv_blocks} hold {usable} tokens (one block is vLLM's), less than "
            f"--max-model-len {args.max_model_len}: vLLM refuses to start; raise --kv-blocks"
        )


# ---- servers ------------------------------------------------------------------------------


@contextmanager
def servers(args: argparse.Namespace, policy: str, logs: Path) -> Iterator[Servers]:
    """vLLM with the plug-in, then the gateway in front of it; both stopped on exit."""
    vport, gport = free_port(), free_port()
    vllm_url, gateway_url = f"http://127.0.0.1:{vport}", f"http://127.0.0.1:{gport}"
    vllm_cmd = [
        str(args.vllm_venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(args.model), "--served-model-name", "smollm2",
        "--host", "127.0.0.1", "--port", str(vport), "--enforce-eager",
        "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
        "--block-size", str(args.block_size), "--num-gpu-blocks-override", str(args.kv_blocks),
        "--enable-prompt-tokens-details",
        "--scheduler-cls", "mars.vllm.scheduler.MarsScheduler",
    ]  # fmt: skip
    vllm_cmd += shlex.split(args.vllm_args)
    events = logs / f"events-{policy}.jsonl"
    events.unlink(missing_ok=True)
    vllm_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the blocks actually used: --num-gpu-blocks-override
        "MARS_POLICY": policy,
        "MARS_VLLM_EVENTS": str(events),
    }
    gateway_cmd = [
        sys.executable, "-m", "mars", "serve", "--engine", "vllm", "--upstream", vllm_url,
        "--policy", policy, "--host", "127.0.0.1", "--port", str(gport),
    ]  # fmt: skip
    t = time.monotonic()
    timeout = args.start_timeout
    with process("vLLM", vllm_cmd, vllm_env, logs / f"vllm-{policy}.log", vllm_url, timeout):
        vllm_log = logs / f"vllm-{policy}.log"
        plugin = _PLUGIN.search(vllm_log.read_text(errors="replace"))
        if plugin is None or plugin[1] != policy:
            raise BenchError(f"vLLM runs without MarsScheduler (policy {policy}); see {vllm_log}")
        print(f"{policy}: vLLM up in {time.monotonic() - t:.0f} s, {plugin[2]}")
        gateway_log = logs / f"gateway-{policy}.log"
        with process("the gateway", gateway_cmd, {**os.environ}, gateway_log, gateway_url, timeout):
            yield Servers(vllm_url, gateway_url, logs)


@contextmanager
def process(
    name: str, cmd: list[str], env: dict[str, str], log_path: Path, base: str, timeout_s: float
) -> Iterator[None]:
    """Run `cmd` in its own process group until /health answers 200; kill the group on exit
    (vLLM's engine core is a child process)."""
    with log_path.open("w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_healthy(name, proc, base, log_path, timeout_s)
            yield
        finally:
            stop(proc)


def wait_healthy(
    name: str, proc: subprocess.Popen[bytes], base: str, log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} exited with status {proc.returncode} at start; see {log_path}"
            )
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{name} did not answer /health within {timeout_s:g} s; see {log_path}"
            )
        time.sleep(0.5)


def stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ---- measuring ----------------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {name: value summed over its label sets}."""
    with urllib.request.urlopen(url, timeout=10.0) as resp:
        text = resp.read().decode(errors="replace")
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m is not None:
            with suppress(ValueError):
                values[m[1]] = values.get(m[1], 0.0) + float(m[2])
    return values


def vllm_counters(base: str) -> dict[str, float]:
    values = scrape(f"{base}/metrics")
    return {k: values[f"vllm:{k}_total"] for k in COUNTERS if f"vllm:{k}_total" in values}


def upstream_busy(gateway: str) -> float:
    """The upstream 503s (vLLM's queue caps) the gateway has waited out so far."""
    return scrape(f"{gateway}/metrics").get("mars:gateway_upstream_busy_total", 0.0)


async def replay_sampled(
    specs: list[SessionSpec], config: ReplayConfig, urls: Servers
) -> tuple[ReplayOutcome, list[list[float]]]:
    """The replay, with [t, vLLM KV usage, vLLM waiting, gateway queue] every SAMPLE_S. A vLLM
    that stops answering ends the run: the gateway would answer 503 and the agents retry."""
    samples: list[list[float]] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def sample() -> None:
        last_ok = loop.time()
        while True:
            try:
                v = await asyncio.to_thread(scrape, f"{urls.vllm}/metrics")
                g = await asyncio.to_thread(scrape, f"{urls.gateway}/metrics")
            except (OSError, ValueError):
                if loop.time() - last_ok > DEAD_S:
                    raise BenchError(
                        f"vLLM or the gateway stopped answering /metrics for {DEAD_S:g} s "
                        f"during the replay; see {urls.logs}"
                    ) from None
            else:
                last_ok = loop.time()
                usage = v.get("vllm:kv_cache_usage_perc", 0.0)
                waiting = v.get("vllm:num_requests_waiting", 0.0)
                queued = g.get("mars:gateway_admission_queued_sessions", 0.0)
                samples.append([round(last_ok - t0, 2), usage, waiting, queued])
            await asyncio.sleep(SAMPLE_S)

    replaying, sampling = asyncio.create_task(replay(specs, config)), asyncio.create_task(sample())
    try:
        await asyncio.wait({replaying, sampling}, return_when=asyncio.FIRST_COMPLETED)
        if sampling.done():
            sampling.result()  # raises why it stopped
        return replaying.result(), samples
    finally:
        for task in (replaying, sampling):
            task.cancel()


def count_events(path: Path) -> dict[str, float]:
    """The plug-in's events by kind, plus the tokens pinned and evicted."""
    counts: Counter[str] = Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            with suppress(ValueError):
                e = json.loads(line)
                counts[e["event"]] += 1
                if e["event"] in ("kv_retain", "kv_evict"):
                    counts[e["event"] + "_tokens"] += int(e.get("tokens", 0))
    return dict(sorted(counts.items()))


def policy_result(
    policy: str,
    spec: SimSpec,
    specs: list[SessionSpec],
    outcome: ReplayOutcome,
    rates: EngineRates,
    probed: EngineRates,
    delta: dict[str, float],
    samples: list[list[float]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    recs = outcome.records
    ideal = {s.session_id: ideal_time(s, rates) for s in specs}
    sessions = [r.result(None if r.rejected else ideal[r.session_id]) for r in recs]
    turns = [t for r in recs for t in r.turns]
    kv = {
        "hit_rate": delta["prefix_cache_hits"] / max(1.0, delta["prefix_cache_queries"]),
        "hit_tokens": delta["prefix_cache_hits"],
        "query_tokens": delta["prefix_cache_queries"],
        "preemptions": delta["num_preemptions"],
        "client_cached_tokens": sum(t.cached_tokens for t in turns),
        "client_prompt_tokens": sum(t.prompt_tokens for t in turns),
        "reusable_rate": sum(s.total_reuse_tokens for s in specs)
        / max(1, sum(s.total_prompt_tokens for s in specs)),
        "capacity_tokens": args.kv_blocks * args.block_size,
        "mean_usage": sum(s[1] for s in samples) / len(samples) if samples else 0.0,
        "max_usage": max((s[1] for s in samples), default=0.0),
    }
    workload = {
        **asdict(spec),
        "policy": policy,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "arrival": "poisson" if args.rate is not None else None,
        "gpu": "cpu",
        "model": "smollm2-135m",
        "tools": "client",
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "block_size": args.block_size,
        "kv_blocks": args.kv_blocks,
    }
    failed = [r for r in recs if r.error is not None and not r.rejected]
    return result_json(
        policy=policy,
        executor="vllm-cpu-gateway",
        workload=workload,
        sessions=sessions,
        kv=kv,
        cpu={},
        wall_s=outcome.wall_s,
        extra={
            "failed": len(failed),
            "errors": [f"{r.session_id}: {r.error}" for r in failed[:5]],
            "probe": asdict(probed),
            "retries": sum(t.retries for t in turns),
            "upstream_busy": delta["busy"],  # vLLM's 503s the gateway waited out
            "max_gateway_queued": max((s[3] for s in samples), default=0.0),
            "max_vllm_waiting": max((s[2] for s in samples), default=0.0),
            "samples": samples,  # [t, vLLM KV usage, vLLM waiting, gateway queue]
        },
    )


# ---- reporting ----------------------------------------------------------------------------

ROWS: tuple[tuple[str, str, str], ...] = (
    # label, path in the result, format
    ("mean latency (s)", "latency_s.mean", ".1f"),
    ("p95 latency (s)", "latency_s.p95", ".1f"),
    ("mean slowdown", "slowdown.mean", ".2f"),
    ("throughput (sessions/min)", "throughput.sessions_per_s", "min"),
    ("output tokens/s", "throughput.output_tokens_per_s", ".1f"),
    ("prefix hit rate (vLLM)", "kv.hit_rate", ".1%"),
    ("preemptions (vLLM)", "kv.preemptions", ".0f"),
    ("mean KV usage", "kv.mean_usage", ".0%"),
    ("KV pins (plug-in)", "plugin_events.kv_retain", ".0f"),
    ("max gateway queue", "max_gateway_queued", ".0f"),
    ("vLLM 503s waited out", "upstream_busy", ".0f"),
    ("replay wall (s)", "wall_s", ".0f"),
)


def metric(result: dict[str, Any], path: str) -> float:
    """The number at a dotted path; 0 where it is absent (an event kind that never happened)."""
    value: Any = result
    for key in path.split("."):
        value = value.get(key, 0.0)
    return float(value)


def cell(value: float, fmt: str) -> str:
    return f"{value * 60:.2f}" if fmt == "min" else format(value, fmt)


def table(results: list[dict[str, Any]]) -> str:
    names = [r["policy"] for r in results]
    base = names[0]
    head = ["", *names] + [f"{n}/{base}" for n in names[1:]]
    rows = [["sessions done", *(f"{r['completed']}/{r['sessions']}" for r in results)]]
    rows[0] += [""] * (len(names) - 1)
    for label, path, fmt in ROWS:
        values = [metric(r, path) for r in results]
        row = [label, *(cell(v, fmt) for v in values)]
        row += [f"{v / values[0]:.2f}" if values[0] else "-" for v in values[1:]]
        rows.append(row)
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [head, *rows]
    ]
    return "\n".join(lines)


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each later policy over the first, per row of the table."""
    base = results[0]
    out: dict[str, dict[str, float | None]] = {}
    for r in results[1:]:
        out[f"{r['policy']}/{base['policy']}"] = {
            path: (metric(r, path) / metric(base, path) if metric(base, path) else None)
            for _, path, _ in ROWS
        }
    return out


def summary_line(r: dict[str, Any]) -> str:
    lat, kv = r["latency_s"], r["kv"]
    return (
        f"{r['policy']}: {r['completed']}/{r['sessions']} done ({r['failed']} failed, "
        f"{r['rejected']} rejected), mean latency {lat['mean']:.1f} s, p95 {lat['p95']:.1f} s, "
        f"vLLM prefix hit {kv['hit_rate']:.1%}, {kv['preemptions']:.0f} preemptions, "
        f"replay {r['wall_s']:.0f} s" + (f"; first error: {r['errors'][0]}" if r["errors"] else "")
    )


if __name__ == "__main__":
    sys.exit(main())
