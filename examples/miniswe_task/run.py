"""mini-swe-agent against `mars serve` on a tiny repo with a one-line bug, printing each step.

    mars serve --tool-workers 1 &                  # see README.md beside this file
    python examples/miniswe_task/run.py --base-url http://127.0.0.1:8000

The repo beside this file (`repo/`) is copied into the session's workspace on the server, then
mini-swe-agent's default agent loop runs for a few steps with `mars.agents.miniswe`: every turn
goes to mars with the session id, every command runs in the session's sandboxed workspace, and the
session ends after the run. The default model, SmolLM2-135M, is far too small to fix the bug:
this shows the plumbing, not an agent that solves the task.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from mars.agents.miniswe import (
    DefaultAgent,
    MarsEnvironment,
    MarsModel,
    MarsTarget,
    bundled_config,
    new_session_id,
)

REPO = Path(__file__).resolve().parent / "repo"
TASK = (
    "`python3 -m unittest` fails in the current directory: test_calc.py shows that mean() in "
    "calc.py is wrong. Fix calc.py (one line) so that the tests pass."
)
CHECK = "python3 -m unittest 2>&1 | tail -1"


def _clip(text: str, lines: int = 8) -> str:
    kept = text.strip().splitlines()
    more = f"\n... ({len(kept) - lines} more lines)" if len(kept) > lines else ""
    return textwrap.indent("\n".join(kept[:lines]) + more, "    ")


class PrintingAgent(DefaultAgent):
    """DefaultAgent that prints every message as the loop adds it."""

    def add_messages(self, *messages: dict[str, Any]) -> list[dict[str, Any]]:
        for m in messages:
            print(describe(m, self.n_calls), flush=True)
        added: list[dict[str, Any]] = super().add_messages(*messages)
        return added


def describe(message: dict[str, Any], step: int) -> str:
    role, extra = message.get("role"), message.get("extra") or {}
    content = str(message.get("content") or "")
    if role == "system":
        return f"[system] {len(content)} characters of instructions"
    if role == "assistant":
        commands = [a["command"] for a in extra.get("actions", [])]
        said = f"\n{_clip(content, 3)}" if content.strip() else ""
        return f"[step {step}] model{said}\n" + "\n".join(f"  $ {c}" for c in commands)
    if role == "tool":
        took = f", {extra['run_s']:.2f} s in the sandbox" if "run_s" in extra else ""
        return f"  -> exit {extra.get('returncode')}{took}\n{_clip(str(extra.get('raw_output')))}"
    if role == "exit":
        return f"[end] {extra.get('exit_status')}"
    return f"[{role}]\n{_clip(content, 4)}"  # the task, or a format error sent back


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="mars serve, without /v1")
    p.add_argument("--steps", type=int, default=4, help="model calls before the agent stops")
    p.add_argument("--session-id", default=None, help="default: a fresh miniswe-... id")
    p.add_argument("--api-key", default=None, help="mars serve --api-key (or MARS_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per model reply")
    p.add_argument("--timeout", type=int, default=30, help="seconds per command")
    args = p.parse_args(argv)

    target = MarsTarget(
        base_url=args.base_url,
        session_id=args.session_id or new_session_id(),
        api_key=args.api_key,
    )
    config = bundled_config("mini")
    model_config = config["model"]
    model_config["model_kwargs"] = model_config.get("model_kwargs", {}) | {
        "max_tokens": args.max_tokens
    }
    env = MarsEnvironment(target, **config["environment"] | {"timeout": args.timeout})
    model = MarsModel(target, **model_config)
    agent = PrintingAgent(model, env, **config["agent"] | {"step_limit": args.steps})

    print(f"session {target.session_id} on {target.base_url}; seeding its workspace from {REPO}")
    env.seed(REPO)
    try:
        result = agent.run(TASK)
        check = env.execute({"command": CHECK})
    finally:
        env.end_session()
    print(
        f"\nsession {target.session_id}: {agent.n_calls} model calls, exit status "
        f"{result.get('exit_status')!r}; tests after the run: {check['output'].strip()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
