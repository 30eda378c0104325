"""Policy parameters on a command line: `--set KEY=VALUE` (repeatable) and `--policy-config FILE`
(a JSON object), shared by `mars sim|capacity|sweep` and `mars serve` (DESIGN.md section 7)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mars.core.errors import UsageError


def add_policy_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        type=_setting,
        default=[],
        metavar="KEY=VALUE",
        help="override a policy parameter (repeatable)",
    )
    p.add_argument(
        "--policy-config",
        metavar="FILE",
        help="JSON object of policy parameters (then --set on top)",
    )


def policy_settings(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The parameters `--policy-config` and then `--set` give, as (key, value) text pairs."""
    out: dict[str, str] = {}
    if args.policy_config:
        try:
            data = json.loads(Path(args.policy_config).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--policy-config {args.policy_config}: {e}") from None
        if not isinstance(data, dict):
            raise UsageError(f"--policy-config {args.policy_config}: expected a JSON object")
        out.update(
            {
                str(k): ",".join(map(str, v)) if isinstance(v, list) else str(v)
                for k, v in data.items()
            }
        )
    out.update(dict(args.settings))
    return tuple(out.items())


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()
