"""ModelRunner: executes one scheduled step on the model and samples the next tokens.

SchedulerOutput (requests and how many tokens each advances) -> ForwardBatch tensors (decodes first,
then prefill chunks; cache slots from each request's block table) -> model -> logits for the rows
that end a request's known tokens -> Sampler -> ModelRunnerOutput. The runner owns the KV cache
tensors; the scheduler owns which blocks each request may use. Requests decoding under a grammar
(structured outputs) get their token masks computed while the forward pass runs; the core advances
their grammar state by the token they sample.

`execute` only reads the requests it is given (it writes nothing but KV slots and the sampled
rows' generators), so the core can re-run a failed step's requests one at a time.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from heron.engine.errors import grammar_failed
from heron.engine.request import Request
from heron.outputs import TokenLogprob
from heron.structured.bitmask import GrammarBitmask
from heron.worker.forward_batch import ForwardBatch
from heron.worker.sampler import Sampler, SamplingRow, token_logprobs


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens this step computes for the request
    block_ids: list[int]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass
class ModelRunnerOutput:
    # request_id -> sampled token, for requests whose step reached the end of their known tokens.
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    # request_id -> logprobs of the prompt tokens this step covered (first prompt token: None).
    prompt_logprobs: dict[str, list[TokenLogprob | None]] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        vocab_size: int,
    ):
        self.model = model
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        num_slots = num_blocks * block_size
        self.kv_caches = [
            (
                torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device),
                torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]
        self.sampler = Sampler()
        self._grammar_masks: GrammarBitmask | None = None  # made when the first grammar request runs

    @staticmethod
    def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def _slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]

    def build_batch(self, out: SchedulerOutput) -> tuple[ForwardBatch, list[ScheduledRequest], list[int]]:
        """Lay the step out: decodes first. Returns the batch, the order used, and logits rows."""
        decodes = [s for s in out.scheduled if s.num_tokens == 1 and s.request.num_computed_tokens > 0]
        prefills = [s for s in out.scheduled if not (s.num_tokens == 1 and s.request.num_computed_tokens > 0)]
        order = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        logits_rows: list[int] = []
        for s in decodes:
            req = s.request
            pos = req.num_computed_tokens
            input_ids.append(req.all_token_ids[pos])
            positions.append(pos)
            slot_mapping.extend(self._slots(s.block_ids, pos, pos + 1))
        for s in prefills:
            req = s.request
            start_pos = req.num_computed_tokens
            end_pos = start_pos + s.num_tokens
            input_ids.extend(req.all_token_ids[start_pos:end_pos])
            positions.extend(range(start_pos, end_pos))
            slot_mapping.extend(self._slots(s.block_ids, start_pos, end_pos))

        # Which rows need logits: each request's last row when this step completes its known tokens,
        # and every prefill row of requests that asked for prompt logprobs.
        offset = 0
        for s in order:
            req = s.request
            if req.sampling_params.prompt_logprobs is not None and req.num_computed_tokens < req.num_prompt_tokens:
                logits_rows.extend(range(offset, offset + s.num_tokens))
            elif req.num_computed_tokens + s.num_tokens == req.num_tokens:
                logits_rows.append(offset + s.num_tokens - 1)
            offset += s.num_tokens

        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=self.device),
            query_lens=[s.num_tokens for s in order],
            context_lens=[s.request.num_computed_tokens for s in order],
            num_decodes=len(decodes),
            block_tables=[s.block_ids for s in order],
            block_size=self.block_size,
            kv_caches=self.kv_caches,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
        )
        return batch, order, logits_rows

    def _start_grammar_masks(self, out: SchedulerOutput) -> tuple[list[Request], Future | None]:
        """Start the masks of the requests that sample under a grammar this step (those whose chunk
        reaches the end of their known tokens); returns them and the pending masks."""
        constrained = []
        for s in out.scheduled:
            req = s.request
            if req.grammar is None or req.num_computed_tokens + s.num_tokens != req.num_tokens:
                continue
            if req.grammar.is_error():
                # The core fails a request whose token broke its grammar; never decode unconstrained.
                raise grammar_failed(req.grammar.get_error())
            constrained.append(req)
        if not constrained:
            return [], None
        if self._grammar_masks is None:
            self._grammar_masks = GrammarBitmask(self.vocab_size)
        return constrained, self._grammar_masks.start([req.grammar for req in constrained])

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        batch, order, logits_rows = self.build_batch(out)
        result = ModelRunnerOutput()
        if not logits_rows:
            self.model(batch)
            return result
        # Masks are computed on another thread while the model runs.
        constrained, pending_masks = self._start_grammar_masks(out)
        hidden = self.model(batch)
        if len(logits_rows) != hidden.shape[0]:  # a pure decode step needs every row: no copy
            hidden = hidden[batch.logits_indices]
        logits = self.model.compute_logits(hidden)
        row_of = {r: i for i, r in enumerate(logits_rows)}

        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        offset = 0
        for s in order:
            req = s.request
            end = req.num_computed_tokens + s.num_tokens
            last_row = offset + s.num_tokens - 1
            if req.sampling_params.prompt_logprobs is not None and req.num_computed_tokens < req.num_prompt_tokens:
                result.prompt_logprobs[req.request_id] = self._prompt_logprobs(
                    req, logits, [row_of[r] for r in range(offset, offset + s.num_tokens)]
                )
            if end == req.num_tokens:
                sample_rows.append(row_of[last_row])
                sample_reqs.append(req)
            offset += s.num_tokens

        if sample_reqs:
            masks = {}
            if pending_masks is not None:
                rows = self._grammar_masks.wait(pending_masks, [req.grammar for req in constrained])
                masks = {req.request_id: mask for req, mask in zip(constrained, rows)}
            rows = [
                SamplingRow(
                    params=req.sampling_params,
                    prompt_token_ids=req.prompt_token_ids,
                    output_token_ids=req.output_token_ids,
                    eos_token_ids=self.eos_token_ids,
                    generator=req.generator,
                    grammar_mask=masks.get(req.request_id),
                )
                for req in sample_reqs
            ]
            if sample_rows != list(range(logits.shape[0])):
                logits = logits[torch.tensor(sample_rows, device=logits.device)]
            sampled = self.sampler(logits, rows)
            for req, token_id, lp in zip(sample_reqs, sampled.token_ids, sampled.logprobs):
                result.sampled_token_ids[req.request_id] = token_id
                if lp is not None:
                    result.logprobs[req.request_id] = lp
        return result

    def _prompt_logprobs(self, req: Request, logits: torch.Tensor, rows: list[int]) -> list[TokenLogprob | None]:
        """Logprob of each prompt token this chunk covers, given the tokens before it."""
        start = req.num_computed_tokens
        num_top = req.sampling_params.prompt_logprobs
        logprobs = logits[torch.tensor(rows, device=logits.device)].log_softmax(dim=-1)
        out: list[TokenLogprob | None] = [None] if start == 0 else []
        # Row j predicts token start + j + 1; the chunk's last row predicts the next chunk's first
        # prompt token (or the first generated token, which the sampler reports).
        for j in range(len(rows)):
            target = start + j + 1
            if target >= req.num_prompt_tokens:
                break
            out.append(token_logprobs(logprobs[j], req.all_token_ids[target], num_top))
        return out
