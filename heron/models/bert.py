"""BERT encoder for embedding models (e.g. sentence-transformers all-MiniLM-L6-v2).

Owns `BertModel`: built from a parsed Hugging Face `config.json`, filled by `load_weights` from
(HF name, tensor) pairs, and run on padding-free packed batches. In: 1-D `input_ids`/`positions` of
sequences laid end to end plus their lengths. Out: last hidden states `[total_tokens, hidden]`.
Pooling into one vector per sequence lives in `heron.models.pooling`.

`BertForSequenceClassification` is the cross-encoder (reranker) form: the same encoder, then BERT's
pooler (tanh dense over each sequence's [CLS] state) and a linear classifier, giving one row of
`num_labels` logits per sequence; a query/document pair comes in as one sequence whose
`token_type_ids` are 0 up to the first [SEP] and 1 after it.

Layout choices: the query/key/value projections are fused into one `[3*hidden, hidden]` linear so
each layer runs one GEMM for them; all linears run on the packed tokens (no work on padding). Only
attention needs a `[batch, max_len]` grid, run through `F.scaled_dot_product_attention` with a
key-padding mask where lengths differ. On CPU, sequences are first sorted by length and cut into
a few buckets of similar length, so short inputs do not pay for a long neighbour's quadratic
attention; on GPU one grid is cheaper than the extra kernel launches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass(frozen=True)
class BertArchitecture:
    """The fields of a BERT `config.json` this encoder needs, validated once."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_hf_config(cls, config: dict) -> "BertArchitecture":
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"BERT position_embedding_type {position_type!r} is not supported (only 'absolute')"
            )
        hidden_act = config.get("hidden_act", "gelu")
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BERT hidden_act {hidden_act!r} is not supported")
        arch = cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            intermediate_size=int(config["intermediate_size"]),
            hidden_act=hidden_act,
            max_position_embeddings=int(config.get("max_position_embeddings", 512)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        )
        if arch.hidden_size % arch.num_attention_heads:
            raise ValueError(
                f"hidden_size {arch.hidden_size} is not divisible by "
                f"num_attention_heads {arch.num_attention_heads}"
            )
        return arch


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm."""

    def __init__(self, arch: BertArchitecture):
        super().__init__()
        self.word_embeddings = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.position_embeddings = nn.Embedding(arch.max_position_embeddings, arch.hidden_size)
        # A few BERT variants drop segments entirely (type_vocab_size 0) and ship no such table.
        self.token_type_embeddings = (
            nn.Embedding(arch.type_vocab_size, arch.hidden_size) if arch.type_vocab_size else None
        )
        self.norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        table = self.token_type_embeddings
        if table is not None and token_type_ids is None:
            # Single-segment input: every token is type 0, so add that row once by broadcasting
            # instead of gathering it per token.
            x = x + table.weight[0]
        elif table is not None:
            x = x + table(token_type_ids)
        return self.norm(x)


# A sequence joins the current attention bucket while its length is at least this fraction of the
# bucket's longest: attention work grows with the square of the padded length, so a looser bound
# wastes compute on padding and a tighter one adds buckets (one SDPA call each, per layer).
_BUCKET_MIN_FILL = 0.75
# Sequences this short are cheaper to pad than to give their own SDPA call.
_BUCKET_SMALL_LEN = 32


def _bucket_by_length(device: torch.device) -> bool:
    # On a GPU at embedding-batch sizes the forward is bound by kernel launches, not by padded
    # attention work; on an H100 length buckets gave no steady gain and sometimes cost 2-3x, so
    # they are a CPU measure only.
    return device.type == "cpu"


def _group_by_length(seq_lens: list[int]) -> list[list[int]]:
    """Sequence indices, longest first, cut into buckets of similar length."""
    groups: list[list[int]] = []
    longest = 0
    for seq in sorted(range(len(seq_lens)), key=lambda i: -seq_lens[i]):
        n = seq_lens[seq]
        if groups and (n >= _BUCKET_MIN_FILL * longest or longest <= _BUCKET_SMALL_LEN):
            groups[-1].append(seq)
        else:
            groups.append([seq])
            longest = n
    return groups


@dataclass(frozen=True)
class _AttentionBucket:
    """Sequences attended together as one padded `[num_seqs, max_len]` grid.

    Its tokens are the contiguous rows `start:end` of the (length-sorted) packed batch.
    `slot_index` and `key_mask` are None when every sequence in it has the same length: the rows
    then already are the grid and need no scatter, gather or mask.
    """

    start: int
    end: int
    num_seqs: int
    max_len: int
    slot_index: torch.Tensor | None  # [end - start] slot of each token in the flattened grid
    key_mask: torch.Tensor | None  # [num_seqs, 1, 1, max_len], True where a key is a real token

    def attend(self, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        """This bucket's packed `[tokens, 3*hidden]` rows -> attention output `[tokens, hidden]`."""
        b, l = self.num_seqs, self.max_len
        if self.slot_index is None:
            grid = qkv.view(b, l, -1)
        else:
            # Zero padding keeps masked value rows finite (0 * NaN would still poison the sum).
            grid = qkv.new_zeros(b * l, qkv.shape[-1]).index_copy_(0, self.slot_index, qkv)
        q, k, v = grid.view(b, l, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.key_mask)  # [b, heads, l, d]
        out = out.transpose(1, 2).reshape(b * l, -1)
        return out if self.slot_index is None else out.index_select(0, self.slot_index)


