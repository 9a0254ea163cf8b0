"""Chat templates: a model's Jinja2 chat template rendered into a prompt, exactly as transformers does.

In: OpenAI-style chat messages (plus tools, documents and extra template variables). Out: the prompt
text that transformers' `apply_chat_template(..., tokenize=False)` renders for that conversation.

This module owns the sandboxed Jinja environment (the globals, filters and whitespace settings that
Hub templates are written against), the reshaping of OpenAI wire messages into what templates read,
the detection of whether a template walks content parts itself, and `continue_final_message`.
A template is compiled once, when its `ChatTemplate` is built; `render` is on the request hot path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

ContentFormat = Literal["string", "openai"]


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or refused the conversation (`raise_exception`)."""


class _TemplateRaised(jinja2.TemplateError):
    """What `raise_exception(...)` inside a template throws; its message is the template's own words."""


# Appended to the final message for continue_final_message, then located in the rendered text to
# cut everything the template wrote after it. Trailing space included on purpose: a template that
# trims the message drops it, which tells us to strip trailing whitespace at the cut as well.
_CONTINUE_MARK = "HERON_CONTINUE_FINAL_MESSAGE_MARK "

# Template errors are request errors (a template refusing a conversation, or tripping over one).
# Python errors a template can raise while rendering are listed here so that nothing else is caught.
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError)

# transformers mirrors a message's reasoning under every name templates read it by.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


# -- the sandbox -------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes '<', '>', '&' and "'" and takes no separators: templates are
    # written against transformers' plain json.dumps, non-ASCII kept as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _check_namespace_key(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not store {name!r} on a namespace")


class _TemplateNamespace(Namespace):
    """`namespace(...)` that refuses underscore names, so templates cannot plant dunder attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Namespace takes `self` through *args so that `namespace(self=...)` stays a legal key.
        self, positional = args[0], args[1:]
        attrs = dict(*positional, **kwargs)
        for name in attrs:
            _check_namespace_key(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_key(name)
        Namespace.__setitem__(self, name, value)


class _TemplateDict:
    """`dict(...)` for templates without handing them the `dict` type itself (its class attributes)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: training templates mark assistant text with it.

    Serving has no use for the marks, so the body is rendered unchanged. It is wrapped in a call block
    as transformers wraps it, because that gives it its own scope: a `set` inside stays inside.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _new_environment() -> ImmutableSandboxedEnvironment:
    # trim_blocks + lstrip_blocks: Hub templates are written (and their whitespace tuned) for these.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    env.globals["dict"] = _TemplateDict()
    return env


# -- what the template reads -------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A fresh copy of `value` built from plain JSON types.

    Templates are untrusted code, and the sandbox only knows the methods of plain types; anything
    richer (a pydantic model, a str subclass) is flattened first. The copy also means nothing a
    render does can reach the caller's messages.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    # Same inert stand-in transformers uses: templates only test whether such keys exist.
    return f"<{type(value).__name__}>"


def _decode_arguments(arguments: Any) -> Any:
    """A tool call's `function.arguments` in the shape templates expect: a mapping.

    OpenAI clients send arguments as a JSON string, but templates (Llama 3.1, Qwen2.5, Mistral) are
    written for transformers' documented form, a dict, and `tojson` it; a string would come out
    quoted and escaped. Like vLLM we decode it, and treat a missing or empty value as no arguments.
    Unlike vLLM, a string that is not a JSON object is kept as sent rather than replaced by `{}`:
    it renders as a JSON string, which loses nothing the client wrote.
    """
    if arguments is None:
        return {}
    if not isinstance(arguments, str):
        return arguments
    if not arguments.strip():
        return {}
    try:
        decoded = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    return decoded if isinstance(decoded, dict) else arguments


def _join_text_parts(parts: Sequence[Any]) -> str:
    texts: list[str] = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif (
            isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str)
        ):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(
                f"content part of type {kind!r} is not supported by this model's chat template"
            )
    return "\n".join(texts)


# -- reading the template's AST ----------------------------------------------------------------


