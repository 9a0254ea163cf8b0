"""ForwardBatch: the host/tensor description of one model step, passed explicitly to the model.

A batch is a flat run of tokens from several sequences, in order: decodes first (one new token
after cached context each), then prefill chunks. Sequence i's tokens are positions
context_lens[i] .. context_lens[i] + query_lens[i] - 1. With `kv_caches`, each new token's K/V goes
to its `slot_mapping` slot and attention reads context and new tokens through the block tables;
without, attention is causal over each sequence's own tokens. What a backend derives from this
(slot tables, lengths, masks) it builds once per step in its own metadata (heron.worker.attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens] long
    positions: torch.Tensor  # [num_tokens] long
    logits_indices: torch.Tensor  # rows of the hidden states that need logits
    query_lens: list[int]  # new tokens of each sequence, in batch order
    context_lens: list[int]  # tokens of each sequence already in the KV cache before this step
    num_decodes: int = 0  # the leading sequences are decodes: query_len 1, context_len > 0
    block_tables: list[list[int]] | None = None  # physical block ids per sequence; None: cache-free batch
    block_size: int = 0
    # Per layer (k_cache, v_cache), each [num_slots, num_kv_heads, head_dim]; None: no KV cache.
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    # [num_tokens] long: cache slot of each new token (block_ids[p // block_size] * block_size + p % block_size).
    slot_mapping: torch.Tensor | None = None

    @classmethod
    def for_sequences(cls, sequences: list[list[int]], device: torch.device | str = "cpu") -> "ForwardBatch":
        """A cache-free batch of whole sequences (scoring, parity tests): logits for every token."""
        ids: list[int] = []
        positions: list[int] = []
        for seq in sequences:
            ids.extend(seq)
            positions.extend(range(len(seq)))
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            logits_indices=torch.arange(len(ids), device=device),
            query_lens=[len(seq) for seq in sequences],
            context_lens=[0] * len(sequences),
        )
