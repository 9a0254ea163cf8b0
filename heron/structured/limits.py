"""GrammarLimits: the structural caps a structured-output spec must pass before llguidance sees it.

In: a StructuredOutputsParams and the limits. Out: nothing, or a GrammarLimitError that names the
limit and the `heron serve` flag that raises it.

Why in Python, before the native compiler: llguidance recurses on the native stack once per schema
level, `$ref` hop and grammar rule reference, so a deep enough spec overflows it and kills the whole
server (a 1,000-level `$ref` chain does on an 8 MiB thread stack; 750 does not), and its compile
time grows faster than linearly with size (a 10,000-property object takes ~12 s on our CPUs, 3,000
takes ~0.7 s). The caps keep every spec far inside what compiles safely and quickly; the compile
pool's big thread stacks (heron.structured.pool) add a second margin. Every walk here is iterative,
so a spec deep enough to crash the compiler cannot blow Python's recursion limit either.

The llguidance parser limits (`parser_limits()`) bound what the caps cannot see: lexer work on a
pathological regex, and the number of grammar symbols a schema expands to.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import llguidance

from heron.sampling_params import StructuredOutputsParams
from heron.structured.errors import GrammarError, GrammarLimitError

# Keywords whose value maps names to subschemas: the map itself is not a nesting level.
SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


@dataclass(frozen=True)
class GrammarLimits:
    """Caps on one structured-output spec (each field is a `heron serve` flag, see `FLAGS`)."""

    max_bytes: int = 128 * 1024  # the spec's text (schema JSON, regex, grammar, choices)
    max_schema_depth: int = 128  # nested subschemas, each $ref hop counting as one more
    max_schema_nodes: int = 5_000  # JSON objects in a schema (subschemas, properties)
    max_grammar_rules: int = 2_000  # rules and terminals in a Lark / GBNF grammar
    max_grammar_depth: int = 128  # rule-reference chain plus parenthesis nesting
    max_regex_bytes: int = 8 * 1024  # one regex: the regex form, a schema pattern, a Lark /regex/
    # Properties of one object: optional properties may come in any subset, and llguidance's parser
    # row grows ~4 items per property; past its 2,000 (max_items_in_row) the grammar compiles but
    # fails at the first token. 450 stays under it; nested objects each get their own row.
    max_object_properties: int = 450
    # llguidance's own caps (LLParserLimits): symbols the grammar expands to, and lexer work.
    max_grammar_symbols: int = 100_000
    lexer_fuel: int = 1_000_000  # initial_lexer_fuel: building the lexer (~50k/ms)
    step_lexer_fuel: int = 200_000  # one token mask's lexer work (~14k/ms)
    step_max_items: int = 50_000  # one token mask's Earley items (~20k/ms)
    max_lexer_states: int = 50_000  # ~1-2 kB each

    def parser_limits(self) -> llguidance.LLParserLimits:
        # verbose_errors=False: llguidance's verbose errors echo parser state and the grammar.
        return llguidance.LLParserLimits(
            initial_lexer_fuel=self.lexer_fuel,
            step_lexer_fuel=self.step_lexer_fuel,
            step_max_items=self.step_max_items,
            max_lexer_states=self.max_lexer_states,
            max_grammar_size=self.max_grammar_symbols,
            max_items_in_row=2_000,  # llguidance's default, which max_object_properties is sized for
            verbose_errors=False,
        )


FLAGS = {
    "max_bytes": "--max-grammar-bytes",
    "max_schema_depth": "--max-schema-depth",
    "max_schema_nodes": "--max-schema-nodes",
    "max_grammar_rules": "--max-grammar-rules",
    "max_grammar_depth": "--max-grammar-depth",
    "max_regex_bytes": "--max-regex-bytes",
    "max_object_properties": "--max-object-properties",
    "max_grammar_symbols": "--max-grammar-symbols",
}


def limit_error(what: str, found: int | str, field: str, limits: GrammarLimits) -> GrammarLimitError:
    return GrammarLimitError(
        f"{what} is {found}, over the limit of {getattr(limits, field)} "
        f"(the server's `heron serve {FLAGS[field]}` raises it)."
    )


def check_spec(spec: StructuredOutputsParams, limits: GrammarLimits) -> Any:
    """Raise GrammarLimitError if `spec` exceeds `limits`; returns the JSON schema parsed (or None)."""
    schema: Any = None
    if spec.json is not None:
        if isinstance(spec.json, str):
            size = len(spec.json.encode())
            if size > limits.max_bytes:
                raise limit_error("The JSON schema's size in bytes", size, "max_bytes", limits)
            try:
                schema = json.loads(spec.json)
            except RecursionError:
                raise limit_error("The JSON schema's nesting depth", "beyond what can be read", "max_schema_depth", limits) from None
            except json.JSONDecodeError as exc:
                raise GrammarError(f"The JSON schema is not valid JSON: {exc}") from exc
        else:
            schema = spec.json
        check_schema(schema, limits, measure_size=not isinstance(spec.json, str))
    elif spec.regex is not None:
        _check_bytes("The regex's size in bytes", spec.regex, limits)
        _check_regex(spec.regex, limits)
    elif spec.choice is not None:
        size = sum(len(c.encode()) + 1 for c in spec.choice)
        if size > limits.max_bytes:
            raise limit_error("The choices' size in bytes", size, "max_bytes", limits)
    elif spec.grammar is not None:
        _check_bytes("The grammar's size in bytes", spec.grammar, limits)
        check_grammar(spec.grammar, limits)
    return schema


def _check_bytes(what: str, text: str, limits: GrammarLimits) -> None:
    size = len(text.encode())
    if size > limits.max_bytes:
        raise limit_error(what, size, "max_bytes", limits)


def _check_regex(regex: str, limits: GrammarLimits) -> None:
    size = len(regex.encode())
    if size > limits.max_regex_bytes:
        raise limit_error("A regex's size in bytes", size, "max_regex_bytes", limits)


# -- JSON Schema ------------------------------------------------------------------------------


def check_schema(schema: Any, limits: GrammarLimits, measure_size: bool = True) -> None:
    """Node count, pattern sizes, depth (following local `$ref`s) and size of a JSON schema."""
    index = _index(schema, limits)
    _check_depth(schema, index, limits)
    if measure_size:
        # The schema's JSON text is what llguidance parses; a dict's size is known only by writing it
        # (safe now: the depth is bounded).
        try:
            size = len(json.dumps(schema, ensure_ascii=False).encode())
        except (ValueError, RecursionError) as exc:  # a dict that contains itself
            raise GrammarError("The JSON schema cannot be written as JSON (it contains itself).") from exc
        if size > limits.max_bytes:
            raise limit_error("The JSON schema's size in bytes", size, "max_bytes", limits)


class _Index:
    """Where a schema's `$id`s and `$anchor`s point, for resolving `$ref`."""

    def __init__(self, root: Any):
        self.root = root
        self.ids: dict[str, Any] = {}
        self.anchors: dict[str, Any] = {}

    def resolve(self, ref: str) -> Any:
        base, _, fragment = ref.partition("#")
        node = self.root if not base else self.ids.get(base, self.ids.get(base.rstrip("/")))
        if node is None:
            raise GrammarError(f"The JSON schema's $ref {ref!r} points outside the schema; only references within it are supported.")
        if fragment and not fragment.startswith("/"):
            found = self.anchors.get(fragment)
            if found is None:
                raise GrammarError(f"The JSON schema's $ref {ref!r} names no $anchor in the schema.")
            return found
        for part in fragment.split("/")[1:]:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise GrammarError(f"The JSON schema's $ref {ref!r} does not resolve to a part of the schema.")
        return node


