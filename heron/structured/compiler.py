"""GrammarCompiler: StructuredOutputsParams -> a compiled llguidance grammar, per model tokenizer.

llguidance was picked over xgrammar and outlines-core (see benchmarks/grammar_backends.py): it
has no runtime dependencies, covers JSON Schema, regex and context-free (Lark / GBNF) grammars, and
computes a full-vocabulary mask in tens of microseconds on this CPU. Compiling runs off the engine
thread (the server's requests go through heron.structured.pool): a large schema can take up to a
second, and an engine step must not wait for that. Compiled grammars are cached by their spec, so a client that
sends the same schema on every request pays once.

Compiling is bounded and fails closed: a spec must pass GrammarLimits (heron.structured.limits)
before llguidance sees it, llguidance runs under the same limits' parser fuel, and a compile that
would leave the output unconstrained (a grammar that matches no text, which the engine could only
drop, or a JSON grammar that allows any token) is refused rather than served.

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
from heron.structured.errors import GrammarError, GrammarLimitError
from heron.structured.limits import FLAGS, GrammarLimits, check_spec

_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# llguidance's messages when its parser limits stop a compile.
_LLG_LIMIT_MESSAGES = ("too big", "too many", "fuel", "too complex", "TooComplex", "limit")


@dataclass
class CompiledGrammar:
    """A validated grammar; `matcher()` hands each sequence its own state at the start."""

    spec: StructuredOutputsParams
    grammar: str
    _template: llguidance.LLMatcher

    def matcher(self) -> llguidance.LLMatcher:
        return self._template.deep_copy()


def grammar_source(spec: StructuredOutputsParams, schema: object = None) -> str:
    """The llguidance grammar text for a spec (not yet checked); `schema`: spec.json already parsed."""
    if spec.json is not None or spec.json_object:
        if schema is None:
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

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        cache_size: int = 256,
        limits: GrammarLimits = GrammarLimits(),
    ):
        self._tokenizer = tokenizer
        self.limits = limits
        self._parser_limits = limits.parser_limits()
        # The model's logits may be wider than the tokenizer's vocabulary (padded embeddings).
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    def prepare(self) -> None:
        """Build llguidance's view of the vocabulary now rather than in the first compile.

        It takes ~0.4 s for a 49k vocabulary and holds the GIL throughout, so built on a server's
        first structured request it would stall every stream for that long; the server calls this
        at start-up. Offline use (LLM) pays it on its first grammar instead.
        """
        self._llg_tokenizer()

    @property
    def prepared(self) -> bool:
        """Whether the vocabulary view is built (by `prepare` or a compile)."""
        return self._ll_tokenizer is not None

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos_token_ids
                )
            return self._ll_tokenizer

    def check(self, spec: StructuredOutputsParams) -> object:
        """Raise GrammarLimitError if `spec` exceeds the limits (cheap: no native code runs).

        Returns the JSON schema parsed (None for other forms). Call it before `spec.cache_key()`:
        writing the key of a schema too deep to compile would hit Python's recursion limit.
        """
        return check_spec(spec, self.limits)

    def cached(self, key: str) -> CompiledGrammar | None:
        """The compiled grammar cached under `key` (a checked spec's `cache_key()`), or None."""
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
            return found

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Raises GrammarError for a spec the compiler refuses (bad syntax, unsupported keyword,
        over a limit, or compiling to a grammar that would not constrain the output)."""
        schema = self.check(spec)
        key = spec.cache_key()
        return self.cached(key) or self.compile_checked(spec, schema, key)

    def compile_checked(self, spec: StructuredOutputsParams, schema: object, key: str) -> CompiledGrammar:
        """`compile` for a spec that passed `check` (which returned `schema`), cached under `key`:
        the compile pool checks on the event loop and compiles on its thread, each once."""
        grammar = grammar_source(spec, schema)
        tokenizer = self._llg_tokenizer()
        # No validate_grammar first: it builds the same grammar again (~1/3 more time for a large
        # schema), and the matcher reports the same errors.
        template = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=self._parser_limits)
        if not template.is_error():
            # The first mask builds the lexer's tables (shared by copies): pay for it here, not in a step.
            first = template.compute_bitmask()
        if template.is_error():
            raise self._refusal(template.get_error())
        self._check_constrains(spec, first)
        compiled = CompiledGrammar(spec, grammar, template)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _refusal(self, error: str) -> GrammarError:
        if "NoExtensionBias" in error:
            # The grammar accepts no text at all: a `$ref` cycle with no way out, a regex class that
            # matches nothing. The engine could only drop such a grammar mid-request (unconstrained).
            return GrammarError(
                "The spec matches no text at all (for example a $ref cycle with no base case, or a "
                "character class that matches nothing), so no output could satisfy it."
            )
        if "recursion limit exceeded" in error:
            # serde_json's fixed cap on how deep a JSON text nests (128 objects and arrays).
            return GrammarLimitError("The JSON schema's text nests more than 128 objects and arrays deep, more than the compiler reads.")
        if "number of symbols" in error:
            return GrammarLimitError(
                f"The grammar is too large: it expands to more than {self.limits.max_grammar_symbols} "
                f"symbols (the server's `heron serve {FLAGS['max_grammar_symbols']}` raises it)."
            )
        if any(word in error for word in _LLG_LIMIT_MESSAGES):
            return GrammarLimitError(f"The grammar needs more work to compile than the server allows: {_short(error)}")
        return GrammarError(_short(error))

    def _check_constrains(self, spec: StructuredOutputsParams, first_mask: bytes) -> None:
        # A JSON value or one of a few choices can start with few tokens; a first mask allowing most
        # of the vocabulary means the grammar lost its constraint somewhere (a lenient-mode schema
        # that dropped everything, say). A regex or grammar may really mean "any text": not checked.
        if spec.regex is not None or spec.grammar is not None:
            return
        allowed = int.from_bytes(first_mask, "little").bit_count()
        if allowed > self.vocab_size // 2:
            raise GrammarError(
                f"The spec compiled to a grammar that allows {allowed} of {self.vocab_size} tokens to "
                "start the output, which does not constrain it; it is refused rather than ignored."
            )


def _short(message: str, limit: int = 400) -> str:
    message = message.replace("<non-verbose/>", "")
    # llguidance's messages can run on with grammar excerpts; one bounded line is enough for a 400.
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    text = text or "the grammar is invalid"
    return text if len(text) <= limit else text[: limit - 3] + "..."
