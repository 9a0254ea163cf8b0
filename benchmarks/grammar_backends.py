"""Grammar-constrained decoding backends on this CPU: llguidance vs xgrammar vs outlines-core.

Cases: 17 JSON Schemas typical of structured-output and tool-calling requests (one per feature:
nesting, minItems/maxItems, enum, const, anyOf, oneOf, $defs/$ref, recursive $ref, pattern,
format, minLength/maxLength, minimum/maximum, additionalProperties false, allOf, a pydantic model,
a tool_choice="required"-style array of five tools), two regexes and a small Lark grammar. Each
case has a hand-written valid instance and a counterexample that breaks the feature; both are
checked with jsonschema / re first, so a failure below is the backend's, not the script's. The
tokenizer is the bundled SmolLM2-135M-Instruct one (byte-level BPE, 49152 tokens), built from its
GGUF file the way Heron builds it. Per backend and case:

- compiles: the schema (regex, grammar) is accepted; JSON Schema coverage counts these.
- compile ms: from the schema to a matcher ready for its first mask, median of `--compile-reps`
  runs, each from scratch: xgrammar gets one thread and no compiler cache; outlines-core's Index
  is built in a forked child stopped after `--compile-timeout` s (it can take minutes), timed there.
- mask µs: the valid instance is tokenized (untimed), then walked token by token with a fresh
  matcher from the compiled grammar, as a server does per request: compute the full-vocabulary
  allowed-token bitmask into a preallocated buffer, check that the next token is allowed (a refusal
  is reported as a failure), advance the matcher; after the last token one more mask must allow
  EOS. Only the mask call itself is timed (`perf_counter_ns` around it), not tokenization, matcher
  construction, the allowed-token check or the advance. Repeated `--walks` times; median and p99
  are over all masks of all walks. "first mask" is the first one of the first walk: llguidance
  builds its lexer lazily, so part of its compilation shows there and in the p99. Each backend
  first gets one untimed warm-up case, so one-off process costs do not land on the first case.
- allowed: mean allowed tokens per mask (first walk), a cross-check that the masks are real and
  comparable. refuses bad: walking the counterexample hits a refused token (or no EOS at the end),
  i.e. the backend enforces the feature rather than just accepting the schema.

Each backend runs with its own JSON defaults: llguidance and xgrammar allow flexible whitespace,
outlines-core at most one space (`[ ]?`), hence its smaller "allowed" counts; the instances use
json.dumps' ", " and ": " separators, which all three accept. A backend that cannot be imported
is skipped with a note. Nothing is fetched from the network. Prints a per-case and a summary
Markdown table; the whole run takes well under a minute.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grammar_backends.py
       [--walks 3] [--compile-reps 3] [--compile-timeout 10] [--cases SUBSTR,...]
       [--backends llguidance,xgrammar,outlines-core] [--verbose]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # xgrammar imports torch; keep it off the other core
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # xgrammar imports transformers; never go online

import argparse
import enum
import functools
import importlib.metadata
import json
import multiprocessing
import pickle
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np


# -- the cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    kind: str  # "json", "regex" or "lark"
    grammar: Any  # a JSON Schema dict, a regex or a Lark grammar
    instance: Any  # valid: a JSON value (kind "json") or the text itself
    bad: Any  # a counterexample the grammar must refuse, breaking the feature the case is about

    def text(self, value: Any) -> str:
        return json.dumps(value, ensure_ascii=False) if self.kind == "json" else value


def _obj(properties: dict[str, Any], required: Optional[list[str]] = None, **extra: Any) -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }
    schema.update(extra)
    return schema


STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}


def _pydantic_case() -> Case:
    """A schema as pydantic writes it: $defs, titles, an Enum, Optional fields with defaults."""
    from pydantic import BaseModel, Field

    class Status(str, enum.Enum):
        pending = "pending"
        paid = "paid"
        shipped = "shipped"

    class Customer(BaseModel):
        name: str
        email: Optional[str] = None

    class Item(BaseModel):
        sku: str
        quantity: int = Field(ge=1, le=100)
        unit_price: float

    class Order(BaseModel):
        order_id: int
        customer: Customer
        items: list[Item] = Field(min_length=1)
        status: Status
        notes: Optional[str] = None

    def order(quantity: int) -> dict[str, Any]:
        return {
            "order_id": 10293,
            "customer": {"name": "Grace Hopper", "email": None},
            "items": [
                {"sku": "KB-104", "quantity": 2, "unit_price": 49.9},
                {"sku": "MS-220", "quantity": quantity, "unit_price": 19.5},
            ],
            "status": "paid",
            "notes": "Leave at the front desk.",
        }

    return Case("pydantic_model", "json", Order.model_json_schema(), order(1), order(0))


def _tool_call_case() -> Case:
    """What a server builds for tool_choice="required": an array of calls, each one of the tools."""
    tools = {
        "get_weather": _obj(
            {
                "location": STR,
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            required=["location", "unit"],
            additionalProperties=False,
        ),
        "search_flights": _obj(
            {
                "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "date": {"type": "string", "format": "date"},
                "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                "cabin": {"type": "string", "enum": ["economy", "premium", "business", "first"]},
                "flexible": BOOL,
            },
            required=["origin", "destination", "date", "passengers"],
            additionalProperties=False,
        ),
        "create_calendar_event": _obj(
            {
                "title": {"type": "string", "maxLength": 100},
                "start": {"type": "string", "format": "date-time"},
                "end": {"type": "string", "format": "date-time"},
                "attendees": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 20},
                "location": STR,
                "reminder_minutes": {"type": "integer", "enum": [0, 5, 10, 30, 60]},
            },
            required=["title", "start", "end"],
            additionalProperties=False,
        ),
        "send_email": _obj(
            {
                "to": {"type": "array", "items": STR, "minItems": 1},
                "subject": STR,
                "body": STR,
                "priority": {"type": "string", "enum": ["low", "normal", "high"]},
            },
            required=["to", "subject", "body"],
            additionalProperties=False,
        ),
        "lookup_order": _obj(
            {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"}, "include_items": BOOL},
            required=["order_id"],
            additionalProperties=False,
        ),
    }
    schema = {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                _obj({"name": {"type": "string", "enum": [name]}, "parameters": params}, additionalProperties=False)
                for name, params in tools.items()
            ]
        },
    }
    event = {
        "name": "create_calendar_event",
        "parameters": {
            "title": "Quarterly planning",
            "start": "2025-03-14T09:30:00Z",
            "end": "2025-03-14T11:00:00Z",
            "attendees": ["ada@example.com", "grace@example.org"],
            "location": "Room 4 / São Paulo office",
            "reminder_minutes": 10,
        },
    }
    weather = {"name": "get_weather", "parameters": {"location": "Lisbon", "unit": "celsius", "days": 3}}
    bad_weather = {"name": "get_weather", "parameters": {"location": "Lisbon", "unit": "kelvin"}}
    return Case("tool_call_large", "json", schema, [event, weather], [event, bad_weather])


def make_cases() -> list[Case]:
    address = _obj({"street": STR, "city": STR, "postcode": STR})
    point = {"street": "1 Main St", "city": "Springfield", "postcode": "12345"}
    return [
        Case("flat_object", "json", _obj({"name": STR, "age": INT, "active": BOOL}),
             {"name": "Ada Lovelace", "age": 36, "active": True},
             {"name": "Ada Lovelace", "age": 36}),
        Case("nested_objects", "json",
             _obj({"user": _obj({"name": STR, "address": address}), "note": STR}),
             {"user": {"name": "Alan Turing", "address": {"street": "12 King's Parade", "city": "Cambridge",
                                                          "postcode": "CB2 1SJ"}}, "note": "ring twice"},
             {"user": {"name": "Alan Turing", "address": {"street": "12 King's Parade", "city": "Cambridge"}},
              "note": "ring twice"}),
        Case("array_min_max_items", "json",
             _obj({"tags": {"type": "array", "items": STR, "minItems": 1, "maxItems": 5},
                   "scores": {"type": "array", "items": NUM, "minItems": 2, "maxItems": 4}}),
             {"tags": ["urgent", "billing", "eu"], "scores": [0.5, 12.25, -3]},
             {"tags": ["a", "b", "c", "d", "e", "f"], "scores": [0.5, 12.25]}),
        Case("enum", "json",
             _obj({"status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
                   "priority": {"type": "integer", "enum": [1, 2, 3]},
                   "channel": {"type": "string", "enum": ["email", "sms", "push"]}}),
             {"status": "shipped", "priority": 2, "channel": "sms"},
             {"status": "lost", "priority": 2, "channel": "sms"}),
        Case("const", "json", _obj({"type": {"const": "function"}, "version": {"const": 2}, "name": STR}),
             {"type": "function", "version": 2, "name": "get_time"},
             {"type": "function", "version": 3, "name": "get_time"}),
        Case("any_of_nullable", "json",
             _obj({"id": {"anyOf": [STR, INT]}, "parent": {"anyOf": [INT, {"type": "null"}]}}),
             {"id": 42, "parent": None},
             {"id": 42, "parent": "root"}),
        Case("one_of_tagged", "json",
             _obj({"shape": {"oneOf": [
                 _obj({"kind": {"const": "circle"}, "radius": NUM}, additionalProperties=False),
                 _obj({"kind": {"const": "rect"}, "width": NUM, "height": NUM}, additionalProperties=False),
             ]}}),
             {"shape": {"kind": "rect", "width": 3, "height": 4.5}},
             {"shape": {"kind": "rect", "radius": 2}}),
        Case("defs_ref", "json",
             {"$defs": {"Address": address}, **_obj({"billing": {"$ref": "#/$defs/Address"},
                                                     "shipping": {"$ref": "#/$defs/Address"}})},
             {"billing": point, "shipping": {"street": "9 Elm Rd", "city": "Shelbyville", "postcode": "54321"}},
             {"billing": point, "shipping": {"street": "9 Elm Rd", "city": 7, "postcode": "54321"}}),
        Case("recursive_ref", "json",
             {"$defs": {"Node": _obj({"value": INT, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}})},
              "$ref": "#/$defs/Node"},
             {"value": 1, "children": [{"value": 2, "children": []},
                                       {"value": 3, "children": [{"value": 4, "children": []}]}]},
             {"value": 1, "children": [{"value": 2, "children": []}, {"value": 3, "children": [{"value": 4}]}]}),
        Case("pattern", "json",
             _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                   "phone": {"type": "string", "pattern": "^\\+[0-9]{1,3} [0-9]{3} [0-9]{3} [0-9]{4}$"}}),
             {"sku": "ABC-1234", "phone": "+44 207 946 0958"},
             {"sku": "AB-1234", "phone": "+44 207 946 0958"}),
        Case("format_datetime_email_uuid", "json",
             _obj({"created_at": {"type": "string", "format": "date-time"},
                   "email": {"type": "string", "format": "email"},
                   "id": {"type": "string", "format": "uuid"}}),
             {"created_at": "2024-05-17T08:45:00Z", "email": "ada.lovelace@example.com",
              "id": "3f2b8c1e-9a4d-4e7b-8c2a-1d5e6f7a8b9c"},
             {"created_at": "2024-05-17T08:45:00Z", "email": "ada lovelace",
              "id": "3f2b8c1e-9a4d-4e7b-8c2a-1d5e6f7a8b9c"}),
        Case("string_min_max_length", "json",
             _obj({"code": {"type": "string", "minLength": 2, "maxLength": 4},
                   "title": {"type": "string", "minLength": 1, "maxLength": 40}}),
             {"code": "PT", "title": "Café com leite, por favor"},
             {"code": "PORTUGAL", "title": "Café com leite, por favor"}),
        Case("number_min_max", "json",
             _obj({"age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "temperature": {"type": "number", "minimum": -50, "maximum": 60},
                   "ratio": {"type": "number", "minimum": 0, "maximum": 1}}),
             {"age": 42, "temperature": -3.5, "ratio": 0.25},
             {"age": 150, "temperature": -3.5, "ratio": 0.25}),
        Case("additional_properties_false", "json",
             _obj({"query": STR, "limit": INT, "offset": INT}, required=["query"], additionalProperties=False),
             {"query": "grammar constrained decoding", "limit": 10},
             {"query": "grammar constrained decoding", "limit": 10, "debug": True}),
        Case("all_of", "json",
             {"allOf": [_obj({"id": INT}), _obj({"label": STR})]},
             {"id": 7, "label": "seven"},
             {"id": 7}),
        _pydantic_case(),
        _tool_call_case(),
        Case("regex_iso_date", "regex", "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
             "2024-02-29", "2024-13-01"),
        Case("regex_phone", "regex", "\\+1 \\([0-9]{3}\\) [0-9]{3}-[0-9]{4}",
             "+1 (555) 010-4477", "+1 555 010 4477"),
        Case("lark_arithmetic", "lark",
             'start: expr\n'
             'expr: term (("+" | "-") term)*\n'
             'term: factor (("*" | "/") factor)*\n'
             'factor: NUMBER | "(" expr ")"\n'
             'NUMBER: /[0-9]+/\n',
             "(12+3)*4-5/6+7*(8-90)/(1+2)", "(12+3)*4-5/6+7*(8-90"),
    ]


WARM_UP = Case("warm_up", "json", _obj({"x": INT, "y": STR}), {"x": 1, "y": "a"}, {"x": "a", "y": "a"})


def check_instances(cases: list[Case]) -> list[str]:
    """The instances are hand-written: check that each valid one is valid and each counterexample
    is not, so that a refused token below is the backend's doing, not the script's."""
    import re

    problems = []
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
        problems.append("jsonschema not installed: JSON instances not checked against their schemas")
    for case in cases:
        if case.kind == "json" and jsonschema is not None:
            validator = jsonschema.Draft202012Validator(case.grammar, format_checker=jsonschema.FormatChecker())
            errors = [e.message for e in validator.iter_errors(case.instance)]
            if errors:
                problems.append(f"{case.name}: instance invalid: {errors[0]}")
            if validator.is_valid(case.bad):
                problems.append(f"{case.name}: counterexample is valid")
        elif case.kind == "regex":
            if not re.fullmatch(case.grammar, case.instance):
                problems.append(f"{case.name}: instance does not match its regex")
            if re.fullmatch(case.grammar, case.bad):
                problems.append(f"{case.name}: counterexample matches its regex")
    return problems


# -- the backends --------------------------------------------------------------------------------


class Unsupported(Exception):
    """The backend has no such grammar kind (not a failure to compile one)."""


class Backend:
    """One library behind a few calls: compile a case, make a matcher from the result, fill the
    mask buffer (the timed call), advance by one token."""

    name = ""
    package = ""

    def __init__(self, tok: Any, compile_timeout: float) -> None:
        self.tok = tok
        self.vocab_size = tok.vocab_size
        self.eos = tok.eos_token_id
        self.compile_timeout = compile_timeout
        self.import_s = 0.0

    @property
    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def compile(self, case: Case) -> Any:
        raise NotImplementedError

    def timed_compile(self, case: Case) -> tuple[Any, float]:
        """The compiled grammar and the seconds the compilation took."""
        start = time.perf_counter()
        compiled = self.compile(case)
        return compiled, time.perf_counter() - start

    def new_matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill_fn(self, matcher: Any, buf: np.ndarray) -> Callable[[], Any]:
        """A no-argument callable that writes the full allowed-token bitmask into buf."""
        raise NotImplementedError

    def advance(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError


class LLGuidance(Backend):
    name = package = "llguidance"

    def __init__(self, tok: Any, compile_timeout: float) -> None:
        super().__init__(tok, compile_timeout)
        start = time.perf_counter()
        import llguidance

        self.import_s = time.perf_counter() - start
        self.llg = llguidance
        # The HF tokenizer.json Heron rebuilt from the GGUF; llguidance reads the vocabulary, the
        # byte-level decoding and the special tokens from it.
        self.lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_token_id)

    def _grammar(self, case: Case) -> str:
        M = self.llg.LLMatcher
        if case.kind == "json":
            return M.grammar_from_json_schema(case.grammar)
        if case.kind == "regex":
            return M.grammar_from_regex(case.grammar)
        return M.grammar_from_lark(case.grammar)

    def _matcher(self, grammar: str) -> Any:
        matcher = self.llg.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def compile(self, case: Case) -> Any:
        # llguidance has no compiled artifact apart from the matcher: building one parses the
        # grammar; its lexer and token-mask tables are built lazily, during the first masks.
        grammar = self._grammar(case)
        self._matcher(grammar)
        return grammar

    def new_matcher(self, compiled: str) -> Any:
        return self._matcher(compiled)

    def fill_fn(self, matcher: Any, buf: np.ndarray) -> Callable[[], Any]:
        return functools.partial(matcher.unsafe_compute_mask_ptr, buf.ctypes.data, buf.nbytes)

    def advance(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)


class XGrammar(Backend):
    name = package = "xgrammar"

    def __init__(self, tok: Any, compile_timeout: float) -> None:
        super().__init__(tok, compile_timeout)
        start = time.perf_counter()
        import xgrammar  # pulls in transformers (torch is already loaded by Heron's GGUF reader)

        self.import_s = time.perf_counter() - start
        self.xgr = xgrammar
        # Byte-level spellings ("Ġhello"), as TokenizerInfo.from_huggingface would pass them.
        info = xgrammar.TokenizerInfo(
            tok.convert_ids_to_tokens(range(tok.vocab_size)),
            xgrammar.VocabType.BYTE_LEVEL,
            vocab_size=tok.vocab_size,
            stop_token_ids=[tok.eos_token_id],
        )
        # One thread and no cache, so that each compile is measured from scratch like the others.
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, case: Case) -> Any:
        # Compiling precomputes xgrammar's adaptive token-mask cache over the whole vocabulary.
        if case.kind == "json":
            return self.compiler.compile_json_schema(json.dumps(case.grammar))
        if case.kind == "regex":
            return self.compiler.compile_regex(case.grammar)
        return self.compiler.compile_lark(case.grammar)

    def new_matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill_fn(self, matcher: Any, buf: np.ndarray) -> Callable[[], Any]:
        return functools.partial(matcher.fill_next_token_bitmask, buf.reshape(1, -1))

    def advance(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)


class OutlinesCore(Backend):
    name = package = "outlines-core"

    def __init__(self, tok: Any, compile_timeout: float) -> None:
        super().__init__(tok, compile_timeout)
        start = time.perf_counter()
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.import_s = time.perf_counter() - start
        self.oc = outlines_core
        self.build_regex_from_schema = build_regex_from_schema
        # Raw token bytes -> ids. Special tokens are left out (outlines-core has no notion of
        # them; kept, "<|im_start|>" would be a legal piece of a JSON string); EOS is given apart.
        tokens: dict[bytes, list[int]] = {}
        for token_id in range(tok.vocab_size):
            if token_id not in tok.all_special_ids:
                tokens.setdefault(tok.token_bytes(token_id), []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(tok.eos_token_id, tokens)

    def compile(self, case: Case) -> Any:
        if case.kind == "lark":
            raise Unsupported("no context-free grammars")
        # The schema becomes one regex, then a DFA walked against the whole vocabulary up front.
        regex = self.build_regex_from_schema(json.dumps(case.grammar)) if case.kind == "json" else case.grammar
        return self.oc.Index(regex, self.vocabulary)

    def _compile_in_child(self, case: Case, conn: Any) -> None:
        try:
            compiled, seconds = super().timed_compile(case)
            conn.send(("ok", pickle.dumps(compiled), seconds))
        except BaseException as exc:  # noqa: BLE001 - pyo3 panics are BaseExceptions
            conn.send(("error", f"{type(exc).__name__}: {exc}", 0.0))
        finally:
            conn.close()

    def timed_compile(self, case: Case) -> tuple[Any, float]:
        """Index construction can take minutes on a large schema (its DFA grows with the optional
        properties and alternatives), and native code cannot be interrupted: it runs in a forked
        child under the time limit, which times itself and sends the pickled Index back."""
        if case.kind == "lark":
            raise Unsupported("no context-free grammars")
        ctx = multiprocessing.get_context("fork")
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=self._compile_in_child, args=(case, sender), daemon=True)
        child.start()
        sender.close()
        try:
            if not receiver.poll(self.compile_timeout):
                child.kill()
                raise TimeoutError(f"Index not built within {self.compile_timeout:g} s (stopped)")
            status, payload, seconds = receiver.recv()
        except EOFError:
            raise RuntimeError(f"compiling process died (exit code {child.exitcode})") from None
        finally:
            child.join()
            receiver.close()
        if status != "ok":
            raise RuntimeError(payload)
        return pickle.loads(payload), seconds

    def new_matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill_fn(self, matcher: Any, buf: np.ndarray) -> Callable[[], Any]:
        return functools.partial(matcher.write_mask_into, buf.ctypes.data, buf.size, 4)

    def advance(self, matcher: Any, token: int) -> bool:
        matcher.advance(token, return_tokens=False)  # raises on a token it does not allow
        return True


BACKENDS = {b.name: b for b in (LLGuidance, XGrammar, OutlinesCore)}


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class Result:
    compiled: bool = False
    error: str = ""  # the compile error, or "n/a: ..." when the backend has no such grammar kind
    compile_ms: list[float] = field(default_factory=list)
    mask_ns: list[int] = field(default_factory=list)
    first_mask_ns: Optional[int] = None
    allowed: list[int] = field(default_factory=list)
    walk_failure: str = ""
    enforced: Optional[bool] = None  # refused the counterexample


def _short(message: str, width: int = 70) -> str:
    line = " ".join(str(message).split()).replace("|", "/")  # keep the Markdown table intact
    return line if len(line) <= width else line[: width - 1] + "…"


def _allowed(buf: np.ndarray, token: int) -> bool:
    return bool((int(buf[token >> 5]) >> (token & 31)) & 1)


def walk(backend: Backend, compiled: Any, ids: list[int], buf: np.ndarray, result: Optional[Result]) -> str:
    """One pass over `ids` with a fresh matcher: mask, check the next token (EOS after the last),
    advance. With a result, the mask calls are timed into it (and nothing else is timed).
    Returns "" when every token and the final EOS were allowed, else what was refused."""
    matcher = backend.new_matcher(compiled)
    fill = backend.fill_fn(matcher, buf)
    clock = time.perf_counter_ns
    first = result is not None and result.first_mask_ns is None
    for pos, token in enumerate([*ids, backend.eos]):
        buf.fill(0)  # untimed: a backend that wrote nothing would then allow nothing
        start = clock()
        fill()
        elapsed = clock() - start
        if result is not None:
            result.mask_ns.append(elapsed)
            if first:
                if pos == 0:
                    result.first_mask_ns = elapsed
                result.allowed.append(int(np.unpackbits(buf.view(np.uint8)).sum()))
        if not _allowed(buf, token):
            refused = "EOS" if token == backend.eos else f"token {pos} {backend.tok.token_bytes(token)!r}"
            return f"mask refuses {refused}"
        if token == backend.eos:
            return ""
        try:
            if not backend.advance(matcher, token):
                return f"advance refused token {pos}"
        except Exception as exc:  # noqa: BLE001 - report it, don't stop the benchmark
            return f"advance raised at token {pos}: {exc}"
    return ""


def measure(backend: Backend, case: Case, ids: list[int], bad_ids: list[int], walks: int, reps: int) -> Result:
    result = Result()
    compiled = None
    for rep in range(reps):
        try:
            compiled, seconds = backend.timed_compile(case)
        except Unsupported as exc:
            result.error = f"n/a: {exc}"
            return result
        except BaseException as exc:  # noqa: BLE001 - pyo3 panics are BaseExceptions
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            result.error = _short(f"{type(exc).__name__}: {exc}")
            return result
        result.compile_ms.append(seconds * 1e3)
        if rep == 0 and seconds > 2:  # a slow compile is measured once
            break
    result.compiled = True
    buf = np.zeros((backend.vocab_size + 31) // 32, dtype=np.int32)
    for _ in range(walks):
        failure = walk(backend, compiled, ids, buf, result)
        if failure:
            result.walk_failure = _short(failure)
            break
    result.enforced = bool(walk(backend, compiled, bad_ids, buf, None))
    return result


def _us(ns: float) -> str:
    return f"{ns / 1e3:.1f}"


def _p99(values: list[int]) -> float:
    return float(np.percentile(values, 99))


def load_tokenizer() -> Any:
    from heron.models.bundled import default_chat_model_path
    from heron.models.gguf import GGUFFile
    from heron.models.tokenizer import Tokenizer

    return Tokenizer.from_gguf(GGUFFile(default_chat_model_path()).metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--walks", type=int, default=3, help="timed passes over each instance (fresh matcher each)")
    parser.add_argument("--compile-reps", type=int, default=3, help="compiles per case (median reported)")
    parser.add_argument("--compile-timeout", type=float, default=10.0,
                        help="seconds before an outlines-core Index build is stopped and reported as a failure")
    parser.add_argument("--cases", default="", help="comma-separated substrings of the case names to run")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backend names")
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args()
    walks = args.walks

    wall = time.perf_counter()
    cases = make_cases()
    if args.cases:
        wanted = [s.strip() for s in args.cases.split(",") if s.strip()]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    tok = load_tokenizer()
    ids = {c.name: tok.encode(c.text(c.instance), add_special_tokens=False) for c in cases}
    bad_ids = {c.name: tok.encode(c.text(c.bad), add_special_tokens=False) for c in cases}

    notes = [f"instance check: {p}" for p in check_instances(cases)]
    backends: list[Backend] = []
    setup_ms: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in [n.strip() for n in args.backends.split(",") if n.strip()]:
        start = time.perf_counter()
        try:
            backend = BACKENDS[name](tok, args.compile_timeout)
        except Exception as exc:  # noqa: BLE001 - a missing or broken backend is skipped
            skipped[name] = _short(f"{type(exc).__name__}: {exc}", 100)
            continue
        setup_ms[name] = (time.perf_counter() - start) * 1e3 - backend.import_s * 1e3
        # Untimed warm-up, so that one-off process costs (first allocations, lazy statics) do not
        # land on whichever case comes first.
        measure(backend, WARM_UP, tok.encode(WARM_UP.text(WARM_UP.instance), add_special_tokens=False),
                tok.encode(WARM_UP.text(WARM_UP.bad), add_special_tokens=False), walks=1, reps=1)
        backends.append(backend)

    results: dict[tuple[str, str], Result] = {}
    for case in cases:
        for backend in backends:
            start = time.perf_counter()
            results[(case.name, backend.name)] = measure(
                backend, case, ids[case.name], bad_ids[case.name], args.walks, args.compile_reps
            )
            if args.verbose:
                print(f"{case.name} / {backend.name}: {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)

    print(
        f"\nTokenizer: SmolLM2-135M-Instruct (GGUF), byte-level BPE, vocab {tok.vocab_size}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; compile ms = median of {args.compile_reps}; "
        f"mask µs over {args.walks} walk(s) of each instance; allowed = mean allowed tokens per mask; "
        "refuses bad = the counterexample is refused.\n"
    )
    print("| case | tokens | backend | compiles | compile ms | first mask µs | mask median µs | mask p99 µs "
          "| allowed | walk | refuses bad |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for case in cases:
        for backend in backends:
            r = results[(case.name, backend.name)]
            head = f"| {case.name} | {len(ids[case.name])} | {backend.name} |"
            if not r.compiled:
                print(f"{head} {r.error if r.error.startswith('n/a') else 'no: ' + r.error} | | | | | | | |")
                continue
            masks = f"{_us(r.first_mask_ns)} | {_us(statistics.median(r.mask_ns))} | {_us(_p99(r.mask_ns))}"
            walked = "ok" if not r.walk_failure else f"FAIL: {r.walk_failure}"
            print(
                f"{head} yes | {statistics.median(r.compile_ms):.2f} | {masks} | "
                f"{statistics.mean(r.allowed):,.0f} | {walked} | {'yes' if r.enforced else 'NO'} |"
            )

    json_cases = [c for c in cases if c.kind == "json"]
    common = [
        c for c in json_cases
        if all(results[(c.name, b.name)].compiled and not results[(c.name, b.name)].walk_failure for b in backends)
    ]
    print(
        f"\nSummary. Compiled / walked / refused-bad count the {len(json_cases)} JSON Schemas. Compile and mask "
        f"figures are over the {len(common)} schemas every backend here compiled and walked "
        f"({', '.join(c.name for c in common) or 'none'}): compile = median of the per-schema medians, "
        "masks pooled over all their walks; request ms = median over those schemas of compile + all the "
        "masks of one walk (a request bringing a schema not seen before). Import ms: torch was already "
        "loaded by Heron's GGUF reader.\n"
    )
    print("| backend | version | schemas compiled | instances walked ok | counterexamples refused | regex / Lark "
          "| median compile ms | median mask µs | p99 mask µs | request ms | import ms | tokenizer setup ms |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for backend in backends:
        rs = [results[(c.name, backend.name)] for c in json_cases]
        others = []
        for c in cases:
            if c.kind != "json":
                r = results[(c.name, backend.name)]
                others.append("n/a" if r.error.startswith("n/a") else
                              "ok" if r.compiled and not r.walk_failure and r.enforced else "fail")
        common_rs = [results[(c.name, backend.name)] for c in common]
        masks = [ns for r in common_rs for ns in r.mask_ns]
        compile_ms = f"{statistics.median(statistics.median(r.compile_ms) for r in common_rs):.2f}" if common_rs else ""
        mask_cols = f"{_us(statistics.median(masks))} | {_us(_p99(masks))}" if masks else " | "
        # One request with a new schema: compile it, then one mask per token of the instance.
        per_request = [statistics.median(r.compile_ms) + sum(r.mask_ns) / walks / 1e6 for r in common_rs]
        request_ms = f"{statistics.median(per_request):.2f}" if per_request else ""
        n = len(json_cases)
        print(
            f"| {backend.name} | {backend.version} | {sum(r.compiled for r in rs)} / {n} "
            f"| {sum(r.compiled and not r.walk_failure for r in rs)} / {n} | {sum(bool(r.enforced) for r in rs)} / {n} "
            f"| {' '.join(others)} | {compile_ms} | {mask_cols} | {request_ms} | {backend.import_s * 1e3:.0f} "
            f"| {setup_ms[backend.name]:.0f} |"
        )
    for name in skipped:
        print(f"| {name} | skipped | | | | | | | | | | |")
    if any(c.kind != "json" for c in cases):
        print(f"\nregex / Lark column, in order: {', '.join(c.name for c in cases if c.kind != 'json')} "
              "(ok = compiled, instance walked, counterexample refused).")
    for name, why in skipped.items():
        print(f"\nNote: {name} skipped, not importable or not usable: {why}")
    for note in notes:
        print(f"\nNote: {note}")
    print(f"\nTotal run time {time.perf_counter() - wall:.1f} s.")


if __name__ == "__main__":
    main()
