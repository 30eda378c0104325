"""OpenAI function calling on a chat model, with or without tool syntax in its template.

The tools reach the model through the chat template's `tools` variable when the template uses it;
otherwise (the default SmolLM2 template has no tool syntax) they are described in the system
message. With `tool_choice` "required" or naming a function, the output is constrained by a GBNF
grammar built from the tools' JSON schemas, so it is always a valid call; with "auto" a reply that
holds a JSON call (bare, in a code fence, in `<tool_call>` tags or after some text) becomes one.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Protocol

from mars.server.protocol import APIError

# llama.cpp parses a grammar recursively: a bound such as maxLength 30000 nests that deep and
# overflows the stack (the whole server segfaults), and huge bounds blow up the converter's
# output. Bounds past these limits are refused with a 400 instead.
MAX_BOUND = 1000
MAX_PATTERN_PRODUCT = 1_000_000
MAX_GRAMMAR_CHARS = 1 << 20
_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
# A function name as OpenAI takes it (plus "." and ":", which MCP clients send).
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# No token spells a NUL, and no UTF-8 text holds a lone surrogate: a grammar that must emit one
# can never finish.
_UNSPELLABLE = re.compile(r"[\x00\ud800-\udfff]")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class ChatModel(Protocol):
    chat_template: str | None

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> str: ...


def chosen(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[dict[str, Any], str]:
    """(functions offered, mode) with mode "none", "auto", "required" or a function name."""
    if not tools or tool_choice == "none":
        return {}, "none"
    fns = _functions(tools)
    if tool_choice in (None, "auto", "required"):
        return fns, tool_choice or "auto"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
        if isinstance(name, str) and name in fns:
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


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(
                400,
                f"tools[{i}] must be {{'type': 'function', 'function': "
                "{'name': ..., 'parameters': {...}}}",
                param=f"tools[{i}]",
            )
        if not _NAME.fullmatch(fn["name"]):
            raise APIError(
                400,
                f"tools[{i}].function.name {fn['name']!r} must be 1-128 letters, digits, "
                "'_', '-', '.' or ':'",
                param=f"tools[{i}].function.name",
            )
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise APIError(
                400,
                f"tools[{i}].function.parameters must be a JSON schema object",
                param=f"tools[{i}]",
            )
        _check_strings(params, f"tools[{i}].function.parameters")
        desc = fn.get("description")
        desc = desc if isinstance(desc, str) else ""
        out[fn["name"]] = {"description": desc, "parameters": params}
    return out


def render(
    model: ChatModel, messages: list[dict[str, Any]], fns: dict[str, Any]
) -> tuple[str, list[str]]:
    """The prompt text (the template's own tool syntax if it has one, else a system message),
    and the messages' texts in it, which are text even where they spell a special token."""
    native = "tools" in (model.chat_template or "")
    messages = normalize_messages(messages, native)
    tools = None
    if fns and native:
        tools = [{"type": "function", "function": {"name": name, **fn}} for name, fn in fns.items()]
    elif fns:
        note = system_prompt(fns)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{note}"}
        else:
            messages.insert(0, {"role": "system", "content": note})
    try:
        return model.render_chat(messages, tools), [m["content"] for m in messages]
    except Exception as e:  # template errors are the messages' fault (wrong order, roles, ...)
        raise APIError(400, f"the messages cannot be rendered: {e}", param="messages") from None


def system_prompt(fns: dict[str, Any]) -> str:
    lines = [
        "You can call these functions. To call one, reply with only a JSON object "
        '{"name": <function name>, "arguments": <arguments object>}.'
    ]
    for name, fn in fns.items():
        lines.append(f"- {name}: {fn['description']} Parameters: {json.dumps(fn['parameters'])}")
    return "\n".join(lines)


def grammar(fns: dict[str, Any]) -> str:
    """GBNF for exactly one call `{"name": ..., "arguments": {...}}` of one of `fns`."""
    for name, fn in fns.items():
        _check_bounds(fn["parameters"], f"tools {name!r} parameters")
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
    return _gbnf(schema, "the tools' parameter schemas")


def output_grammar(response_format: Any, guided_json: Any) -> str | None:
    """GBNF for OpenAI's `response_format` (json_object, json_schema) or vLLM's `guided_json`;
    None for plain text."""
    from llama_cpp.llama_grammar import JSON_GBNF

    schema = guided_json
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return JSON_GBNF
        spec = response_format.get("json_schema") if kind == "json_schema" else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(
                400,
                "response_format must be {'type': 'text'}, {'type': 'json_object'} or "
                "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}",
                param="response_format",
            )
    if schema is None:
        return None
    if isinstance(schema, str):
        schema = _loads(schema)
    if not isinstance(schema, dict):
        raise APIError(400, "guided_json must be a JSON schema object", param="guided_json")
    _check_strings(schema, "the output's schema")
    _check_bounds(schema, "the output's schema")
    return _gbnf(schema, "the output's schema", "response_format")


def _gbnf(schema: dict[str, Any], what: str, param: str = "tools") -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = str(json_schema_to_gbnf(json.dumps(schema)))
    except (Exception, RecursionError) as e:  # the converter raises plain Exceptions
        raise APIError(400, f"{what} cannot be enforced: {e}", param=param) from None
    if len(gbnf) > MAX_GRAMMAR_CHARS or _nesting(gbnf) > MAX_BOUND:
        raise APIError(
            400,
            f"{what} is too large to enforce with a grammar; simplify it",
            param=param,
        )
    return gbnf


def _check_strings(schema: Any, where: str) -> None:
    """Refuse a NUL or a lone surrogate anywhere in a schema, in a key or a value."""
    stack = [(schema, where)]
    while stack:
        node, path = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            at = f"{path}[{key!r}]" if isinstance(key, str) else f"{path}[{key}]"
            for text in (key, value):
                if isinstance(text, str) and _UNSPELLABLE.search(text):
                    raise APIError(
                        400,
                        f"{at} holds a NUL or a lone surrogate ({text[:40]!r}), which no "
                        "output can contain; remove it",
                        param="tools",
                    )
            if isinstance(value, dict | list):
                stack.append((value, at))


def _check_bounds(schema: Any, where: str) -> None:
    """Refuse schema bounds the grammar converter and llama.cpp cannot take (see MAX_BOUND)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in _BOUNDS and isinstance(value, int) and value > MAX_BOUND:
                raise APIError(
                    400,
                    f"{where}: {key} {value} is over {MAX_BOUND}, the most a forced tool call "
                    "can enforce; lower it, drop it, or use tool_choice 'auto'",
                    param="tools",
                )
            if key == "pattern" and isinstance(value, str):
                product = 1
                for low, high in _QUANTIFIER.findall(value):
                    product *= max(int(low), int(high or 0), 1)
                if product > MAX_PATTERN_PRODUCT:
                    raise APIError(
                        400, f"{where}: pattern {value[:80]!r} repeats too much", param="tools"
                    )
            elif isinstance(value, dict | list):
                stack.append(value)


def _nesting(gbnf: str) -> int:
    """Deepest parenthesis nesting of a GBNF text (outside literals, classes and comments)."""
    depth = deepest = i = 0
    while i < len(gbnf):
        c = gbnf[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            i += 1
            while i < len(gbnf) and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "#":
            while i < len(gbnf) and gbnf[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


def parse(text: str, fns: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(content, tool_calls) of the model's reply; tool_calls None if it holds no call."""
    body = text.strip()
    tagged = _TAGGED.findall(body)
    if tagged:
        found = [c for raw in tagged for c in _calls(_loads(raw), fns) or []]
        rest = _TAGGED.sub("", body).strip()
        return (rest or None, found) if found else (text, None)
    fenced = _FENCE.match(body)
    whole = _calls(_loads(fenced.group(1) if fenced else body), fns)
    if whole:
        return None, whole
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", body):  # a call after (or before) some prose
        try:
            data, end = decoder.raw_decode(body, match.start())
        except json.JSONDecodeError:
            continue
        calls = _calls(data, fns)
        if calls:
            rest = (body[: match.start()] + body[end:]).strip()
            return rest or None, calls
    return text, None


# Where a reply may begin a call in "auto" mode: a JSON object, a code fence, a <tool_call> tag.
_OPENERS = ("{", "```", "<tool_call>")
# The head of a forced call, as its grammar writes it: the name, then the arguments object.
_FORCED_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class CallStream:
    """A reply streamed as OpenAI streams one: content deltas as the text comes, and tool-call
    deltas (the call's index, id, type and name first, then pieces of its arguments).

    A forced call (`tool_choice` "required" or a name: its grammar makes the reply exactly
    `{"name": ..., "arguments": {...}}`) streams its arguments as they are generated. In "auto"
    mode prose streams until something that may open a call (`{`, a code fence, `<tool_call>`);
    from there the text is held and parsed once the reply is complete, as `parse` does.
    """

    def __init__(self, fns: dict[str, Any], forced: bool, parallel: bool = True) -> None:
        self.fns, self.forced, self.parallel = fns, forced, parallel
        self.text = ""
        self._sent = 0  # characters of `text` sent as content (auto) or arguments (forced)
        self._held: int | None = None  # auto: where a possible call begins
        self._args: int | None = None  # forced: where the arguments begin
        self._pos = 0  # forced: how far the arguments were scanned
        self._depth, self._in_string, self._escaped, self._closed = 0, False, False, False
        self._id = "call_" + uuid.uuid4().hex[:24]
        self.calls: list[dict[str, Any]] | None = None  # the calls, once finished

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The deltas `piece` (more of the reply) lets out now."""
        self.text += piece
        return self._forced_deltas() if self.forced else self._auto_deltas()

    def finish(self) -> list[dict[str, Any]]:
        """The deltas left once the reply is complete; `calls` is then set (None: no call)."""
        if self.forced and self._args is not None:
            name = _FORCED_HEAD.match(self.text)
            assert name is not None
            end = self._scan()  # all of it was sent: feed() sends up to the scan's end
            self.calls = [
                _call(self._id, json.loads(f'"{name.group(1)}"'), self.text[self._args : end])
            ]
            return []
        start = self._sent if self._held is None else self._held
        content, calls = parse(self.text[start:], self.fns)
        if calls and not self.parallel:
            calls = calls[:1]
        self.calls = calls
        out: list[dict[str, Any]] = []
        if content:
            text = self.text[start:] if not calls else content
            out.append({"content": text})
        for i, c in enumerate(calls or []):
            out.append({"tool_calls": [{"index": i, **c}]})
        return out

    def _auto_deltas(self) -> list[dict[str, Any]]:
        if self._held is not None:
            return []
        text, i = self.text, self._sent
        stop = len(text)
        while i < len(text):
            rest = text[i : i + len(_OPENERS[-1])]
            opens = [o for o in _OPENERS if rest.startswith(o)]
            maybe = [o for o in _OPENERS if o.startswith(rest) and len(rest) < len(o)]
            if opens:
                self._held = stop = i
                break
            if maybe and i + len(rest) == len(text):  # not decided until more text comes
                stop = i
                break
            i += 1
        piece, self._sent = text[self._sent : stop], stop
        return [{"content": piece}] if piece else []

    def _forced_deltas(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._args is None:
            head = _FORCED_HEAD.match(self.text)
            if head is None or head.end() == len(self.text):  # the arguments have not begun:
                return out  # more whitespace may come before them
            self._args = self._sent = self._pos = head.end()
            name = json.loads(f'"{head.group(1)}"')
            out.append(self._call_delta({"name": name, "arguments": ""}, head=True))
        end = self._scan()
        if end > self._sent:
            out.append(self._call_delta({"arguments": self.text[self._sent : end]}))
            self._sent = end
        return out

    def _scan(self) -> int:
        """Where the arguments object read so far ends: its closing brace, found by depth
        outside strings, or the end of the text while it is still open."""
        text, i = self.text, self._pos
        while i < len(text) and not self._closed:
            ch = text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                self._closed = self._depth == 0
            i += 1
        self._pos = i
        return i

    def _call_delta(self, function: dict[str, Any], head: bool = False) -> dict[str, Any]:
        call: dict[str, Any] = {"index": 0}
        if head:
            call |= {"id": self._id, "type": "function"}
        return {"tool_calls": [{**call, "function": function}]}


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _loads(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


def _calls(data: Any, fns: dict[str, Any]) -> list[dict[str, Any]] | None:
    out = []
    for item in data if isinstance(data, list) else [data]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        if item["name"] not in fns:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = _loads(args)
        if not isinstance(args, dict):
            return None
        out.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": item["name"], "arguments": json.dumps(args)},
            }
        )
    return out or None


def normalize_messages(messages: list[dict[str, Any]], native: bool) -> list[dict[str, Any]]:
    """Messages the template can render: text content; without native tool syntax, tool
    results and earlier calls become text."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer", "function"):
            raise APIError(
                400,
                f"messages[{i}].role {role!r} is not one of system, user, assistant, tool",
                param=f"messages[{i}].role",
            )
        content = _text(m.get("content"), i)
        calls = _past_calls(m.get("tool_calls"), i) if role == "assistant" else []
        if role == "developer":
            role = "system"
        if native:
            msg: dict[str, Any] = {"role": "tool" if role == "function" else role}
            msg["content"] = content
            if calls:
                msg["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": c["function"]} for c in calls
                ]
            for key in ("name", "tool_call_id"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
            out.append(msg)
            continue
        if calls:  # in the shape the system prompt asks the model for
            shown = [c["function"] for c in calls]
            content += json.dumps(shown[0] if len(shown) == 1 else shown)
        if role in ("tool", "function"):
            name = m.get("name") if isinstance(m.get("name"), str) else "the tool"
            role, content = "user", f"Result of {name}: {content}"
        out.append({"role": role, "content": content})
    return out


def _text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)  # type: ignore[arg-type]
    raise APIError(
        400,
        f"messages[{i}].content must be a string or a list of text parts",
        param=f"messages[{i}].content",
    )


def _past_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, with arguments parsed back into objects."""
    if calls is None:
        return []
    bad = APIError(
        400,
        f"messages[{i}].tool_calls must be a list of "
        "{'id', 'type': 'function', 'function': {'name', 'arguments'}}",
        param=f"messages[{i}].tool_calls",
    )
    if not isinstance(calls, list):
        raise bad
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad
        args = fn.get("arguments")
        parsed = _loads(args) if isinstance(args, str) else args
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{i}_{j}"
        args = (args or {}) if parsed is None else parsed
        out.append({"id": call_id, "function": {"name": fn["name"], "arguments": args}})
    return out
