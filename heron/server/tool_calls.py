"""Tool calling for /v1/chat/completions: OpenAI tools in, prompt and constraints out, calls back.

In: a ChatCompletionRequest's `tools` / `tool_choice` / `parallel_tool_calls`, or the legacy
`functions` / `function_call` (mapped onto the same plan). Out:
- `ToolPlan`: which tools, which mode (none / auto / required / named), which parser;
- the conversation for the chat template: a template that knows tools gets them as `tools=`; one
  that does not (like SmolLM2's) gets a system instruction listing the tools and the `<tool_call>`
  format, and its history's tool calls and results written out as text in that same format;
- for `required` and a named tool, a JSON Schema the output is constrained to (vLLM's approach:
  a named tool's output is its arguments object, `required` gives a list of `{"name", "arguments"}`),
  so arguments always parse and validate whatever the model;
- `ToolCallExtractor`: one per choice, turns generated text (in any pieces) into content and
  complete tool calls with OpenAI ids. A call is only reported once its JSON is complete, so a
  stream never carries a call that max_tokens cut short.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from heron.parsers import ParsedDelta, ToolCall, get_tool_parser
from heron.sampling_params import StructuredOutputsParams
from heron.server.errors import bad_request
from heron.server.protocol import (
    ChatCompletionAllowedToolChoiceParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest,
    NamedFunction,
)
from heron.structured.limits import SCHEMA_MAPS

# An omitted `parameters` means the function takes no arguments (OpenAI's documented meaning).
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI tool objects: {"type": "function", "function": {...}}
    mode: str  # "auto" | "required" | "named"
    named: str | None
    parallel: bool
    legacy: bool  # the request used `functions`: answer with `function_call`
    parser: str  # heron.parsers name for "auto"
    param: str = "tools"  # the request field errors about these tools name

    @classmethod
    def auto(cls, tools: list[dict[str, Any]], parser: str) -> ToolPlan:
        """The plan of a request that offers `tools` and lets the model choose (tool_choice "auto")."""
        return cls(tools, "auto", None, True, False, parser)

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]

    def parameters(self, name: str) -> dict[str, Any]:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or _NO_PARAMETERS
        raise KeyError(name)


def random_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def plan_tools(request: ChatCompletionRequest, parser: str) -> ToolPlan | None:
    """The request's tool plan; None when no tool may be called (no tools, or choice 'none')."""
    if request.tools and request.functions:
        raise bad_request("Use either 'tools' or the deprecated 'functions', not both.", param="functions")
    if request.functions:
        tools = [
            {"type": "function", "function": f.model_dump(exclude_none=True)} for f in request.functions
        ]
        choice = request.function_call or "auto"
        if choice == "none":
            return None
        named = choice.name if isinstance(choice, NamedFunction) else None
        plan = ToolPlan(tools, "named" if named else "auto", named, False, True, parser, param="functions")
    elif request.tools:
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
        choice = request.tool_choice or "auto"
        if choice == "none":
            return None
        parallel = request.parallel_tool_calls is not False
        if isinstance(choice, ChatCompletionNamedToolChoiceParam):
            plan = ToolPlan(tools, "named", choice.function.name, parallel, False, parser)
        elif isinstance(choice, ChatCompletionAllowedToolChoiceParam):
            allowed = {t.get("function", {}).get("name") for t in choice.allowed_tools.tools if isinstance(t, dict)}
            missing = sorted(str(n) for n in allowed - {t["function"]["name"] for t in tools})
            if missing:
                raise bad_request(
                    f"tool_choice.allowed_tools names tools that are not in 'tools': {', '.join(missing)}.",
                    param="tool_choice",
                )
            tools = [t for t in tools if t["function"]["name"] in allowed]
            plan = ToolPlan(tools, choice.allowed_tools.mode, None, parallel, False, parser)
        else:
            plan = ToolPlan(tools, choice, None, parallel, False, parser)
    else:
        return None
    _check_schemas(plan)
    return plan


def _check_schemas(plan: ToolPlan) -> None:
    for i, tool in enumerate(plan.tools):
        function = tool["function"]
        schema = function.get("parameters")
        if schema is None:
            continue
        declared = schema.get("type", "object")
        if declared != "object":
            raise bad_request(
                f"Invalid schema for function '{function['name']}': schema must be a JSON Schema of "
                f"'type: \"object\"', got 'type: {json.dumps(declared)}'.",
                param=f"{plan.param}[{i}].function.parameters" if plan.param == "tools" else f"functions[{i}].parameters",
                code="invalid_function_parameters",
            )