@dataclass(frozen=True)
class _AttentionPlan:
    """How a packed batch is split into attention buckets; built once per forward.

    Sequences are sorted by length so that each bucket is a contiguous run of rows: the encoder
    permutes tokens once on entry (`token_order`) and restores the caller's order once on exit
    (`inverse_order`). Both are None when no reordering is needed.
    """

    buckets: tuple[_AttentionBucket, ...]
    token_order: torch.Tensor | None
    inverse_order: torch.Tensor | None

    @classmethod
    def build(cls, seq_lens: list[int], device: torch.device) -> "_AttentionPlan":
        groups = _group_by_length(seq_lens) if _bucket_by_length(device) else []
        if len(groups) <= 1:
            groups = [list(range(len(seq_lens)))]  # one bucket: the input order is already fine
        seq_order = [seq for group in groups for seq in group]

        # Index tensors are built on the host from Python ints and copied over once, so nothing is
        # ever read back from the device.
        lens = torch.tensor(seq_lens)
        token_order = inverse_order = None
        if seq_order != list(range(len(seq_lens))):
            sorted_lens = lens[seq_order]
            seq_starts = (torch.cumsum(lens, 0) - lens)[seq_order]
            sorted_starts = torch.cumsum(sorted_lens, 0) - sorted_lens
            order = torch.arange(int(lens.sum())) + torch.repeat_interleave(
                seq_starts - sorted_starts, sorted_lens
            )
            token_order = order.to(device)
            inverse_order = torch.argsort(order).to(device)

        buckets = []
        start = 0
        for group in groups:
            group_lens = lens[group]
            num_tokens, max_len = int(group_lens.sum()), int(group_lens.max())
            slot_index = key_mask = None
            if int(group_lens.min()) != max_len:
                local_seq = torch.repeat_interleave(torch.arange(len(group)), group_lens)
                group_starts = torch.cumsum(group_lens, 0) - group_lens
                offset = torch.arange(num_tokens) - group_starts[local_seq]
                slot_index = (local_seq * max_len + offset).to(device)
                mask = torch.arange(max_len)[None, :] < group_lens[:, None]
                key_mask = mask[:, None, None, :].to(device)
            end = start + num_tokens
            buckets.append(
                _AttentionBucket(start, end, len(group), max_len, slot_index, key_mask)
            )
            start = end
        return cls(tuple(buckets), token_order, inverse_order)

    def attend(self, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        outs = [bucket.attend(qkv[bucket.start : bucket.end], num_heads) for bucket in self.buckets]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class BertLayer(nn.Module):
    """One post-LayerNorm transformer block: bidirectional self-attention, then the MLP."""

    def __init__(self, arch: BertArchitecture):
        super().__init__()
        hidden = arch.hidden_size
        self.num_heads = arch.num_attention_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=arch.layer_norm_eps)
        self.ffn_up = nn.Linear(hidden, arch.intermediate_size)
        self.ffn_down = nn.Linear(arch.intermediate_size, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=arch.layer_norm_eps)
        self.act = _ACTIVATIONS[arch.hidden_act]

    def forward(self, x: torch.Tensor, plan: _AttentionPlan) -> torch.Tensor:
        attn = plan.attend(self.qkv(x), self.num_heads)
        h = self.attn_norm(x + self.attn_out(attn))
        return self.ffn_norm(h + self.ffn_down(self.act(self.ffn_up(h))))


