"""OpenHands' hello-world agent (software-agent SDK 1.58.2) against `mars serve`.

The SDK's own examples/01_standalone_sdk/01_hello_world.py, pointed at mars: an Agent with the
terminal and file-editor tools, working in a temporary directory, runs `--conversations`
conversations one after the other on ONE shared `LLM` object, each stopped after
`--max-iterations` agent steps. It prints each step, and per LLM call the prompt tokens and
the tokens the server served from its cache. The SDK needs Python 3.12: run it with the venv
that scripts/setup_openhands.sh makes (docs/agents.md, "OpenHands"):

    ./scripts/setup_openhands.sh
    .venv/bin/mars serve --policy mars --port 8000 --kv-tokens 16384 &
    .venv-openhands/bin/python examples/openhands_hello.py --base-url http://127.0.0.1:8000/v1

Each conversation is one mars session: the SDK sends its conversation id in the
`x-litellm-session-id` header on every call. With SmolLM2-135M, the default model, the agent
does not do the task; the run shows the plumbing (sessions, cache hits, the tool loop).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

# Before the SDK imports LiteLLM: its price list ships with it, so do not fetch it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from openhands.sdk import LLM, Agent, Conversation, Event, Tool
from openhands.sdk.event import ActionEvent, AgentErrorEvent, MessageEvent, ObservationEvent
from openhands.tools.file_editor import FileEditorTool
from openhands.tools.terminal import TerminalTool
from pydantic import SecretStr

TASK = "Write 3 facts about the current project into FACTS.txt."


def show(event: Event) -> None:
    """One line per agent step."""
    if isinstance(event, ActionEvent):
        args = event.action.model_dump_json(exclude_none=True) if event.action else ""
        print(f"  action   {event.tool_name} {args[:160]}")
    elif isinstance(event, ObservationEvent):
        text = " ".join(str(c.text) for c in event.observation.to_llm_content if hasattr(c, "text"))
        print(f"  result   {event.tool_name}: {text[:160]!r}")
    elif isinstance(event, AgentErrorEvent):
        print(f"  error    {event.tool_name}: {event.error[:160]!r}")
    elif isinstance(event, MessageEvent):
        text = " ".join(str(c.text) for c in event.llm_message.content if hasattr(c, "text"))
        print(f"  message  {event.llm_message.role}: {text[:160]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the key of `mars serve --api-key`")
    parser.add_argument("--model", default="openai/mars", help="'openai/' + a served name")
    parser.add_argument("--conversations", type=int, default=2)
    parser.add_argument("--max-iterations", type=int, default=3, help="agent steps a run")
    parser.add_argument("--max-tokens", type=int, default=256, help="reply limit a call")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (mars honours it)")
    parser.add_argument(
        "--tool-choice",
        default="required",
        choices=["required", "auto"],
        help="required: every reply is a tool call (mars enforces it with a grammar), which a"
        " weak model needs to use the tools at all; auto: the SDK's default (sends none)",
    )
    args = parser.parse_args()

    llm = LLM(
        model=args.model,
        base_url=args.base_url,
        api_key=SecretStr(args.api_key),
        max_output_tokens=args.max_tokens,  # else a weak model may write to the context's end
        num_retries=0,  # show a server error at once, rather than retry it for minutes
        timeout=900,  # the SDK's 300 s is near a cold 6K-token prefill on 2 CPU cores
        input_cost_per_token=0.0,  # mars has no price: no "cost calculation failed" warning
        output_cost_per_token=0.0,
        litellm_extra_body={"tool_choice": "required"} if args.tool_choice == "required" else {},
        seed=args.seed,
        usage_id="agent",
    )
    agent = Agent(llm=llm, tools=[Tool(name=TerminalTool.name), Tool(name=FileEditorTool.name)])
    seen = 0
    for n in range(args.conversations):
        with tempfile.TemporaryDirectory(prefix="openhands-hello-") as workspace:
            conversation = Conversation(
                agent=agent,
                workspace=workspace,
                callbacks=[show],
                visualizer=None,
                max_iteration_per_run=args.max_iterations,
            )
            print(f"conversation {n + 1}: id {conversation.id}, workspace {workspace}")
            start = time.perf_counter()
            conversation.send_message(TASK)
            conversation.run()
            took = time.perf_counter() - start
            # The metrics belong to the shared LLM: this conversation's calls are the new ones.
            usages = conversation.conversation_stats.get_combined_metrics().token_usages
            for i, usage in enumerate(usages[seen:], 1):
                print(
                    f"  call {i}: {usage.prompt_tokens} prompt tokens,"
                    f" {usage.cache_read_tokens} cached, {usage.completion_tokens} generated"
                )
            print(
                f"  status {conversation.state.execution_status.value}, {took:.1f} s,"
                f" FACTS.txt {'written' if os.path.exists(f'{workspace}/FACTS.txt') else 'absent'}"
            )
            seen = len(usages)
            conversation.close()


if __name__ == "__main__":
    main()
