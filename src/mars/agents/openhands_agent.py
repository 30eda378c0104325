"""One OpenHands agent on one task: run by the OpenHands venv's Python, never imported by mars.

`mars.agents.openhands_run` starts this file with `.venv-openhands/bin/python` (the SDK needs
Python 3.12; mars's .venv is 3.11), writes the task as one JSON object on stdin, and reads one
JSON object back from the last line of stdout. It imports only the standard library and the SDK.

The agent is the SDK's hello world (examples/01_standalone_sdk/01_hello_world.py): an `Agent`
with the terminal and file-editor tools in a local workspace (the task's repo, copied there by
the caller), one `Conversation`, stopped after `max_iterations` agent steps. The conversation's
id is the mars session: the SDK sends it in `x-litellm-session-id` on every call, and never ends
the session (as in real use). Times are `time.monotonic()`, which the caller shares.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

# Before the SDK imports LiteLLM: its price list ships with it, so do not fetch it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from openhands.sdk import LLM, Agent, Conversation, Tool
    from openhands.sdk.event import ActionEvent, AgentErrorEvent, ObservationEvent
    from openhands.sdk.event.conversation_error import ConversationErrorEvent
    from openhands.tools.file_editor import FileEditorTool
    from openhands.tools.terminal import TerminalTool
    from pydantic import SecretStr

    llm = LLM(
        model=spec["model"],
        base_url=spec["base_url"],
        api_key=SecretStr(spec.get("api_key") or "none"),
        max_output_tokens=spec["max_tokens"],
        temperature=spec["temperature"],
        seed=spec["seed"],
        num_retries=1,
        timeout=spec["timeout_s"],
        input_cost_per_token=0.0,  # mars has no price: no "cost calculation failed" warning
        output_cost_per_token=0.0,
        # Every reply a tool call (mars enforces it with a grammar): a weak model needs it.
        litellm_extra_body={"tool_choice": "required"},
        usage_id="agent",
    )
    agent = Agent(llm=llm, tools=[Tool(name=TerminalTool.name), Tool(name=FileEditorTool.name)])
    result: dict[str, Any] = {"steps": 0, "tool_runs": 0, "tool_s": 0.0, "errors": 0}
    action_at: dict[str, float] = {}

    def on_event(event: Any) -> None:
        now = time.monotonic()
        if isinstance(event, ActionEvent):
            result["steps"] += 1
            action_at[event.tool_call_id] = now
            args = event.action.model_dump_json(exclude_none=True) if event.action else ""
            result.setdefault("commands", []).append(f"{event.tool_name} {args}"[:200])
        elif isinstance(event, ObservationEvent | AgentErrorEvent):
            started = action_at.pop(event.tool_call_id, None)
            if isinstance(event, ObservationEvent):
                result["tool_runs"] += 1
            else:
                result["errors"] += 1
            if started is not None:
                result["tool_s"] += now - started
        elif isinstance(event, ConversationErrorEvent):
            result["error_code"] = event.code  # MaxIterationsReached: the step limit

    conversation = Conversation(
        agent=agent,
        workspace=spec["workspace"],
        callbacks=[on_event],
        visualizer=None,
        max_iteration_per_run=spec["max_iterations"],
    )
    result["conversation_id"] = str(conversation.id)
    print(f"conversation {conversation.id} in {spec['workspace']}", file=sys.stderr, flush=True)
    result["start"] = time.monotonic()
    try:
        conversation.send_message(spec["statement"])
        conversation.run()
        status = conversation.state.execution_status.value
        result["status"] = result.get("error_code", status) if status == "error" else status
    except Exception as e:  # the model call failed past its retries, or the server went
        result["status"] = type(e).__name__
        result["error"] = f"{type(e).__name__}: {e}"[:300]
    result["end"] = time.monotonic()
    metrics = conversation.conversation_stats.get_combined_metrics()
    result["llm_calls"] = len(metrics.token_usages)
    result["llm_s"] = sum(r.latency for r in metrics.response_latencies)
    result["prompt_tokens"] = sum(u.prompt_tokens for u in metrics.token_usages)
    result["cached_tokens"] = sum(u.cache_read_tokens for u in metrics.token_usages)
    result["completion_tokens"] = sum(u.completion_tokens for u in metrics.token_usages)
    conversation.close()
    return result


def main() -> None:
    spec = json.load(sys.stdin)
    print(json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main()