# Checkpoint entries that are not part of the encoder: BERT's pooler (a tanh dense over [CLS], which
# sentence-transformers pooling never uses), the task heads of BertFor* checkpoints, and the
# position_ids buffer older transformers versions saved alongside the weights.
_IGNORED_WEIGHTS = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$)")

_LAYER_WEIGHT = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")

# HF sub-module path inside a layer -> (our sub-module, shard index within a fused qkv or None)
_LAYER_PARTS: dict[str, tuple[str, int | None]] = {
    "attention.self.query": ("qkv", 0),
    "attention.self.key": ("qkv", 1),
    "attention.self.value": ("qkv", 2),
    "attention.output.dense": ("attn_out", None),
    "attention.output.LayerNorm": ("attn_norm", None),
    "intermediate.dense": ("ffn_up", None),
    "output.dense": ("ffn_down", None),
    "output.LayerNorm": ("ffn_norm", None),
}

_EMBEDDING_PARTS = {
    "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
}


class BertModel(nn.Module):
    """BERT encoder over padding-free packed batches; returns last hidden states."""

    def __init__(self, config: dict):
        super().__init__()
        self.arch = BertArchitecture.from_hf_config(config)
        self.embeddings = BertEmbeddings(self.arch)
        self.layers = nn.ModuleList(
            BertLayer(self.arch) for _ in range(self.arch.num_hidden_layers)
        )

    @property
    def hidden_size(self) -> int:
        return self.arch.hidden_size

    @property
    def max_position_embeddings(self) -> int:
        return self.arch.max_position_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: list[int],
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not seq_lens or min(seq_lens) <= 0:
            raise ValueError(f"seq_lens must be non-empty positive lengths, got {seq_lens}")
        if sum(seq_lens) != input_ids.shape[0]:
            raise ValueError(
                f"seq_lens sum to {sum(seq_lens)} but input_ids holds {input_ids.shape[0]} tokens"
            )
        # Checked on the host-side lengths: an out-of-range position would otherwise surface as a
        # device-side assert on CUDA, which poisons the whole process.
        if max(seq_lens) > self.arch.max_position_embeddings:
            raise ValueError(
                f"a sequence of {max(seq_lens)} tokens exceeds max_position_embeddings "
                f"{self.arch.max_position_embeddings}"
            )
        plan = _AttentionPlan.build(seq_lens, input_ids.device)
        if plan.token_order is not None:
            input_ids = input_ids.index_select(0, plan.token_order)
            positions = positions.index_select(0, plan.token_order)
            if token_type_ids is not None:
                token_type_ids = token_type_ids.index_select(0, plan.token_order)
        x = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.layers:
            x = layer(x, plan)
        if plan.inverse_order is not None:
            x = x.index_select(0, plan.inverse_order)
        return x

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into this module, one at a time, then check nothing is missing.

        Each tensor is copied into the already-allocated parameter (converting dtype and device on
        the way) and released before the next one is read, so peak memory stays about one model.
        """
        params = dict(self.named_parameters())
        # (our parameter name, shard) pairs still to be filled; fused qkv needs all three shards.
        pending: set[tuple[str, int | None]] = set()
        for name, param in params.items():
            if ".qkv." in name:
                pending.update((name, shard) for shard in range(3))
            else:
                pending.add((name, None))

        unexpected: list[str] = []
        for hf_name, tensor in weights:
            target = self._map_hf_name(hf_name)
            if target is None:
                if not _IGNORED_WEIGHTS.match(self._strip_prefix(hf_name)):
                    unexpected.append(hf_name)
                del tensor
                continue
            name, shard = target
            param = params.get(name)
            if param is None:
                unexpected.append(hf_name)
                del tensor
                continue
            dest = param.data
            if shard is not None:
                rows = param.shape[0] // 3
                dest = dest[shard * rows : (shard + 1) * rows]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)} for {name}"
                )
            dest.copy_(tensor)
            pending.discard((name, shard))
            del tensor

        problems = []
        if pending:
            missing = sorted(n if s is None else f"{n}[{'qkv'[s]}]" for n, s in pending)
            problems.append(f"missing weights: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected weights: {', '.join(sorted(unexpected))}")
        if problems:
            raise ValueError("BERT checkpoint does not match the model; " + "; ".join(problems))

    @staticmethod
    def _strip_prefix(hf_name: str) -> str:
        return hf_name.removeprefix("bert.")

    def _map_hf_name(self, hf_name: str) -> tuple[str, int | None] | None:
        """HF checkpoint name -> (our parameter name, qkv shard), or None if it is not ours."""
        name = self._strip_prefix(hf_name)
        # Checkpoints converted from the original TensorFlow BERT call LayerNorm affine params
        # gamma/beta.
        if name.endswith(".gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[: -len("beta")] + "bias"
        if name in _EMBEDDING_PARTS:
            return _EMBEDDING_PARTS[name], None
        match = _LAYER_WEIGHT.match(name)
        if match is None:
            return None
        layer, part, kind = match.groups()
        if part not in _LAYER_PARTS:
            return None
        ours, shard = _LAYER_PARTS[part]
        return f"layers.{layer}.{ours}.{kind}", shard


def num_labels_of(config: dict) -> int:
    """How many logits a BertForSequenceClassification config gives: transformers writes `id2label`
    (num_labels is derived from it), older files may carry `num_labels` itself."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return int(config.get("num_labels", 2))