def _index(schema: Any, limits: GrammarLimits) -> _Index:
    """One pass over every value: count objects, check patterns, collect `$id`s and `$anchor`s."""
    index = _Index(schema)
    count = 0
    pending = [schema]
    # A schema given as a dict may share sub-objects (or even contain itself): visit each once.
    seen: set[int] = set()
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if id(node) in seen:
                continue
            seen.add(id(node))
            count += 1
            if count > limits.max_schema_nodes:
                raise limit_error("The JSON schema's number of objects", f"more than {limits.max_schema_nodes}", "max_schema_nodes", limits)
            for key, value in node.items():
                if key == "properties" and isinstance(value, dict) and len(value) > limits.max_object_properties:
                    raise limit_error(
                        "The number of properties of one object in the JSON schema", len(value),
                        "max_object_properties", limits,
                    )
                if key == "pattern" and isinstance(value, str):
                    _check_regex(value, limits)
                elif key == "patternProperties" and isinstance(value, dict):
                    for pattern in value:
                        _check_regex(pattern, limits)
                elif key == "$id" and isinstance(value, str):
                    index.ids.setdefault(value.split("#")[0], node)
                elif key == "$anchor" and isinstance(value, str):
                    index.anchors.setdefault(value, node)
                if isinstance(value, (dict, list)):
                    pending.append(value)
        elif isinstance(node, list):
            if id(node) in seen:
                continue
            seen.add(id(node))
            pending.extend(v for v in node if isinstance(v, (dict, list)))
    return index


