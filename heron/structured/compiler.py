"""GrammarCompiler: StructuredOutputsParams -> a compiled llguidance grammar, per model tokenizer.

llguidance was picked over xgrammar and outlines-core (see benchmarks/grammar_backends.py): it
has no runtime dependencies, covers JSON Schema, regex and context-free (Lark / GBNF) grammars, and
computes a full-vocabulary mask in tens of microseconds on this CPU. Compiling runs off the engine
thread (the server calls it through `asyncio.to_thread`): a large schema can take milliseconds, and
an engine step must not wait for that. Compiled grammars are cached by their spec, so a client that
sends the same schema on every request pays once.

JSON is generated compactly with one space after ':' and ',' (like `json.dumps`) instead of free
whitespace: a small model given free whitespace can spend its whole token budget on newlines.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import llguidance

from heron.models.tokenizer import Tokenizer
from heron.sampling_params import StructuredOutputsParams

_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The structured-output spec cannot be compiled; the message is fit to show a user."""


@dataclass
class CompiledGrammar:
    """A validated grammar; `matcher()` hands each sequence its own state at the start."""

    spec: StructuredOutputsParams
    grammar: str
    _template: llguidance.LLMatcher

    def matcher(self) -> llguidance.LLMatcher:
        return self._template.deep_copy()


def grammar_source(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar text for a spec (not yet checked)."""
    if spec.json is not None or spec.json_object:
        schema = {"type": "object"} if spec.json_object else spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"The JSON schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise GrammarError("The JSON schema must be a JSON object.")
        overrides = dict(_JSON_FORMAT)
        if not spec.strict:
            overrides["lenient"] = True
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=overrides)
        except ValueError as exc:
            raise GrammarError(f"The JSON schema cannot be used: {exc}") from exc
    if spec.regex is not None:
        # Rust's `\d` takes every Unicode digit; users of guided regex (vLLM, Outlines) expect [0-9].
        return llguidance.LLMatcher.grammar_from_lark("start: /" + llguidance.regex_to_lark(spec.regex, "d") + "/")
    if spec.choice is not None:
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    assert spec.grammar is not None
    try:
        # Lark passes through unchanged; llama.cpp's GBNF is translated to Lark.
        return llguidance.grammar_from("grammar", spec.grammar)
    except ValueError as exc:
        raise GrammarError(str(exc)) from exc


class GrammarCompiler:
    """Compiles and caches grammars for one model's tokenizer. Thread-safe."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 256):
        self._tokenizer = tokenizer
        # The model's logits may be wider than the tokenizer's vocabulary (padded embeddings).
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (~0.4 s for a 49k vocabulary), not at start-up.
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos_token_ids
                )
            return self._ll_tokenizer

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Raises GrammarError for a spec the compiler refuses (bad syntax, unsupported keyword)."""
        key = spec.cache_key()
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        grammar = grammar_source(spec)
        tokenizer = self._llg_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise GrammarError(_short(error))
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(_short(template.get_error()))
        # The first mask builds the lexer's tables (shared by copies): pay for it here, not in a step.
        template.compute_bitmask()
        compiled = CompiledGrammar(spec, grammar, template)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled


def _short(message: str, limit: int = 400) -> str:
    # llguidance's messages can run on with grammar excerpts; one bounded line is enough for a 400.
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    text = text or "the grammar is invalid"
    return text if len(text) <= limit else text[: limit - 3] + "..."
