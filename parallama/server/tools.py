"""Tool calling: the prompt that shows a model its tools, the grammar its calls must follow, and the
parser that turns its output back into OpenAI ``tool_calls``.

One call format for every model, Hermes's (Qwen, Hermes and many fine-tunes are trained on it):

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

A template that takes ``tools`` (the Hermes / Qwen family) renders them itself; for any other template
the tools are described in the system message in that format. Calls are constrained: with
``tool_choice`` "required" or a named tool the output is a call from its first token; with "auto" the
model writes freely until it opens ``<tool_call>``, and from there the call is constrained (a lazy
grammar), so the arguments always validate against the tool's schema.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from parallama.server.errors import InvalidRequest
from parallama.server.schemas import ChatCompletionRequest, ChatMessage, FunctionTool

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 4  # a bound, so a model that repeats itself still ends its turn

GENERIC_PROMPT = """You can call these tools:
{tools}

To call a tool, answer with only this, one line per call:
<tool_call>{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}</tool_call>
Otherwise answer normally."""


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's tools mean for its prompt and its decoding."""

    tools: tuple[FunctionTool, ...]
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None
    parallel: bool = True

    @property
    def constrained_from_start(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def callable(self) -> tuple[FunctionTool, ...]:
        return tuple(t for t in self.tools if self.named is None or t.function.name == self.named)


def plan_tools(body: ChatCompletionRequest) -> ToolPlan | None:
    """Validate tools, tool_choice and the conversation's tool messages; None when no tools are in play."""
    tools, choice = body.tools or [], body.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise InvalidRequest("tool_choice needs tools", "tool_choice")
    _check_tool_results(body.messages)
    if not tools:
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique", "tools")
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, dict) or hasattr(choice, "function"):
        name = choice["function"]["name"] if isinstance(choice, dict) else choice.function.name
        if name not in names:
            raise InvalidRequest(f"tool_choice names '{name}', which is not among the tools", "tool_choice")
        return ToolPlan(tuple(tools), "named", name, parallel=False)
    return ToolPlan(tuple(tools), choice or "auto", parallel=parallel)


def _check_tool_results(messages: list[ChatMessage]) -> None:
    seen: set[str] = set()
    for i, message in enumerate(messages):
        for call in message.tool_calls or []:
            seen.add(call.id)
        if message.role == "tool" and message.tool_call_id not in seen:
            raise InvalidRequest(f"messages[{i}].tool_call_id '{message.tool_call_id}' answers no earlier tool call",
                                 f"messages.{i}.tool_call_id")


# --- the prompt ---------------------------------------------------------------------------------
def template_messages(messages: list[ChatMessage], plan: ToolPlan | None, native: bool) -> list[dict[str, Any]]:
    """Messages for the chat template. ``native``: the template renders tools and calls itself."""
    out = [_message(m, native) for m in messages]
    if plan is not None and not native:
        described = "\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in plan.tools)
        tools_text = GENERIC_PROMPT.format(tools=described)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + tools_text}
        else:
            out.insert(0, {"role": "system", "content": tools_text})
    return out


def _message(m: ChatMessage, native: bool) -> dict[str, Any]:
    if native:
        rendered: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            rendered["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        if m.tool_call_id:
            rendered["tool_call_id"] = m.tool_call_id
        return rendered
    if m.role == "tool":  # any template takes a user turn; Hermes wraps results like this
        return {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
    content = m.text()
    for call in m.tool_calls or []:
        call_json = json.dumps({"name": call.function.name, "arguments": _arguments(call.function.arguments)})
        content += ("\n" if content else "") + OPEN + call_json + CLOSE
    return {"role": m.role, "content": content}


def _arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (json.JSONDecodeError, TypeError):
        return arguments


# --- the grammar --------------------------------------------------------------------------------
def call_grammar(plan: ToolPlan, after_open: bool = False) -> str:
    """Lark for the calls: each a ``<tool_call>`` holding one tool's name and schema-valid arguments.
    ``after_open``: the grammar starts just after the model itself wrote ``<tool_call>`` (auto)."""
    # Compact JSON: a small model given free whitespace tends to pad its arguments with newlines.
    schema = {"x-guidance": {"whitespace_flexible": False}, "anyOf": [_call_schema(t) for t in plan.callable]}
    call_body = f"%json {json.dumps(schema)} {json.dumps(CLOSE)}"
    more = f'("\\n" {json.dumps(OPEN)} body){{0,{MAX_PARALLEL_CALLS - 1}}}' if plan.parallel else ""
    first = "body" if after_open else f"{json.dumps(OPEN)} body"
    return f"start: {first} {more}\nbody: {call_body}\n"


def _call_schema(tool: FunctionTool) -> dict[str, Any]:
    parameters = closed(tool.function.parameters or {"type": "object", "properties": {}})
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its properties and
    says nothing about others (OpenAI's strict mode requires it): otherwise a small model pads the
    arguments with keys nobody asked for."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) if key != "properties" else {k: closed(v) for k, v in value.items()}
           for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


# --- the output ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content before the first call or None, the calls). Text that is not a complete call stays text."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls, rest = [], text[start:]
    while rest.startswith(OPEN) and CLOSE in rest:
        body, _, rest = rest[len(OPEN):].partition(CLOSE)
        call = _call(body)
        if call is None:
            return text, []
        calls.append(call)
        rest = rest.lstrip("\n")
    if not calls or rest.strip():
        return text, []
    content = text[:start].strip()
    return content or None, calls


def _call(body: str) -> ToolCall | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", data["name"], json.dumps(data.get("arguments", {})))


class CallStream:
    """Streams text until a call opens, then yields each call once it is complete."""

    def __init__(self) -> None:
        self.buffer = ""
        self.in_calls = False
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """(content to stream now, calls completed by this delta)."""
        self.buffer += delta
        if not self.in_calls:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = _partial_open(self.buffer)  # it may be the start of "<tool_call>"
                text, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return text, []
            text, self.buffer, self.in_calls = self.buffer[:start], self.buffer[start:], True
            return text + "", self._complete_calls()
        return "", self._complete_calls()

    def _complete_calls(self) -> list[ToolCall]:
        done = []
        while True:
            self.buffer = self.buffer.lstrip("\n")
            if not (self.buffer.startswith(OPEN) and CLOSE in self.buffer):
                return done
            body, _, self.buffer = self.buffer[len(OPEN):].partition(CLOSE)
            call = _call(body)
            if call is not None:
                done.append(call)
                self.calls.append(call)

    def finish(self) -> str:
        """What is left that was not a call: text to send as content."""
        rest, self.buffer = self.buffer, ""
        return rest


def _partial_open(text: str) -> int:
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0
