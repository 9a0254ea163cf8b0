"""ForwardBatch: the tensors one model step runs on, passed explicitly to every layer.

A batch is a flat run of tokens from several sequences. Decode sequences (one new token each) come
first, then prefill chunks, so the attention backend can treat the decodes as one padded group and
each prefill as a causal block. Index tensors are built once per step here and reused by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSpan:
    """One prefill chunk: tokens [start, end) of the batch, after `num_context` cached tokens."""

    start: int
    end: int
    num_context: int
    # Cache slots of the whole sequence so far (context + this chunk); None when the chunk has no
    # cached context, in which case attention reads the chunk's own K/V directly.
    slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # SDPA's causal mask over context + chunk, made on first use
    # For the CPU kernel, made by the first layer that needs them: each row's length (its context
    # and itself), and the slot list every row reads.
    row_lens: torch.Tensor | None = None
    row_slots: torch.Tensor | None = None


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    logits_indices: torch.Tensor  # rows of the hidden states that need logits
    num_decodes: int = 0
    prefills: list[PrefillSpan] = field(default_factory=list)
    # Per layer (k_cache, v_cache), each [num_slots, num_kv_heads, head_dim]; None: no KV cache.
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    slot_mapping: torch.Tensor | None = None  # [num_tokens] cache slot of each new token
    decode_slots: torch.Tensor | None = None  # [num_decodes, max_len] slots to gather
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_len] True = attend
    decode_lens: torch.Tensor | None = None  # [num_decodes] positions each decode attends to

    @classmethod
    def for_sequences(cls, sequences: list[list[int]], device: torch.device | str = "cpu") -> "ForwardBatch":
        """A cache-free batch of whole sequences (scoring, parity tests): logits for every token."""
        ids, positions, prefills = [], [], []
        for seq in sequences:
            start = len(ids)
            ids.extend(seq)
            positions.extend(range(len(seq)))
            prefills.append(PrefillSpan(start, len(ids), 0))
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            logits_indices=torch.arange(len(ids), device=device),
            prefills=prefills,
        )
