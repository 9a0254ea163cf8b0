"""Structured outputs: grammars compiled from JSON Schema / regex / choice / Lark, and the token masks
they put on the sampler (heron.structured.bitmask)."""

from heron.structured.compiler import CompiledGrammar, GrammarCompiler, GrammarError

__all__ = ["CompiledGrammar", "GrammarCompiler", "GrammarError"]