class BertForSequenceClassification(BertModel):
    """A BERT cross-encoder: the encoder's last hidden states (`forward`, as `BertModel`), then
    `classify` turns each sequence's [CLS] state into `num_labels` logits, as Hugging Face's
    BertForSequenceClassification does (pooler dense + tanh, then the classifier; dropout is a
    no-op at inference)."""

    def __init__(self, config: dict):
        super().__init__(config)
        self.num_labels = num_labels_of(config)
        if self.num_labels < 1:
            raise ValueError(f"BertForSequenceClassification needs at least one label, got {self.num_labels}")
        hidden = self.arch.hidden_size
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, self.num_labels)

    def classify(self, hidden: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """Packed last hidden states `[total_tokens, hidden]` -> logits `[num_seqs, num_labels]`."""
        lens = torch.tensor(seq_lens, device=hidden.device)
        cls_rows = hidden.index_select(0, torch.cumsum(lens, 0) - lens)  # each sequence's first token
        return self.classifier(torch.tanh(self.pooler(cls_rows)))

    def _map_hf_name(self, hf_name: str) -> tuple[str, int | None] | None:
        name = self._strip_prefix(hf_name)
        # Here the pooler and the classifier are weights of ours, not a head to skip.
        if name in _HEAD_PARTS:
            return _HEAD_PARTS[name], None
        return super()._map_hf_name(hf_name)


_HEAD_PARTS = {
    "pooler.dense.weight": "pooler.weight",
    "pooler.dense.bias": "pooler.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
