"""OpenAI function calling on a plain chat model.

The tools are described to the model in a system message (the default model's chat template has
no tool syntax). With `tool_choice` "required" or naming a function, the output is constrained by
a GBNF grammar built from the tools' JSON schemas, so it is always a valid call; with "auto" a
reply that is a JSON call (bare, in a code fence or in `<tool_call>` tags) becomes one.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from mars.server.protocol import APIError

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(
                400,
                f"tools[{i}] must be {{'type': 'function', 'function': "
                "{'name': ..., 'parameters': {...}}}",
                param=f"tools[{i}]",
            )
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise APIError(
                400,
                f"tools[{i}].function.parameters must be a JSON schema object",
                param=f"tools[{i}]",
            )
        out[fn["name"]] = {"description": fn.get("description", ""), "parameters": params}
    return out


def chosen(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[dict[str, Any], str]:
    """(functions offered, mode) with mode "none", "auto", "required" or a function name."""
    if not tools or tool_choice == "none":
        return {}, "none"
    fns = _functions(tools)
    if tool_choice in (None, "auto"):
        return fns, "auto"
    if tool_choice == "required":
        return fns, "required"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name in fns:
            return {name: fns[name]}, name
        raise APIError(
            400,
            f"tool_choice names {name!r}, which is not in tools ({', '.join(fns)})",
            param="tool_choice",
        )
    raise APIError(
        400,
        "tool_choice must be 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


def system_prompt(fns: dict[str, Any]) -> str:
    lines = [
        "You can call these functions. To call one, reply with only a JSON object "
        '{"name": <function name>, "arguments": <arguments object>}.'
    ]
    for name, fn in fns.items():
        lines.append(f"- {name}: {fn['description']} Parameters: {json.dumps(fn['parameters'])}")
    return "\n".join(lines)


def grammar(fns: dict[str, Any]) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = {
        "oneOf": [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": fn["parameters"]},
                "required": ["name", "arguments"],
            }
            for name, fn in fns.items()
        ]
    }
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as e:  # the converter raises plain Exceptions on unsupported schemas
        raise APIError(
            400, f"the tools' parameter schemas cannot be enforced: {e}", param="tools"
        ) from None


def parse(text: str, fns: dict[str, Any]) -> list[dict[str, Any]] | None:
    """OpenAI `tool_calls` from the model's reply, or None if it is not a call."""
    body = text.strip()
    tagged = _TAGGED.findall(body)
    fenced = _FENCE.match(body)
    candidates = tagged or [fenced.group(1) if fenced else body]
    calls = []
    for raw in candidates:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            return None
        for item in data if isinstance(data, list) else [data]:
            if not (isinstance(item, dict) and item.get("name") in fns):
                return None
            args = item.get("arguments", {})
            calls.append(
                {
                    "id": "call_" + uuid.uuid4().hex[:24],
                    "type": "function",
                    "function": {
                        "name": item["name"],
                        "arguments": args if isinstance(args, str) else json.dumps(args),
                    },
                }
            )
    return calls or None


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages a plain template can render: text content, tool results and calls as text."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer", "function"):
            raise APIError(
                400,
                f"messages[{i}].role {role!r} is not one of system, user, assistant, tool",
                param=f"messages[{i}].role",
            )
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        elif content is not None and not isinstance(content, str):
            raise APIError(
                400,
                f"messages[{i}].content must be a string or a list of parts",
                param=f"messages[{i}].content",
            )
        if role == "assistant" and m.get("tool_calls"):
            calls = [
                {
                    "name": c.get("function", {}).get("name"),
                    "arguments": c.get("function", {}).get("arguments"),
                }
                for c in m["tool_calls"]
            ]
            content = (content or "") + json.dumps(calls)
        if role in ("tool", "function"):
            role, content = "user", f"Result of {m.get('name') or 'the tool'}: {content or ''}"
        out.append({"role": "system" if role == "developer" else role, "content": content or ""})
    return out
