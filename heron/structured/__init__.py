"""Structured outputs: grammars compiled from JSON Schema / regex / choice / Lark, and the token masks
they put on the sampler (heron.structured.bitmask). Compiles are checked against GrammarLimits
(heron.structured.limits) and run on a bounded GrammarCompilePool (heron.structured.pool)."""

from heron.structured.compiler import CompiledGrammar, GrammarCompiler
from heron.structured.errors import (
    GrammarBusyError,
    GrammarError,
    GrammarLimitError,
    GrammarPoolClosed,
    GrammarTimeoutError,
    GrammarUnavailable,
)
from heron.structured.limits import GrammarLimits
from heron.structured.pool import GrammarCompilePool

__all__ = [
    "CompiledGrammar",
    "GrammarBusyError",
    "GrammarCompilePool",
    "GrammarCompiler",
    "GrammarError",
    "GrammarLimitError",
    "GrammarLimits",
    "GrammarPoolClosed",
    "GrammarTimeoutError",
    "GrammarUnavailable",
]
