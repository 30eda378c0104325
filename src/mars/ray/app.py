"""`mars serve --ray [ADDRESS] --replicas N`: mars as a Ray Serve application.

Three parts (their modules say more):
- `MarsControl` (`control.py`): one named actor, the global control plane (admission, placement);
- `MarsEngine` (`engine.py`): N replicas of the embedded engine, routed by `MarsRequestRouter`
  (`router.py`) on the session of each call;
- `MarsFront` (`front.py`): the HTTP ingress, the OpenAI routes of `mars serve`.

`--ray local` (the default) starts a Ray head in this process with this machine's cores; an
ADDRESS joins a running cluster (its nodes need mars installed, as by `./scripts/setup.sh`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Any

from mars.core.errors import UsageError
from mars.ray.control import NAME, NAMESPACE, ControlConfig, MarsControl
from mars.ray.front import FrontConfig
from mars.sched.settings_args import policy_settings

APP = "mars"
# Flags of `mars serve` that are the Ray app's, not its replicas' (the value after each one too).
_APP_FLAGS = {"--ray": "?", "--replicas": 1, "--replica-cpus": 1, "--host": 1, "--port": 1}
_APP_FLAGS |= {"--api-key": 1}


def replica_args(argv: list[str]) -> list[str]:
    """The `mars serve` flags each replica gets: those given, less the app's own."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        takes = _APP_FLAGS.get(flag)
        if takes is None:
            out.append(argv[i])
        elif "=" not in argv[i]:
            given = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            i += 1 if takes == 1 or (takes == "?" and given) else 0
        i += 1
    return out


def build_app(serve_args: list[str], replicas: int, replica_cpus: float, front: FrontConfig) -> Any:
    """The Serve application (the control actor must exist: `start_control`)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from mars.ray.engine import MarsEngine
    from mars.ray.front import create_front
    from mars.ray.router import MarsRequestRouter

    router: Any = MarsRequestRouter

    engine: Any = serve.deployment(
        MarsEngine,
        name=front.engine,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        # mars serve queues and schedules its own calls: Ray must not hold them back.
        max_ongoing_requests=10_000,
        request_router_config=RequestRouterConfig(request_router_class=router),
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=5,
    )

    def front_app() -> Any:
        return create_front(front)

    ingress: Any = serve.deployment(
        serve.ingress(front_app)(),
        name="MarsFront",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100_000,
    )
    return ingress.bind(engine.bind(serve_args))


def start_control(config: ControlConfig) -> Any:
    """The control actor, named; one left by an earlier run of the app is replaced."""
    import ray

    with contextlib.suppress(ValueError):  # none yet
        ray.kill(ray.get_actor(NAME, namespace=NAMESPACE))
    actor = ray.remote(MarsControl).options(
        name=NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_concurrency=100_000
    )
    return actor.remote(config)


def run_ray(args: argparse.Namespace, serve_argv: list[str]) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UsageError(
            "mars serve --ray needs Ray Serve: ./scripts/setup.sh --dev installs it "
            "(or pip install 'mars-cosched[ray]')"
        ) from None
    if args.replicas < 1:
        raise UsageError(f"--replicas {args.replicas}: give at least 1")
    settings = policy_settings(args)
    control = ControlConfig(
        args.policy, settings, args.max_queued, args.queue_timeout, args.session_idle_timeout
    )
    rargs = replica_args(serve_argv)
    if args.threads is None:
        rargs += ["--threads", str(max(1, int(args.replica_cpus)))]
    key = args.api_key[0] if args.api_key else os.environ.get("MARS_API_KEY")
    front = FrontConfig(APP, api_key=key, keepalive_s=args.sse_keepalive)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.ray == "local":
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, namespace=NAMESPACE)
    else:
        try:
            ray.init(address=args.ray, namespace=NAMESPACE)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UsageError(
                f"--ray {args.ray}: cannot join that Ray cluster ({e}); start one with "
                "`ray start --head`, or give --ray local"
            ) from None
    start_control(control)
    serve.start(http_options={"host": args.host, "port": args.port})
    print(
        f"mars serve --ray: starting {args.replicas} engine replicas "
        f"(mars serve {' '.join(rargs)})",
        flush=True,
    )
    serve.run(build_app(rargs, args.replicas, args.replica_cpus, front), name=APP, route_prefix="/")
    print(
        f"mars serve --ray: http://{args.host}:{args.port} ({args.replicas} replicas, "
        f"policy {args.policy}, router mars.ray.router:MarsRequestRouter)",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("mars serve --ray: shutting down", file=sys.stderr, flush=True)
    if args.ray != "local":  # a local head goes with this process, and the app with it
        serve.delete(APP)
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(NAME, namespace=NAMESPACE))
    ray.shutdown()
    return 0