def _unwrap(node: nodes.Node) -> nodes.Node:
    """Strip what keeps an expression's element kind: filters (`|list`, `|selectattr`) and slices."""
    while True:
        if isinstance(node, nodes.Filter) and node.node is not None:
            node = node.node
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
            node = node.node
        else:
            return node


def _detect_content_format(ast: nodes.Template) -> ContentFormat:
    """'openai' when the template loops over a message's content itself, else 'string'.

    The idea is vLLM's: follow `messages` through `set` aliases and `for` loops to the names that hold
    one message, then look for a loop over such a name's `content`. Ours also follows aliases of the
    content itself (`{% set c = message.content %}{% for part in c %}`) and indexed messages
    (`messages[0].content`). Control flow is not modelled; a loop anywhere counts.
    """
    lists: set[str] = {"messages"}
    items: set[str] = set()
    contents: set[str] = set()

    def is_list(node: nodes.Node) -> bool:
        node = _unwrap(node)
        return isinstance(node, nodes.Name) and node.name in lists

    def is_item(node: nodes.Node) -> bool:
        if isinstance(node, nodes.Name):
            return node.name in items
        if isinstance(node, nodes.Getitem):
            return is_list(node.node)
        return (
            isinstance(node, nodes.Filter)
            and node.name in ("first", "last")
            and node.node is not None
            and is_list(node.node)
        )

    def is_content(node: nodes.Node) -> bool:
        node = _unwrap(node)
        if isinstance(node, nodes.Name):
            return node.name in contents
        if isinstance(node, nodes.Getattr):
            return node.attr == "content" and is_item(node.node)
        if isinstance(node, nodes.Getitem):
            return isinstance(node.arg, nodes.Const) and node.arg.value == "content" and is_item(node.node)
        return False

    assigns = [a for a in ast.find_all(nodes.Assign) if isinstance(a.target, nodes.Name)]
    loops = list(ast.find_all(nodes.For))
    changed = True
    while changed:
        before = (len(lists), len(items), len(contents))
        for assign in assigns:
            name = assign.target.name
            if is_list(assign.node):
                lists.add(name)
            elif is_item(assign.node):
                items.add(name)
            elif is_content(assign.node):
                contents.add(name)
        for loop in loops:
            if isinstance(loop.target, nodes.Name) and is_list(loop.iter):
                items.add(loop.target.name)
        changed = before != (len(lists), len(items), len(contents))
    return "openai" if any(is_content(loop.iter) for loop in loops) else "string"


def _mentions_developer_role(ast: nodes.Template) -> bool:
    return any(node.value == "developer" for node in ast.find_all(nodes.Const) if isinstance(node.value, str))


# -- the owner class ---------------------------------------------------------------------------