def tool_schemas_to_check(plan: ToolPlan) -> list[tuple[str, StructuredOutputsParams]]:
    """(param, spec) for every tool schema, so the server can compile them and 400 a broken one."""
    specs = []
    for i, tool in enumerate(plan.tools):
        function = tool["function"]
        if function.get("parameters") is None:
            continue
        param = f"tools[{i}].function.parameters" if plan.param == "tools" else f"functions[{i}].parameters"
        specs.append((param, StructuredOutputsParams(json=function["parameters"], strict=bool(function.get("strict")))))
    return specs


# Where JSON Schema keeps subschemas: a keyword whose value is one schema, a map of them or a list
# of them. Values under other keywords (const, enum, default, examples) are data, never walked.
_ONE_SCHEMA = (
    "items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
    "additionalProperties", "unevaluatedItems", "unevaluatedProperties",
)
_SCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
# An object that takes keys from elsewhere too: closing it would refuse keys it means to allow.
_COMPOSES = ("allOf", "anyOf", "oneOf", "$ref", "if", "patternProperties", "unevaluatedProperties", "dependentSchemas")


def _subschemas(root: dict[str, Any]):
    """(schema, may_close) for `root` and every subschema in it, iteratively (no recursion limit).

    A member of allOf, or of anyOf/oneOf beside the parent's own properties, is one part of an
    object whose keys the parts name together: it may not be closed on its own.
    """
    stack: list[tuple[Any, bool]] = [(root, True)]
    while stack:
        node, may_close = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node, may_close
        for key in _ONE_SCHEMA:
            if isinstance(node.get(key), dict):
                stack.append((node[key], True))
        for key in SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend((child, True) for child in node[key].values())
        for key in _SCHEMA_LIST:
            if isinstance(node.get(key), list):
                whole = key in ("prefixItems", "items") or (key != "allOf" and "properties" not in node)
                stack.extend((child, whole) for child in node[key])


def _closed(schema: dict[str, Any], ref_root: str | None = None) -> dict[str, Any]:
    """A copy of an arguments schema whose objects have no room for keys they do not name, unless
    they ask for it; with `ref_root`, its local `$ref`s rewritten to point below that pointer.

    JSON Schema lets an object carry any extra key by default; a small model given that freedom
    invents keys (and can go on inventing them until max_tokens), at any depth. OpenAI's strict
    mode closes objects the same way. An object that composes its keys (allOf, $ref, ...) stays
    as it is.
    """
    copied = json.loads(json.dumps(schema))  # a deep copy of plain JSON, in C rather than copy.deepcopy's Python
    for node, may_close in _subschemas(copied):
        if (
            may_close
            and node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not any(key in node for key in _COMPOSES)
        ):
            node["additionalProperties"] = False
        ref = node.get("$ref")
        if ref_root is not None and isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            node["$ref"] = "#" + ref_root + ref[1:]
    return copied


def tool_constraint(plan: ToolPlan) -> StructuredOutputsParams | None:
    """The grammar that enforces a `required` or named choice; None for `auto`."""
    strict = any(tool["function"].get("strict") for tool in plan.tools)
    if plan.mode == "named":
        return StructuredOutputsParams(json=_closed(plan.parameters(plan.named)), strict=strict)
    if plan.mode != "required":
        return None
    # Each tool's parameters go under the wrapper's $defs, their `#/...` refs rewritten to match:
    # nested in place, a tool's `#/$defs/X` (every pydantic model with a nested model or an Enum)
    # would resolve against the wrapper's root and fail.
    defs = {f"tool_{i}": _closed(plan.parameters(name), f"/$defs/tool_{i}") for i, name in enumerate(plan.names)}
    one_call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/tool_{i}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for i, name in enumerate(plan.names)
        ]
    }
    schema: dict[str, Any] = {"$defs": defs, "type": "array", "items": one_call, "minItems": 1}
    if not plan.parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema, strict=strict)


# ----------------------------------------------------------------------------------- prompt


def _example_value(schema: Any) -> Any:
    """A plain value of the schema's type, for the format example (no nesting beyond one level)."""
    if not isinstance(schema, dict):
        return "example"
    for key in ("const", "default"):
        if key in schema:
            return schema[key]
    for key in ("enum", "examples"):
        if isinstance(schema.get(key), list) and schema[key]:
            return schema[key][0]
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    return {"integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}, "null": None}.get(kind, "example")


def _example_call(tool: dict[str, Any]) -> dict[str, Any]:
    """A concrete call of `tool`: a placeholder like "<function name>" the bundled model copied
    verbatim, so the example names the real function and fills its required parameters."""
    function = tool["function"]
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") if isinstance(parameters.get("properties"), dict) else {}
    listed = parameters.get("required") if isinstance(parameters.get("required"), list) else []
    required = [name for name in listed if isinstance(name, str) and name in properties]
    names = required or list(properties)[:1]
    return {"name": function["name"], "arguments": {name: _example_value(properties[name]) for name in names}}


def _instruction(plan: ToolPlan) -> str:
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in plan.tools)
    return (
        "You can call functions to help answer the user. The functions, with their parameters as JSON Schema:\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To call functions, reply with nothing but the calls as a JSON list in tags, like this:\n"
        f"<tool_call>{json.dumps([_example_call(plan.tools[0])], ensure_ascii=False)}</tool_call>\n"
        "Each result comes back in a message that starts with 'Function result:'. If no function is needed, "
        "answer normally."
    )


