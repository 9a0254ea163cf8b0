"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the fused Q/K/V projection.

The bias comes from ArchConfig.attention_bias, which Qwen2 configs imply even when they do not say it.
"""

from __future__ import annotations

from heron.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
