"""`mars serve`: the command that starts the OpenAI-compatible server on the embedded engine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from types import FrameType
from typing import TypeVar

from mars.core.errors import UsageError
from mars.gateway.cli import add_gateway_args, run_gateway_cli
from mars.sched.registry import make_policy
from mars.sched.settings_args import add_policy_settings, policy_settings
from mars.server.tenants import KEYS_FILE_FORMAT, Keys, load_keys
from mars.server.tools_cli import add_tool_args, start_tools, tool_config, tool_options_given
from mars.sim.costmodel_cli import non_negative_int, positive_float, positive_int
from mars.tools.cpus import parse_cpu_list

P = TypeVar("P", bound=argparse.ArgumentParser)


def add_serve_parser(sub: argparse._SubParsersAction[P]) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server on the embedded llama.cpp engine",
        description=(
            "Serve /v1/chat/completions, /v1/completions, /v1/models, /metrics, "
            "/v1/kv_cache_stats and /health on the embedded llama.cpp engine, scheduled by mars. "
            "A request without max_tokens may generate up to the rest of its context window "
            "(--kv-tokens, at most the model's trained context), as vLLM does; a request "
            "without seed samples with a fresh random one."
        ),
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (another needs --api-key)"
    )
    p.add_argument("--port", type=positive_int, default=8000, help="port to listen on")
    p.add_argument("--policy", default="fcfs", help="scheduling policy (see `mars policies`)")
    add_policy_settings(p)
    keys = p.add_argument_group(
        "API keys and tenants",
        "Without a key the server is single-tenant (any client may act in any session): listen "
        "on 127.0.0.1 only. With keys, each key is a tenant: every route but /health needs "
        "'Authorization: Bearer KEY', a session belongs to the key that first named it, and "
        "other keys get 404 on it and do not see it in /v1/events. An admin key sees and may "
        "act on every session.",
    )
    keys.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this key, a tenant of its own (repeatable; or set MARS_API_KEY to one key)",
    )
    keys.add_argument(
        "--admin-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this key as an admin: it sees and may act on every session (repeatable)",
    )
    keys.add_argument(
        "--api-keys-file",
        type=Path,
        metavar="FILE",
        help=f"read keys from FILE: {KEYS_FILE_FORMAT}",
    )
    p.add_argument("--model", help="GGUF model file (default: SmolLM2-135M-Instruct, bundled)")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=[],
        metavar="NAME",
        help="the model's names in the API, as vLLM's option (default: the file's name; "
        "'default' and 'mars' are always accepted)",
    )
    p.add_argument("--kv-tokens", type=positive_int, default=16384, help="KV cache size, tokens")
    p.add_argument(
        "--max-sessions",
        type=positive_int,
        default=32,
        help="sessions whose KV may stay in the engine at once (sequence slots)",
    )
    p.add_argument(
        "--batch-tokens",
        type=positive_int,
        default=512,
        help="most tokens per engine step (prefill chunk budget)",
    )
    p.add_argument(
        "--host-kv-tokens",
        type=non_negative_int,
        default=65536,
        help="host-memory budget for offloaded KV, tokens (0: no offloading)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help=(
            "llama.cpp threads (default: one per --engine-cpus CPU; without it, one per CPU "
            "but one: llama.cpp's threads spin at every step, and holding every core while a "
            "client, a tool or another process ran made steps take ~9 s on 2 cores)"
        ),
    )
    p.add_argument(
        "--engine-cpus",
        metavar="LIST",
        help="pin the engine to these CPUs, e.g. 0 or 0-3 (tools go on --tool-cpus)",
    )
    p.add_argument(
        "--max-queued",
        type=non_negative_int,
        default=256,
        help="sessions that may wait for admission at once; more are refused with 429",
    )
    p.add_argument(
        "--queue-timeout",
        type=positive_float,
        default=300.0,
        help="seconds a session may wait for admission before it is refused with 503",
    )
    p.add_argument(
        "--sse-keepalive",
        type=positive_float,
        default=10.0,
        help="seconds between SSE keep-alive comments while a stream waits",
    )
    p.add_argument(
        "--cost-model",
        metavar="FILE",
        help="step-time model for policies (a `mars calibrate` preset); default: learned online",
    )
    p.add_argument("--events", type=Path, help="append every event as a JSON line to FILE")
    p.add_argument(
        "--record-trace",
        type=Path,
        help="append each ended session to FILE in the trace format (replayable in `mars sim`)",
    )
    p.add_argument(
        "--session-idle-timeout",
        type=positive_float,
        default=900.0,
        help="end a session after this many seconds without a request",
    )
    add_tool_args(p)  # --tool-workers, --tool-cpus, --unsafe-tools, ...: mars.server.tools_cli
    add_gateway_args(p)  # --engine vllm|openai --upstream URL: the gateway (mars.gateway)
    ray = p.add_argument_group(
        "Ray Serve",
        "Serve on a Ray cluster (mars.ray): --replicas engine replicas, each a mars serve with "
        "the other options given here, behind mars's request router and one global control "
        "plane (admission across all replicas).",
    )
    ray.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run on Ray: 'local' (the default value) starts a head with this machine's cores; "
        "an address (ray://..., HOST:PORT, auto) joins a cluster whose nodes have mars",
    )
    ray.add_argument(
        "--replicas", type=positive_int, default=2, help="engine replicas (with --ray)"
    )
    ray.add_argument(
        "--replica-cpus",
        type=positive_float,
        default=1.0,
        metavar="N",
        help="Ray CPUs each engine replica reserves (with --ray; default --threads: as many)",
    )


def run_serve(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """`argv`: the command line after `serve` (the replicas of --ray get its options)."""
    if args.ray:
        if args.engine != "llamacpp" or args.upstream:
            raise UsageError("--ray runs the embedded engine: leave out --engine/--upstream")
        from mars.ray.app import run_ray

        return run_ray(args, argv if argv is not None else sys.argv[2:])
    if args.engine != "llamacpp" or args.upstream:
        return run_gateway_cli(args)
    keys = server_keys(args)  # before the model loads: a bad keys file is one clear error, now
    settings = dict(policy_settings(args))
    # Before --engine-cpus narrows this process's CPUs: --tool-cpus is checked against all.
    tools_config = tool_config(args)  # None: the tools API is off
    if args.engine_cpus:
        # Set before any thread starts: llama.cpp's and uvicorn's threads inherit it.
        os.sched_setaffinity(0, parse_cpu_list(args.engine_cpus))
    cpus = len(os.sched_getaffinity(0))
    threads = args.threads or (cpus if args.engine_cpus else max(1, cpus - 1))
    make_policy(args.policy, settings)  # a bad name or parameter: one clear error, now
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import uvicorn

        from mars.control.admission import AdmissionLimits
        from mars.engine.live import LiveEngine
        from mars.engine.llamacpp import ExecutorConfig
        from mars.engine.model import Model, default_model_path
        from mars.server.app import ServerConfig, create_app
        from mars.server.eventstream import EventStream
        from mars.server.recorder import TraceRecorder
        from mars.sim.fitted import FittedCostModel
    except ImportError as e:
        raise UsageError(f"{e.name} is not installed: run ./scripts/setup.sh") from None
    try:
        path = Path(args.model) if args.model else default_model_path()
        if not path.is_file():
            raise UsageError(f"--model {path}: no such file (give a GGUF model file)")
        config = ExecutorConfig(args.kv_tokens, args.max_sessions, args.batch_tokens, threads)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None

    try:
        events = EventStream(args.events)
        recorder = TraceRecorder(args.record_trace, path.name) if args.record_trace else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    limits = AdmissionLimits(args.max_queued, args.queue_timeout)
    timer = FittedCostModel.from_file(args.cost_model) if args.cost_model else None
    # Load the model here, not in the app's startup, so a bad file or size is one clear error.
    try:
        engine = LiveEngine(
            Model(path),
            config,
            args.policy,
            args.host_kv_tokens,
            limits=limits,
            settings=settings,
            tool_workers=tools_config.worker_count() if tools_config else None,
            timer=timer,
        )
    except (ValueError, RuntimeError, OSError) as e:
        raise UsageError(f"{e} (check --model and --kv-tokens)") from None
    tools = None
    if not args.no_tools:
        required = tool_options_given(args)
        tools = start_tools(tools_config, engine.clock, engine.tool_event, required=required)
    server = ServerConfig(
        keys,
        args.session_idle_timeout,
        args.sse_keepalive,
        events,
        recorder,
        tools=tools,
        model_names=tuple(args.served_model_name),
    )
    app = create_app(lambda: engine, server)
    access = logging.getLogger("mars.server.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("mars serve: %(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    if keys is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"mars serve: WARNING: listening on {args.host} without --api-key: anyone who "
            "reaches this address can run tools in, and read, every session's workspace. "
            "Without a key the server is single-tenant: listen on 127.0.0.1, or set --api-key.",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"mars serve: {path.name} on http://{args.host}:{args.port} (policy {args.policy}, "
        f"{args.kv_tokens} KV tokens{_describe(keys)})",
        flush=True,
    )
    # In-flight streams get 4 s to finish on Ctrl-C / SIGTERM, then end with a "shutdown" error
    # event (and are aborted in the engine); uvicorn cancels what is left after 5 s, so the
    # engine shuts down instead of serving a long stream to the end.
    uv = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=5,
            # Not uvloop where it is installed (Ray Serve brings it): its subprocesses take no
            # user=/group=, which the tools runtime drops privileges with.
            loop="asyncio",
        )
    )
    exit_ = uv.handle_exit

    def handle_exit(sig: int, frame: FrameType | None) -> None:  # the loop's thread runs it
        exit_(sig, frame)
        with contextlib.suppress(RuntimeError):  # no loop yet: nothing is in flight
            asyncio.get_running_loop().call_soon_threadsafe(server.stopping.set)

    uv.handle_exit = handle_exit  # type: ignore[method-assign]
    uv.run()
    return 0


def server_keys(args: argparse.Namespace) -> Keys | None:
    """The keys of --api-key (else MARS_API_KEY), --admin-key and --api-keys-file."""
    env = os.environ.get("MARS_API_KEY")
    given = args.api_key or ([env] if env else [])
    return load_keys(given, args.admin_key, args.api_keys_file)


def _describe(keys: Keys | None) -> str:
    if keys is None:
        return ""
    if len(keys) == 1:
        return ", API key required"
    admins = f", {keys.admins} admin" if keys.admins else ""
    return f", {len(keys)} API keys: one tenant each{admins}"