def _schema_children(node: Any, index: _Index) -> list[Any]:
    if isinstance(node, list):
        return [v for v in node if isinstance(v, (dict, list))]
    children = []
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str):
            children.append(index.resolve(value))
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            children.extend(v for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, (dict, list)):
            children.append(value)
    return children


def _check_depth(schema: Any, index: _Index, limits: GrammarLimits) -> None:
    """The longest chain of nested objects from the root, a `$ref` leading into its target.

    A `$ref` back to an object on the current chain is recursion, which llguidance compiles to a
    rule that refers to itself rather than expanding it, so it adds no depth.
    """
    if not isinstance(schema, (dict, list)):
        return
    limit = limits.max_schema_depth
    weight = lambda node: 1 if isinstance(node, dict) else 0  # noqa: E731 (lists are no level)
    height: dict[int, int] = {}
    on_chain: set[int] = set()
    # Each frame: [node, children left to visit, tallest child so far]; `depth` is the chain's.
    stack = [[schema, iter(_schema_children(schema, index)), 0]]
    on_chain.add(id(schema))
    depth = weight(schema)
    while stack:
        frame = stack[-1]
        child = next(frame[1], None)
        if child is None:
            node = frame[0]
            h = weight(node) + frame[2]
            height[id(node)] = h
            on_chain.discard(id(node))
            depth -= weight(node)
            stack.pop()
            if stack:
                stack[-1][2] = max(stack[-1][2], h)
            if depth + h > limit:
                raise limit_error("The JSON schema's nesting depth (counting $ref hops)", depth + h, "max_schema_depth", limits)
            continue
        known = height.get(id(child))
        if known is not None:
            frame[2] = max(frame[2], known)
        elif id(child) not in on_chain:
            depth += weight(child)
            if depth > limit:
                raise limit_error("The JSON schema's nesting depth (counting $ref hops)", f"more than {limit}", "max_schema_depth", limits)
            on_chain.add(id(child))
            stack.append([child, iter(_schema_children(child, index)), 0])


# -- Lark and GBNF ----------------------------------------------------------------------------

_GBNF_RULE = re.compile(r"^[ \t]*([A-Za-z_][A-Za-z0-9_-]*)[ \t]*::=", re.MULTILINE)
_LARK_RULE = re.compile(r"^[ \t]*[?!]?([A-Za-z_][A-Za-z0-9_]*)(?:\.-?\d+)?[ \t]*:(?!:)", re.MULTILINE)


def check_grammar(text: str, limits: GrammarLimits) -> None:
    """Rule count, regex sizes, embedded `%json` schemas and rule-reference depth of a grammar."""
    gbnf = "::=" in text
    rules: dict[str, list[tuple[str, int]]] = {}  # rule -> (referenced name, paren depth there)
    nesting: dict[str, int] = {}  # rule -> deepest parentheses in its body
    current: str | None = None
    for kind, value, depth in _tokens(text, gbnf, limits):
        if kind == "rule":
            current = value
            if current not in rules:
                rules[current] = []
                nesting[current] = 0
                if len(rules) > limits.max_grammar_rules:
                    raise limit_error("The grammar's number of rules", f"more than {limits.max_grammar_rules}", "max_grammar_rules", limits)
        elif current is not None and kind == "name":
            rules[current].append((value, depth))
        elif current is not None and kind == "paren":
            nesting[current] = max(nesting[current], depth)
    _check_rule_depth(rules, nesting, limits)