class ChatTemplate:
    """One compiled chat template and the facts Heron needs about it."""

    source: str
    special_tokens: dict[str, Any]
    supports_tools: bool
    content_format: ContentFormat

    def __init__(self, source: str, *, special_tokens: dict[str, str] | None = None) -> None:
        if not isinstance(source, str):
            raise ChatTemplateError(f"a chat template is a string, not {type(source).__name__}")
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        env = _new_environment()
        try:
            ast = env.parse(source)
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template does not compile (line {exc.lineno}): {exc.message}") from exc
        self.content_format = _detect_content_format(ast)
        self._keeps_developer_role = _mentions_developer_role(ast)
        # Last: the variable tracker runs Jinja's optimizer, which folds constants in the AST in place.
        self.supports_tools = "tools" in meta.find_undeclared_variables(ast)

    @classmethod
    def from_file(cls, path: str | Path, *, special_tokens: dict[str, str] | None = None) -> ChatTemplate:
        """A user's override: a Jinja file, or a JSON file (tokenizer_config-like) with a "chat_template" key."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatTemplateError(f"cannot read chat template file {str(path)!r}: {exc}") from exc
        config = _json_object(text, required=path.suffix.lower() == ".json", path=path)
        if config is None:
            return cls(text, special_tokens=special_tokens)
        return cls(_template_from_config(config, path), special_tokens=special_tokens)

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages`; raises ChatTemplateError when the template refuses them."""
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt cannot both be set: the first continues the "
                "final message, the second opens a new assistant message"
            )
        if not messages:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation")
        conversation = [self._prepare_message(message) for message in messages]
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ChatTemplateError("documents must be a list of objects")

        continued_text = self._mark_final_message(conversation) if continue_final_message else None
        # The caller's variables win over the special tokens of the same name, as in transformers.
        variables = {**self.special_tokens, **_plain(template_kwargs)}
        try:
            rendered = self._template.render(
                messages=conversation,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except _TemplateRaised as exc:
            raise ChatTemplateError(exc.message or "the chat template rejected the conversation") from exc
        except _RENDER_ERRORS as exc:
            raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc
        if continued_text is not None:
            rendered = _cut_after_final_message(rendered, continued_text)
        return rendered

    # -- helpers -------------------------------------------------------------------------------

    def _prepare_message(self, message: Any) -> dict[str, Any]:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"a chat message is an object, not {type(message).__name__}")
        # Drop explicit nulls (OpenAI clients send `content: null`, `tool_calls: null`): templates test
        # for missing keys and would crash on, or print, None. transformers does the same.
        prepared: dict[str, Any] = {key: _plain(value) for key, value in message.items() if value is not None}

        # Templates that predate OpenAI's `developer` role reject it or print it as a header; for them a
        # developer message is what a system message was. A template that names the role gets it as is.
        if prepared.get("role") == "developer" and not self._keeps_developer_role:
            prepared["role"] = "system"

        content = prepared.get("content")
        if isinstance(content, list) and self.content_format == "string":
            prepared["content"] = _join_text_parts(content)

        tool_calls = prepared.get("tool_calls")
        if isinstance(tool_calls, list):
            if not tool_calls:
                # An empty list would send templates down their tool-call branch with nothing to print.
                del prepared["tool_calls"]
            for call in tool_calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    function["arguments"] = _decode_arguments(function.get("arguments"))

        reasoning = next((prepared[k] for k in _REASONING_KEYS if prepared.get(k) is not None), None)
        if reasoning is not None:
            prepared = {"thinking": reasoning, **prepared, "reasoning_content": reasoning}
        return prepared

    def _mark_final_message(self, conversation: list[dict[str, Any]]) -> str:
        """Tag the final message's text with the continue mark; return the text as it was."""
        final = conversation[-1]
        content = final.get("content")
        if content is None:
            raise ChatTemplateError(
                'continue_final_message is set but the final message has no "content" to continue'
            )
        if "content" not in self.source:
            raise ChatTemplateError(
                "continue_final_message is set but this chat template never reads message content"
            )
        if isinstance(content, str):
            final["content"] = content + _CONTINUE_MARK
            return content
        if isinstance(content, list):
            for part in reversed(content):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    original = part["text"]
                    part["text"] = original + _CONTINUE_MARK
                    return original
        raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")


def _cut_after_final_message(rendered: str, continued_text: str) -> str:
    mark = _CONTINUE_MARK.strip()
    if mark not in rendered or continued_text.strip() not in rendered:
        raise ChatTemplateError(
            "continue_final_message is set but the chat template does not reproduce the final message, "
            "so there is nothing to continue"
        )
    at = rendered.rindex(mark)
    if rendered.startswith(_CONTINUE_MARK, at):
        return rendered[:at]
    # The template trimmed the message (and with it the mark's trailing space): trim at the cut too.
    return rendered[:at].rstrip()


def _json_object(text: str, *, required: bool, path: Path) -> dict[str, Any] | None:
    """`text` parsed as a JSON object; None when it is not JSON and JSON was not required."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if required:
            raise ChatTemplateError(f"{str(path)!r} is not valid JSON: {exc}") from exc
        return None
    if isinstance(value, dict):
        return value
    if required:
        raise ChatTemplateError(f'{str(path)!r} holds JSON but not an object with a "chat_template" key')
    return None


def _template_from_config(config: dict[str, Any], path: Path) -> str:
    value = config.get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        # The multi-template form: [{"name": "default", "template": ...}, {"name": "tool_use", ...}].
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ChatTemplateError(f'{str(path)!r} lists chat templates but none is named "default"')
    raise ChatTemplateError(f'{str(path)!r} has no "chat_template" string')
