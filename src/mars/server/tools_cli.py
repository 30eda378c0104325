"""`mars serve`'s tool options (`--tool-workers`, `--tool-cpus`, `--unsafe-tools`, ...) and the
runtime they build: checked before the model loads, started once the engine exists."""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mars.core.clock import Clock
from mars.core.errors import UsageError
from mars.core.events import Event
from mars.sim.costmodel_cli import positive_int
from mars.tools.cpus import parse_cpu_list
from mars.tools.runtime import ToolConfig, ToolRuntime
from mars.tools.sandbox import INSTALL_HINT, Limits


def add_tool_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tools API (POST /v1/sessions/{id}/tools)")
    g.add_argument(
        "--tool-workers",
        type=positive_int,
        help="tools that run at once; more wait (default: one per --tool-cpus CPU, else per CPU)",
    )
    g.add_argument("--tool-cpus", metavar="LIST", help="pin tools to these CPUs, e.g. 1 or 1-3,5")
    g.add_argument(
        "--tool-memory-mb",
        type=positive_int,
        default=Limits().memory_bytes >> 20,
        help="memory of each tool run, MiB: its processes' resident memory together (and each "
        "one's address space); a run past it is killed",
    )
    g.add_argument(
        "--tool-disk-mb",
        type=positive_int,
        default=Limits().disk_bytes >> 20,
        help="disk quota of each session's workspace, MiB: a run past it is killed, and a "
        "workspace over it takes only `rm` runs until files are deleted",
    )
    g.add_argument(
        "--workspace-root",
        type=Path,
        metavar="DIR",
        help="where session workspaces live (default: a temporary directory, removed at exit, "
        "or by the next mars serve if this one is killed)",
    )
    g.add_argument(
        "--seed-root",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="workspaces may be seeded from paths under DIR (repeatable; default: no seeding)",
    )
    g.add_argument(
        "--no-tools",
        action="store_true",
        help="turn the tools API off (its routes answer 501)",
    )
    g.add_argument(
        "--unsafe-tools",
        action="store_true",
        help="run tools as plain processes, without bubblewrap (no isolation beyond the uid)",
    )


def tool_config(args: argparse.Namespace) -> ToolConfig | None:
    """The tool settings, or None when tools are off (--no-tools, or no bubblewrap and no
    --unsafe-tools)."""
    if args.no_tools:
        if tool_options_given(args):
            raise UsageError("--no-tools turns the tools API off: drop the other tool options")
        return None
    cpus = tuple(parse_cpu_list(args.tool_cpus)) if args.tool_cpus else None
    root: Path | None = args.workspace_root
    if root is not None and root.exists() and not root.is_dir():
        raise UsageError(f"--workspace-root {root}: not a directory")
    if root is not None and not os.access(root if root.exists() else root.parent, os.W_OK):
        raise UsageError(f"--workspace-root {root}: not writable (give a directory you can write)")
    if not args.unsafe_tools and shutil.which("bwrap") is None:
        if tool_options_given(args):
            raise UsageError(f"the tool options need bubblewrap: {INSTALL_HINT}")
        return None
    for seed_root in args.seed_root:
        if not seed_root.is_dir():
            raise UsageError(f"--seed-root {seed_root}: not a directory")
    limits = Limits(memory_bytes=args.tool_memory_mb << 20, disk_bytes=args.tool_disk_mb << 20)
    seeds = tuple(args.seed_root)
    return ToolConfig(args.tool_workers, cpus, limits, args.unsafe_tools, root, seed_roots=seeds)


def tool_options_given(args: argparse.Namespace) -> bool:
    """Whether any option asks for tools (then tools that cannot start are an error)."""
    given = (args.tool_workers, args.tool_cpus, args.workspace_root)
    return any(v is not None for v in given) or bool(args.seed_root) or args.unsafe_tools


def start_tools(
    config: ToolConfig | None,
    clock: Clock,
    publish: Callable[[Event], None],
    required: bool = True,
) -> ToolRuntime | None:
    """The runtime, after one sandbox started for real (so a host without user namespaces fails
    now, with the fix, not on the first tool call). Where no option asked for tools
    (`required` False), a sandbox that cannot start turns the tools API off with one line."""
    if config is None:
        print(f"mars serve: the tools API is off: {INSTALL_HINT}", flush=True)
        return None
    try:
        tools = ToolRuntime(config, clock, publish)
    except OSError as e:
        raise UsageError(f"--workspace-root: {e}") from None
    try:
        tools.check()
    except UsageError as e:
        tools.workspaces.close()
        if required:
            raise
        print(f"mars serve: the tools API is off (--no-tools hides this): {e}", flush=True)
        return None
    return tools
