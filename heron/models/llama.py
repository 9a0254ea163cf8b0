"""Llama-family decoder (Llama 2/3, SmolLM, Mistral), the base the Qwen models extend.

Q/K/V and gate/up projections are fused into one matrix each (fewer, larger matmuls, which matters
on a 2-core CPU); `load_weights` fills the fused matrices from Hugging Face's separate tensors.
`prepare(device, dtype)` chooses, once, the attention backend (heron.worker.attention) and the
elementwise ops (heron.models.layers.decoder_ops) the model runs with there, so each layer has one
code path. `forward` returns hidden states for the whole batch; `compute_logits` projects only the
rows the sampler needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from heron.models.arch_config import ArchConfig
from heron.models.layers.decoder_ops import DecoderOps
from heron.models.layers.linear import Linear
from heron.models.layers.norm import RMSNorm
from heron.models.layers.quantized import Embedding, QuantizedTensor
from heron.models.layers.rotary import RotaryEmbedding
from heron.worker.attention import AttentionBackend, AttentionLayer, choose_backend
from heron.worker.forward_batch import ForwardBatch

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DecoderStep:
    """What every layer of one forward reads, made once per forward: the model's ops and attention
    backend, the RoPE inputs for the batch's positions, and the backend's metadata for the batch."""

    ops: DecoderOps
    rope: tuple[torch.Tensor, ...]
    attention: AttentionBackend
    metadata: Any


class LlamaAttention(nn.Module):
    def __init__(self, config: ArchConfig, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.attn = AttentionLayer(self.num_heads, self.num_kv_heads, self.head_dim)

    def project_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for per-head transforms before RoPE (Qwen3's Q/K norm); identity here."""
        return q, k

    def forward(self, x: torch.Tensor, step: DecoderStep, kv_cache: KVCache | None) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = step.ops.rotate(*self.project_qk(q, k), step.rope)
        return self.o_proj(step.attention.forward(self.attn, q, k, v, kv_cache, step.metadata))


class LlamaMLP(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: DecoderOps) -> torch.Tensor:
        return self.down_proj(ops.gated_act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_class = LlamaAttention

    def __init__(self, config: ArchConfig, layer_idx: int):
        super().__init__()
        self.self_attn = self.attention_class(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, step: DecoderStep, kv_cache: KVCache | None) -> torch.Tensor:
        x, h = step.ops.add_rms_norm(x, None, self.input_layernorm)
        x, h = step.ops.add_rms_norm(x, self.self_attn(h, step, kv_cache), self.post_attention_layernorm)
        # x is this forward's own residual stream (the embedding rows, or a sum made above): no copy.
        return x.add_(self.mlp(h, step.ops))


class LlamaModel(nn.Module):
    def __init__(self, config: ArchConfig, layer_class: type[LlamaDecoderLayer]):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    layer_class = LlamaDecoderLayer
    # HF tensor name fragment -> (fused parameter, shard index) for fused projections.
    _fused_shards = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ArchConfig, rope_freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.layer_class)
        if config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            rope_freq_factors,
        )
        # Chosen by prepare(), once the device and dtype the model runs in are final.
        self.attention_backend: AttentionBackend | None = None
        self.decoder_ops: DecoderOps | None = None

    def prepare(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Choose the attention backend and decoder ops for running on `device` in `dtype`. The
        loader calls this once the model is materialised there; call it again after moving or
        casting the model. Raises ValueError for an activation Heron does not implement."""
        device = torch.device(device)
        self.attention_backend = choose_backend(device, dtype, self.config.head_dim)
        self.decoder_ops = DecoderOps.choose(self.config, device, dtype, self.rotary)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        if self.decoder_ops is None:
            raise RuntimeError("call prepare(device, dtype) before running the model")
        ops = self.decoder_ops
        step = DecoderStep(
            ops,
            ops.rope_inputs(self.rotary, batch.positions),
            self.attention_backend,
            self.attention_backend.build_metadata(batch),
        )
        kv_caches = batch.kv_caches if batch.kv_caches is not None else [None] * len(self.model.layers)
        x = self.model.embed_tokens(batch.input_ids)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, step, kv_cache)
        return ops.add_rms_norm(x, None, self.model.norm)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32 (the sampler's precision) for the given hidden rows."""
        if self.config.tie_word_embeddings and self.model.embed_tokens.packed is not None:
            return self.model.embed_tokens.project(hidden)
        return self.lm_head(hidden).float()

    @classmethod
    def module_of(cls, name: str) -> str:
        """The module a checkpoint tensor loads into: 'model.layers.0.self_attn.k_proj.weight' ->
        'model.layers.0.self_attn.qkv_proj' (fused projections share one module)."""
        module_name = name.rpartition(".")[0]
        for part, (fused, _) in cls._fused_shards.items():
            if module_name.endswith("." + part):
                return module_name[: -len(part)] + fused
        return module_name

    def _shard_sizes(self, fused: str) -> list[int]:
        attn = self.model.layers[0].self_attn
        if fused == "qkv_proj":
            return [attn.q_size, attn.kv_size, attn.kv_size]
        return [self.config.intermediate_size] * 2

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (HF name, tensor) pairs into the parameters, one tensor at a time.

        Raises ValueError naming any unexpected, misshapen or missing weight.
        """
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            module_name, _, kind = name.rpartition(".")
            shard, sizes = 0, None
            for part, (fused, index) in self._fused_shards.items():
                if module_name.endswith("." + part):
                    module_name = module_name[: -len(part)] + fused
                    shard, sizes = index, self._shard_sizes(fused)
                    break
            module = modules.get(module_name)
            with torch.no_grad():
                if isinstance(module, Linear):
                    sizes = sizes or [module.out_features]
                    if tensor.shape[0] != sizes[shard]:
                        raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {sizes[shard]} rows")
                    module.load_shard(kind, tensor, sum(sizes[:shard]))
                    loaded.add(f"{module_name}.{kind}#{shard}")
                elif isinstance(tensor, QuantizedTensor):
                    if not isinstance(module, Embedding):
                        raise ValueError(f"weight {name!r} cannot be kept as {tensor.qtype} blocks")
                    module.load_quantized(tensor)
                    loaded.add(f"{name}#0")
                elif name in params:
                    if params[name].shape != tensor.shape:
                        raise ValueError(
                            f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
                        )
                    params[name].copy_(tensor)
                    loaded.add(f"{name}#0")
                else:
                    raise ValueError(f"unexpected weight {name!r} for {self.config.architecture}")
        expected = set()
        for pname in params:
            module_name, _, kind = pname.rpartition(".")
            fused = module_name.rpartition(".")[2]
            count = len(self._shard_sizes(fused)) if fused in ("qkv_proj", "gate_up_proj") else 1
            expected.update(f"{pname}#{i}" for i in range(count))
        missing = sorted(self._checkpoint_name(key) for key in expected - loaded)
        if missing:
            raise ValueError(f"missing weights for {self.config.architecture}: {missing[:8]}")
        if self.config.tie_word_embeddings:
            # A table kept as blocks replaced the float parameter: tie again so the old one is freed.
            self.lm_head.weight = self.model.embed_tokens.weight
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()

    def _checkpoint_name(self, key: str) -> str:
        """'...qkv_proj.weight#1' -> '...k_proj.weight': name a missing shard as the checkpoint does."""
        pname, _, index = key.partition("#")
        module_name, _, kind = pname.rpartition(".")
        prefix, _, fused = module_name.rpartition(".")
        for part, (fused_name, shard) in self._fused_shards.items():
            if fused == fused_name and int(index) == shard:
                return f"{prefix}.{part}.{kind}"
        return pname