def _tokens(text: str, gbnf: bool, limits: GrammarLimits):
    """(kind, value, paren depth) for rule definitions, names and parentheses; literals skipped."""
    rule_starts = {m.start(1): (m.group(1), m.end()) for m in (_GBNF_RULE if gbnf else _LARK_RULE).finditer(text)}
    name = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*" if gbnf else r"[A-Za-z_][A-Za-z0-9_]*")
    decoder = json.JSONDecoder()
    i, n, depth = 0, len(text), 0
    while i < n:
        c = text[i]
        if i in rule_starts:
            rule, i = rule_starts[i]
            yield "rule", rule, 0
            depth = 0
            continue
        if c in "\"'" or (gbnf and c == "["):
            close = "]" if c == "[" else c
            j = i + 1
            while j < n and text[j] != close and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
        elif not gbnf and c == "/" and text.startswith("//", i) or gbnf and c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif not gbnf and c == "/":
            j = i + 1
            while j < n and text[j] != "/" and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            _check_regex(text[i + 1 : j], limits)
            i = j + 1
        elif not gbnf and text.startswith("%json", i):
            # llguidance's Lark embeds JSON schemas: they get the schema caps.
            j = text.find("{", i)
            if j < 0:
                i += 5
                continue
            try:
                schema, end = decoder.raw_decode(text, j)
            except RecursionError:
                raise limit_error("An embedded %json schema's nesting depth", "beyond what can be read", "max_schema_depth", limits) from None
            except json.JSONDecodeError as exc:
                raise GrammarError(f"The grammar's %json schema is not valid JSON: {exc}") from exc
            check_schema(schema, limits)
            i = end
        elif c in "([" or (not gbnf and c == "{"):
            depth += 1
            yield "paren", "", depth
            i += 1
        elif c in ")]" or (not gbnf and c == "}"):
            depth = max(0, depth - 1)
            i += 1
        else:
            m = name.match(text, i)
            if m is None:
                i += 1
            else:
                yield "name", m.group(), depth
                i = m.end()


def _check_rule_depth(rules: dict[str, list[tuple[str, int]]], nesting: dict[str, int], limits: GrammarLimits) -> None:
    """The deepest chain of rule references (plus the parentheses around each) from any rule.

    A reference back to a rule on the current chain is recursion, a loop rather than a deeper
    chain, so it adds nothing; names that are not rules (builtins, `%import`s) are leaves.
    """
    limit = limits.max_grammar_depth
    height: dict[str, int] = {}
    for root in rules:
        if root in height:
            continue
        on_chain = {root}
        # Each frame: [rule, references left, tallest so far, parentheses around its reference].
        stack: list[list[Any]] = [[root, iter(rules[root]), nesting[root], 0]]
        chain = 0  # depth of the current chain: references plus parentheses
        while stack:
            frame = stack[-1]
            ref = next(frame[1], None)
            if ref is None:
                rule, _, tallest, paren = frame
                height[rule] = tallest
                on_chain.discard(rule)
                stack.pop()
                if stack:
                    chain -= paren + 1
                    stack[-1][2] = max(stack[-1][2], paren + 1 + tallest)
                if chain + tallest > limit:
                    raise limit_error("The grammar's rule-reference depth", chain + tallest, "max_grammar_depth", limits)
                continue
            target, paren = ref
            if target not in rules or target in on_chain:
                continue
            if target in height:
                frame[2] = max(frame[2], paren + 1 + height[target])
                continue
            chain += paren + 1
            if chain > limit:
                raise limit_error("The grammar's rule-reference depth", f"more than {limit}", "max_grammar_depth", limits)
            on_chain.add(target)
            stack.append([target, iter(rules[target]), nesting[target], paren])
