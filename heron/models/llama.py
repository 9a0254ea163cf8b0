"""Llama-family decoder (Llama 2/3, SmolLM, Mistral), the base the Qwen models extend.

Q/K/V and gate/up projections are fused into one matrix each (fewer, larger matmuls, which matters
on a 2-core CPU); `load_weights` fills the fused matrices from Hugging Face's separate tensors.
`prepare(device, dtype)` chooses, once, the attention backend (heron.worker.attention) and the
elementwise ops (heron.models.layers.decoder_ops) the model runs with there, so each layer has one
code path. `forward` returns hidden states for the whole batch; `compute_logits` projects only the
rows the sampler needs.

Tensor parallelism (heron.distributed.parallel_state): built inside a rank of a group of N, each
layer holds its share and `load_weights` cuts it from the checkpoint's full tensors. Q/K/V and
gate/up are column-parallel (each rank its heads and MLP columns), O and down row-parallel (a slice
of their input, then an all-reduce of the partial sums); the embedding and LM head are
vocab-parallel (each rank a range of rows: a lookup outside it gives zeros and the all-reduce adds
the owner's row; logits are all-gathered). Norms and RoPE are replicated. At N=1 none of this runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from heron.distributed.parallel_state import TPLayout, get_tp
from heron.models.arch_config import ArchConfig
from heron.models.layers.decoder_ops import DecoderOps
from heron.models.layers.linear import Linear
from heron.models.layers.norm import RMSNorm
from heron.models.layers.quantized import Embedding, QuantizedTensor
from heron.models.layers.rotary import RotaryEmbedding
from heron.worker.attention import AttentionBackend, AttentionLayer, choose_backend
from heron.worker.forward_batch import ForwardBatch

KVCache = tuple[torch.Tensor, torch.Tensor]


def tp_layout(config: ArchConfig) -> TPLayout:
    """This process's share of a decoder of `config` (the whole of it outside tensor parallelism)."""
    tp = get_tp()
    return TPLayout(tp.rank, tp.size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                    config.intermediate_size, config.vocab_size)


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
        layout = tp_layout(config)
        self.tp = get_tp()
        self.num_heads = layout.local_heads
        self.num_kv_heads = layout.local_kv_heads
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
        return self.tp.all_reduce(self.o_proj(step.attention.forward(self.attn, q, k, v, kv_cache, step.metadata)))


class LlamaMLP(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        self.tp = get_tp()
        self.intermediate_size = tp_layout(config).local_intermediate
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = Linear(self.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: DecoderOps) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(ops.gated_act(self.gate_up_proj(x))))


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
        self.embed_tokens = Embedding(tp_layout(config).vocab_per_rank, config.hidden_size)
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
        self.tp = get_tp()
        self.layout = tp_layout(config)
        self.model = LlamaModel(config, self.layer_class)
        vocab_rows = self.layout.vocab_per_rank
        if config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, vocab_rows, bias=False)
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = Linear(config.hidden_size, vocab_rows, bias=False)
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
        x = self._embed(batch.input_ids)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, step, kv_cache)
        return ops.add_rms_norm(x, None, self.model.norm)[1]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.model.embed_tokens(ids)
        local = ids - self.layout.vocab_start
        outside = (local < 0) | (local >= self.layout.vocab_per_rank)
        x = self.model.embed_tokens(local.masked_fill(outside, 0))
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32 (the sampler's precision) for the given hidden rows."""
        if self.config.tie_word_embeddings and self.model.embed_tokens.packed is not None:
            logits = self.model.embed_tokens.project(hidden)
        else:
            logits = self.lm_head(hidden).float()
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits)[:, : self.config.vocab_size]

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
        return [self.model.layers[0].mlp.intermediate_size] * 2

    def _tp_slice(self, name: str, tensor: torch.Tensor | QuantizedTensor) -> torch.Tensor | QuantizedTensor:
        """This rank's share of a checkpoint tensor (see the module docstring)."""
        module_name = name.rpartition(".")[0]
        part = module_name.rpartition(".")[2]
        layout = self.layout
        if part in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            return _rows(tensor, *layout.rows(part))
        if part in ("o_proj", "down_proj"):
            if not name.endswith(".weight"):  # the all-reduce would add it once per rank
                raise ValueError(f"{name}: a bias on a row-parallel layer cannot be split over ranks")
            return _columns(name, tensor, *layout.columns(part), layout.size)
        if module_name in ("model.embed_tokens", "lm_head"):
            return _rows(tensor, layout.vocab_start, layout.vocab_per_rank, pad=True)
        return tensor

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
            if self.tp.size > 1:
                tensor = self._tp_slice(name, tensor)
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


def _rows(tensor: torch.Tensor | QuantizedTensor, start: int, count: int, pad: bool = False):
    """Rows start.. start + count of a [out, ...] tensor or block matrix; with `pad`, rows past its
    end are zeros (the last vocab-parallel rank's share of a vocabulary that does not split evenly)."""
    if isinstance(tensor, QuantizedTensor):
        blocks = _take_rows(tensor.blocks, start, count, pad)
        return QuantizedTensor(tensor.qtype, blocks, (blocks.shape[0], tensor.shape[1]))
    return _take_rows(tensor, start, count, pad)


def _take_rows(t: torch.Tensor, start: int, count: int, pad: bool) -> torch.Tensor:
    have = max(0, min(count, t.shape[0] - start))
    part = t[start : start + have]
    if pad and have < count:
        part = torch.cat([part, part.new_zeros(count - have, *t.shape[1:])])
    return part.contiguous()


def _columns(name: str, tensor: torch.Tensor | QuantizedTensor, start: int, count: int, size: int):
    """Input columns start.. start + count of a row-parallel weight [out, in]. GGML blocks run along
    a row, 32 values each: the cut must fall between blocks."""
    if not isinstance(tensor, QuantizedTensor):
        return tensor[:, start : start + count].contiguous()
    if start % 32 or count % 32:
        raise ValueError(
            f"--tensor-parallel-size {size} would cut {name} ({tensor.qtype}, blocks of 32 values) inside a block: "
            f"each rank's {count} input columns must be a multiple of 32"
        )
    per_block = tensor.blocks.shape[1] // (tensor.shape[1] // 32)
    blocks = tensor.blocks[:, start // 32 * per_block : (start + count) // 32 * per_block].contiguous()
    return QuantizedTensor(tensor.qtype, blocks, (tensor.shape[0], count))
