"""Sampler: turns a batch of logits into next tokens, applying every per-request knob.

Order, as OpenAI/vLLM users expect: logprobs of the raw model distribution are taken first; then
penalties (repetition, frequency, presence), logit_bias, min_tokens (EOS and stop tokens masked),
the allowed-token mask from structured output; then greedy argmax, or temperature, top-k, top-p,
min-p and a draw. Seeded requests draw from their own torch.Generator, so a request's samples do not
depend on what else is in the batch. A row whose grammar mask allows no token raises
RequestFailedError (grammar_failed): structured outputs fail closed, never unconstrained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.engine.errors import grammar_failed
from heron.outputs import TokenLogprob
from heron.sampling_params import SamplingParams


_BITS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(packed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed allowed-token words (int32 [rows, ceil(vocab / 32)], bit j of word w: token 32w + j)
    -> bool [rows, vocab_size]."""
    bits = _BITS.to(packed.device)
    return ((packed.unsqueeze(-1) >> bits) & 1).bool().reshape(packed.shape[0], -1)[:, :vocab_size]


@dataclass
class SamplingRow:
    """What the sampler needs of one request for one step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: tuple[int, ...]
    generator: torch.Generator | None
    # Structured outputs: the tokens the row's grammar allows next (bool over the vocabulary).
    grammar_mask: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        p = row.params
        if not p.needs_penalties:
            continue
        device = logits.device
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), device=device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and row.output_token_ids:
            out = torch.tensor(row.output_token_ids, device=device)
            counts = torch.zeros(logits.shape[1], device=device).index_add_(0, out, torch.ones(len(out), device=device))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _apply_masks(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if 0 <= t < vocab], dtype=torch.long, device=logits.device)
            if len(ids):
                bias = torch.tensor([p.logit_bias[t] for t in ids.tolist()], device=logits.device)
                logits[i, ids] += bias
        banned = []
        if len(row.output_token_ids) < p.min_tokens:
            banned = [t for t in (*(() if p.ignore_eos else row.eos_token_ids), *p.stop_token_ids) if t < vocab]
        if row.grammar_mask is not None:
            if not row.grammar_mask.any():
                # A grammar that allows nothing is broken; sampling past it would be unconstrained.
                raise grammar_failed("the grammar allows no next token")
            allowed = row.grammar_mask.to(logits.device)
            if banned and not allowed.clone().index_fill_(0, torch.tensor(banned, device=allowed.device), False).any():
                # The grammar is complete and allows only an end token: it wins over min_tokens.
                banned = []
            logits[i].masked_fill_(~allowed, float("-inf"))
        if banned:
            logits[i, banned] = float("-inf")
        if p.allowed_tokens_fn is not None:
            allowed = p.allowed_tokens_fn(row.output_token_ids)
            if allowed is not None:
                logits[i].masked_fill_(~allowed[:vocab].to(logits.device), float("-inf"))


def _filter_top_k_top_p_min_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Mask out tokens outside each row's top-k / nucleus / min-p set (rows with no filter untouched)."""
    need = [i for i, r in enumerate(rows) if r.params.top_k > 0 or r.params.top_p < 1.0 or r.params.min_p > 0]
    if not need:
        return logits
    device = logits.device
    idx = torch.tensor(need, device=device)
    sub = logits[idx]
    vocab = sub.shape[1]
    # Clamped before the tensor is made: validation bounds top_k, not to this model's vocabulary.
    top_k = torch.tensor([min(rows[i].params.top_k or vocab, vocab) for i in need], device=device)
    top_p = torch.tensor([rows[i].params.top_p for i in need], device=device)
    min_p = torch.tensor([rows[i].params.min_p for i in need], device=device)
    sorted_logits, order = sub.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).expand_as(sorted_logits)
    remove = ranks >= top_k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p.unsqueeze(1)
    remove |= probs < min_p.unsqueeze(1) * probs[:, :1]  # [B, 1] thresholds, one per row
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    logits[idx] = torch.empty_like(sub).scatter_(1, order, sorted_logits)
    return logits


def _draw(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    # Exponential-race sampling (argmax of p / E, E ~ Exp(1)) draws exactly from p, and lets
    # seeded rows take their noise from their own generator.
    noise = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        idx = torch.tensor(unseeded, device=probs.device)
        noise[idx] = torch.empty((len(unseeded), probs.shape[1]), device=probs.device).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i].exponential_(generator=row.generator)
    return (probs / noise).argmax(dim=-1)


def token_logprobs(logprobs_row: torch.Tensor, token_id: int, num_top: int) -> TokenLogprob:
    value = logprobs_row[token_id]
    rank = int((logprobs_row > value).sum().item()) + 1
    top: list[tuple[int, float]] = []
    if num_top > 0:
        values, ids = logprobs_row.topk(num_top)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id=token_id, logprob=float(value), rank=rank, top=top)


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits [B, V] float32, one row per request -> one token per row."""
        want_logprobs = [r.params.logprobs is not None for r in rows]
        raw_logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None

        _apply_penalties(logits, rows)
        _apply_masks(logits, rows)

        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            token_ids = logits.argmax(dim=-1)
        else:
            temps = torch.tensor([1.0 if g else r.params.temperature for r, g in zip(rows, greedy)], device=logits.device)
            scaled = _filter_top_k_top_p_min_p(logits / temps.unsqueeze(1), rows)
            token_ids = _draw(scaled.softmax(dim=-1), rows)
            if any(greedy):
                token_ids = torch.where(torch.tensor(greedy, device=logits.device), logits.argmax(dim=-1), token_ids)

        ids = token_ids.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if raw_logprobs is not None:
            for i, row in enumerate(rows):
                if want_logprobs[i]:
                    logprobs[i] = token_logprobs(raw_logprobs[i], ids[i], row.params.logprobs)
        return SamplerOutput(token_ids=ids, logprobs=logprobs)
