"""Where a sweep's simulations run: here, one after another (the default), in local worker
processes (`--workers N`), or as Ray tasks on a cluster (`--ray ADDRESS|local`).

A pool is a `concurrent.futures.Executor`; `run_all` hands it calls of module-level functions
with picklable arguments and returns their results in the calls' order, so a sweep's results do
not depend on where or when each run ran. Ray is imported only when asked for.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

from mars.core.errors import UsageError

T = TypeVar("T")
RAY_PIN = "ray==2.60.0"


def machine_cores() -> int:
    """The cores this process may run on (a container's cpuset, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_all(
    calls: Sequence[partial[T]],
    pool: Executor | None = None,
    on_done: Callable[[int, T], None] | None = None,
) -> list[T]:
    """Each call's result, in the calls' order; `on_done(index, result)` runs here, in this
    thread, as each one finishes. Without a pool the calls run one after another in this process
    and the first error stops them, as plain calls do."""
    results: dict[int, T] = {}
    if pool is None:
        for i, call in enumerate(calls):
            results[i] = call()
            if on_done is not None:
                on_done(i, results[i])
    else:
        index = {
            pool.submit(call.func, *call.args, **call.keywords): i for i, call in enumerate(calls)
        }
        for future in as_completed(index):
            i = index[future]
            results[i] = future.result()
            if on_done is not None:
                on_done(i, results[i])
    return [results[i] for i in range(len(calls))]


@contextmanager
def open_pool(workers: int | None = None, ray: str | None = None) -> Iterator[Executor | None]:
    """The pool `--workers N` / `--ray ADDRESS|local` ask for, shut down on the way out (the
    calls not yet started are cancelled); None for one process."""
    if ray is None and (workers or 1) == 1:
        yield None
        return
    pool: Executor
    if ray is not None:
        pool = RayExecutor(ray, workers)
    else:
        # Not fork: the parent may hold threads (a progress bar's, Ray's) that a fork would copy.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


class RayExecutor(Executor):
    """Calls as Ray tasks of one CPU each. `local` starts a Ray head on this machine (`cpus`, or
    its cores) and stops it at shutdown; any other address (`auto`: RAY_ADDRESS or a `ray start`
    on this machine) joins that cluster, whose nodes must see the same files at the same paths
    (the trace file, --out) and have mars installed. A task's error is raised as itself, not
    wrapped in Ray's (whose text carries the worker's traceback)."""

    def __init__(self, address: str, cpus: int | None = None) -> None:
        if address != "local" and cpus is not None:
            raise UsageError(
                f"--workers sets the CPUs of the Ray head that --ray local starts; on the cluster "
                f"at {address} its CPUs set how many runs go at once: drop --workers"
            )
        try:
            import ray
        except ImportError:
            raise UsageError(f"--ray needs Ray: pip install '{RAY_PIN}'") from None
        if address not in ("local", "auto"):
            _check_reachable(address)
        quiet: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
        try:
            if address == "local":
                ray.init(num_cpus=cpus or machine_cores(), include_dashboard=False, **quiet)
            else:
                ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"--ray {address}: cannot join a Ray cluster ({first}); start one with "
                "`ray start --head`, or give --ray local"
            ) from None
        self._ray = ray
        self._remote: dict[Callable[..., Any], Any] = {}
        # Arguments shared by many calls (a seed's workload) go to the object store once.
        self._shared: dict[int, tuple[object, Any]] = {}
        self._running: set[Any] = set()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(fn)
        ref = remote.remote(*(self._put(a) for a in args), **kwargs)
        self._running.add(ref)
        done: Future[T] = Future()

        def settle(inner: Future[T]) -> None:
            self._running.discard(ref)
            error = inner.exception()
            if error is None:
                done.set_result(inner.result())
            else:
                cause = getattr(error, "cause", None)
                done.set_exception(cause if isinstance(cause, BaseException) else error)

        ref.future().add_done_callback(settle)
        return done

    def _put(self, arg: object) -> object:
        if not isinstance(arg, (list, dict, tuple)):
            return arg
        kept = self._shared.get(id(arg))
        if kept is None:  # the object is kept too, so its id is not reused while this lives
            kept = self._shared[id(arg)] = (arg, self._ray.put(arg))
        return kept[1]

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            for ref in list(self._running):
                self._ray.cancel(ref)
        self._shared.clear()
        self._ray.shutdown()


def _check_reachable(address: str) -> None:
    """Ray retries an address that does not answer for minutes, logging each try: a closed
    port fails here at once instead."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(
            f"--ray {address}: give HOST:PORT (a head's GCS port, e.g. 10.0.0.5:6379), "
            "ray://HOST:PORT (Ray Client), auto, or local"
        )
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UsageError(
            f"--ray {address}: nothing answers there ({e.strerror or e}); start a head with "
            "`ray start --head`, or give --ray local"
        ) from None
