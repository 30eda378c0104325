"""`mars serve --engine vllm|openai --upstream URL ...`: the options that put the MARS control
plane in front of upstream servers instead of the embedded engine, and their checks."""

from __future__ import annotations

import argparse
import os
from urllib.parse import urlsplit

from mars.core.errors import UsageError
from mars.sched.registry import make_policy
from mars.sched.settings_args import policy_settings
from mars.server.tenants import load_keys
from mars.sim.costmodel_cli import positive_float

ENGINES = ("llamacpp", "vllm", "openai")


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="llamacpp",
        help="llamacpp: the embedded engine; vllm or openai: a gateway in front of --upstream "
        "servers (vllm reads vLLM's metrics; openai any OpenAI-compatible server's)",
    )
    p.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="URL",
        help="an upstream server, e.g. http://gpu1:8000 (repeatable; with --engine vllm|openai)",
    )
    p.add_argument(
        "--upstream-api-key",
        metavar="KEY",
        help="send 'Authorization: Bearer KEY' to the upstreams (or set MARS_UPSTREAM_API_KEY)",
    )
    p.add_argument(
        "--upstream-timeout",
        type=positive_float,
        metavar="SECONDS",
        default=600.0,
        help="seconds an upstream may send nothing before the request fails with 504",
    )
    p.add_argument(
        "--upstream-connect-timeout",
        type=positive_float,
        metavar="SECONDS",
        default=3.0,
        help="seconds to connect to an upstream (and to probe it) before it counts as failed",
    )


def check_upstreams(engine: str, urls: list[str]) -> tuple[str, ...]:
    """The upstream URLs, or a one-line UsageError saying what to fix."""
    if engine == "llamacpp":
        if urls:
            raise UsageError("--upstream needs --engine vllm or --engine openai")
        return ()
    if not urls:
        raise UsageError(f"--engine {engine} needs at least one --upstream URL")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                f"--upstream {url!r}: expected an http(s) URL such as http://127.0.0.1:8000"
            )
        if parts.path.rstrip("/") or parts.query:
            raise UsageError(
                f"--upstream {url!r}: give the server's base URL without a path "
                f"(e.g. {parts.scheme}://{parts.netloc}), not /v1/..."
            )
    if len(set(u.rstrip("/") for u in urls)) < len(urls):
        raise UsageError("--upstream: the same URL is given twice")
    return tuple(u.rstrip("/") for u in urls)


def _one_key(args: argparse.Namespace) -> str | None:
    """The gateway's one API key (--api-key, else MARS_API_KEY): it has no tenants."""
    keys = args.api_key or [k for k in (os.environ.get("MARS_API_KEY"),) if k]
    if len(keys) > 1 or args.admin_key or args.api_keys_file:
        raise UsageError(
            "the gateway (--engine vllm|openai) takes one --api-key: tenants (several keys, "
            "--admin-key, --api-keys-file) need the embedded engine (--engine llamacpp)"
        )
    if keys:
        load_keys(keys)  # the same checks as the embedded server's: not empty, ASCII
    return keys[0] if keys else None


def run_gateway_cli(args: argparse.Namespace) -> int:
    urls = check_upstreams(args.engine, args.upstream)
    if args.record_trace:
        raise UsageError("--record-trace needs the embedded engine (--engine llamacpp)")
    settings = policy_settings(args)
    make_policy(args.policy, dict(settings))  # a bad name or parameter: one clear error, now
    try:
        from mars.control.admission import AdmissionLimits
        from mars.gateway.app import GatewayConfig, run_gateway
        from mars.server.eventstream import EventStream
    except ImportError as e:
        raise UsageError(f"{e.name} is not installed: run ./scripts/setup.sh") from None
    try:
        events = EventStream(args.events)
    except ValueError as e:
        raise UsageError(str(e)) from None
    api_key = _one_key(args)
    config = GatewayConfig(
        upstreams=urls,
        flavor="vllm" if args.engine == "vllm" else "openai",
        policy=args.policy,
        settings=settings,
        limits=AdmissionLimits(args.max_queued, args.queue_timeout),
        api_key=api_key,
        upstream_api_key=args.upstream_api_key or os.environ.get("MARS_UPSTREAM_API_KEY"),
        upstream_timeout_s=args.upstream_timeout,
        connect_timeout_s=args.upstream_connect_timeout,
        idle_timeout_s=args.session_idle_timeout,
        keepalive_s=args.sse_keepalive,
        events=events,
    )
    print(
        f"mars serve: gateway on http://{args.host}:{args.port} in front of "
        f"{', '.join(urls)} (policy {args.policy}{', API key required' if api_key else ''})",
        flush=True,
    )
    run_gateway(config, args.host, args.port)
    return 0