def _history_call_text(calls: list[dict[str, Any]]) -> str:
    listed = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else (arguments or {})
        except json.JSONDecodeError:
            pass  # keep the client's text as it was
        listed.append({"name": function.get("name"), "arguments": arguments})
    return "<tool_call>" + json.dumps(listed, ensure_ascii=False) + "</tool_call>"


def legacy_messages(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Legacy `function_call` / `role: function` history in today's `tool_calls` / `tool` shape."""
    out = []
    pending_id: dict[str, str] = {}
    for message in conversation:
        message = dict(message)
        if message.get("role") == "assistant" and message.get("function_call"):
            call_id = f"call_{len(out)}"
            function = message.pop("function_call")
            pending_id[function.get("name")] = call_id
            message["tool_calls"] = [*message.get("tool_calls", []), {"id": call_id, "type": "function", "function": function}]
        elif message.get("role") == "function":
            name = message.get("name")
            message = {
                "role": "tool",
                "name": name,
                "tool_call_id": pending_id.get(name, f"call_{name}"),
                "content": message.get("content") or "",
            }
        out.append(message)
    return out


def conversation_for_template(
    conversation: list[dict[str, Any]], plan: ToolPlan | None, template_supports_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools=) for the chat template."""
    conversation = legacy_messages(conversation)
    if template_supports_tools:
        return conversation, plan.tools if plan is not None else None
    # The template cannot show tool calls or results: write them as text in the injected format.
    out = []
    for message in conversation:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            text = message.get("content") or ""
            text = text if isinstance(text, str) else "".join(p.get("text", "") for p in text if isinstance(p, dict))
            calls = _history_call_text(message["tool_calls"])
            message = {"role": "assistant", "content": f"{text}\n{calls}" if text else calls}
        elif role == "tool":
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            message = {"role": "user", "content": f"Function result: {content}"}
        out.append(message)
    if plan is not None:
        instruction = _instruction(plan)
        if out and out[0].get("role") in ("system", "developer") and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + instruction}
        else:
            out.insert(0, {"role": "system", "content": instruction})
    return out, None


# ----------------------------------------------------------------------------------- output


class _ArgumentsOnly:
    """Parser for a named tool choice: the whole output is that tool's arguments object."""

    keeps_special_tokens = False

    def __init__(self, name: str):
        self._name = name
        self._text = ""

    def feed(self, text: str) -> ParsedDelta:
        self._text += text
        return ParsedDelta()

    def finish(self) -> ParsedDelta:
        try:
            arguments = json.loads(self._text)
        except json.JSONDecodeError:
            return ParsedDelta(content=self._text)  # cut short by max_tokens: no broken call
        if not isinstance(arguments, dict):
            return ParsedDelta(content=self._text)
        return ParsedDelta(tool_calls=[ToolCall(self._name, json.dumps(arguments, ensure_ascii=False))])


@dataclass
class ToolCallExtractor:
    """Per choice: text pieces in, content and numbered tool calls (with ids) out."""

    plan: ToolPlan
    calls: list[tuple[str, ToolCall]] = field(default_factory=list)  # (id, call), in order
    content: str = ""

    def __post_init__(self) -> None:
        if self.plan.mode == "named":
            self._parser = _ArgumentsOnly(self.plan.named)
        elif self.plan.mode == "required":
            # The constrained output is a bare JSON list of {"name", "arguments"}.
            self._parser = get_tool_parser("generic")(self.plan.names)
        else:
            self._parser = get_tool_parser(self.plan.parser)(self.plan.names)

    @property
    def keeps_special_tokens(self) -> bool:
        return bool(getattr(self._parser, "keeps_special_tokens", False))

    def feed(self, text: str, final: bool) -> tuple[str, list[tuple[int, str, ToolCall]]]:
        """New content, and new calls as (index, id, call)."""
        delta = self._parser.feed(text) if text else ParsedDelta()
        if final:
            tail = self._parser.finish()
            delta = ParsedDelta(delta.content + tail.content, delta.tool_calls + tail.tool_calls)
        new_calls = []
        for call in delta.tool_calls:
            if (not self.plan.parallel or self.plan.legacy) and self.calls:
                break  # parallel_tool_calls false: only the first call counts
            entry = (random_call_id(), call)
            new_calls.append((len(self.calls), *entry))
            self.calls.append(entry)
        self.content += delta.content
        return delta.content, new_calls
