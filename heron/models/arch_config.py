"""ArchConfig: a decoder model's hyperparameters, read from a HF config.json or GGUF metadata.

Both sources are normalised to Hugging Face's names so that model code reads one shape of config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# GGUF `general.architecture` -> the Hugging Face architecture name Heron registers.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Hugging Face rope_scaling dict (rope_type + its parameters); None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ArchConfig":
        architectures = config.get("architectures") or []
        architecture = architectures[0] if architectures else _arch_from_model_type(config)
        num_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        # transformers >= 5 writes rope_parameters (with rope_theta inside); 4.x writes
        # rope_theta and rope_scaling at top level.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        defaults = _ARCH_DEFAULTS.get(architecture, {})
        return cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", defaults.get("attention_bias", False))),
            hidden_act=config.get("hidden_act", "silu"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_gguf(cls, gguf_file, has_output_weight: bool) -> "ArchConfig":
        arch = gguf_file.architecture
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {arch!r}")
        value = gguf_file.arch_value
        num_heads = value("attention.head_count")
        hidden = value("embedding_length")
        head_dim = value("attention.key_length") or value("rope.dimension_count") or hidden // num_heads
        tokens = gguf_file.metadata.get("tokenizer.ggml.tokens") or []
        rope_scaling = None
        scaling_type = value("rope.scaling.type")
        if scaling_type in ("linear", "yarn"):
            rope_scaling = {"rope_type": scaling_type, "factor": value("rope.scaling.factor")}
            if scaling_type == "yarn":
                rope_scaling["original_max_position_embeddings"] = value(
                    "rope.scaling.original_context_length"
                )
        eos = gguf_file.metadata.get("tokenizer.ggml.eos_token_id")
        architecture = GGUF_ARCHITECTURES[arch]
        return cls(
            architecture=architecture,
            vocab_size=value("vocab_size") or len(tokens),
            hidden_size=hidden,
            intermediate_size=value("feed_forward_length"),
            num_hidden_layers=value("block_count"),
            num_attention_heads=num_heads,
            num_key_value_heads=value("attention.head_count_kv") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=value("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=float(value("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=value("context_length", 2048),
            tie_word_embeddings=not has_output_weight,
            attention_bias=_ARCH_DEFAULTS.get(architecture, {}).get("attention_bias", False),
            bos_token_id=gguf_file.metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (eos,),
        )


# What a family always has, for sources (GGUF, old configs) that do not spell it out.
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "Qwen2ForCausalLM": {"attention_bias": True},
}


def _arch_from_model_type(config: dict[str, Any]) -> str:
    model_type = config.get("model_type", "")
    for name in GGUF_ARCHITECTURES.values():
        if name.lower().startswith(model_type.replace("_", "")):
            return name
    raise ValueError(f"config.json names no architecture (model_type={model_type!r})")
