"""ModelRunner: the worker that runs steps described by heron.engine.messages on one model.

`execute_model(SchedulerOutput)` applies the step's message to the worker's own request states
(heron.worker.input_batch), lays the step out as a ForwardBatch and runs the model up to the logits
of the rows that need them. `sample_tokens(GrammarOutput | None)` then samples, under the masks the
core computed for its structured-output requests meanwhile, and returns a ModelRunnerOutput. The
two halves let the core compute the masks while the forward pass runs. The runner owns the KV
cache tensors; the scheduler owns which blocks each request may use.

Fault isolation: if the batched forward or sampling raises, the runner rewinds the seeded generators
and runs the step's requests one at a time; those that fail alone are reported in
`ModelRunnerOutput.failed` and the others get exactly what the batch would have given them. Sampled
tokens join the worker's states only once the step has its final result. What is not one request's
fault (out of memory, an accelerator error) raises out of the runner.
"""

from __future__ import annotations

import logging
from typing import Union

import torch

from heron.engine.errors import RequestFailedError, as_request_error
from heron.engine.messages import GrammarOutput, ModelRunnerOutput, PromptLogprobs, SchedulerOutput
from heron.outputs import TokenLogprob
from heron.worker.input_batch import InputBatch, ScheduledChunk, StepLayout
from heron.worker.sampler import Sampler, SamplingRow, token_logprobs, unpack_bitmask

logger = logging.getLogger(__name__)

# Failures of the engine, never of the request that happened to be running: retrying alone won't
# help (a CUDA error leaves the context unusable for every later kernel).
ENGINE_ERRORS = (MemoryError, torch.OutOfMemoryError, *((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()))

# What execute_model leaves for sample_tokens: the layout and its logits (None: no row needs
# any), or the exception the batched forward raised.
_Forwarded = Union[tuple[StepLayout, "torch.Tensor | None"], Exception]


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
        self.input_batch = InputBatch(block_size, device)
        self.sampler = Sampler()
        self._step: SchedulerOutput | None = None
        self._forwarded: _Forwarded | None = None
        self._generator_states: list[tuple[torch.Generator, torch.Tensor]] = []

    @classmethod
    def for_loaded(cls, loaded, num_blocks: int, block_size: int, num_kv_heads: int | None = None) -> ModelRunner:
        """A runner over a LoadedModel's decoder (heron.models.loader); `num_kv_heads`: this worker's
        share of them under tensor parallelism (default all)."""
        arch = loaded.arch_config
        return cls(
            loaded.model,
            arch.num_hidden_layers,
            arch.num_key_value_heads if num_kv_heads is None else num_kv_heads,
            arch.head_dim,
            num_blocks,
            block_size,
            loaded.dtype,
            loaded.device,
            loaded.eos_token_ids,
            arch.vocab_size,
        )

    @staticmethod
    def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> None:
        """Take in the step's message and run the forward pass; sample_tokens() finishes the step."""
        self.input_batch.update(out)
        states = self.input_batch.states
        # Seeded rows draw from their own generators: rewinding them makes a bystander's retry draw
        # what the failed batch drew (unseeded rows draw afresh, as they would on any other day).
        self._generator_states = [
            (g, g.get_state()) for g in (states[r].generator for r in out.num_scheduled_tokens) if g is not None
        ]
        self._step = out
        try:
            self._forwarded = self._forward(out.num_scheduled_tokens)
        except ENGINE_ERRORS:
            raise
        except Exception as exc:
            self._forwarded = exc  # found out one request at a time in sample_tokens

    @torch.inference_mode()
    def sample_tokens(self, grammar: GrammarOutput | None) -> ModelRunnerOutput:
        out, forwarded = self._step, self._forwarded
        if out is None:
            raise RuntimeError("sample_tokens() without execute_model()")
        self._step = self._forwarded = None
        masks: dict[str, torch.Tensor] = {}
        if grammar is not None and grammar.request_ids:
            rows = unpack_bitmask(grammar.bitmask.to(self.device), self.vocab_size)
            masks = dict(zip(grammar.request_ids, rows))
        if not isinstance(forwarded, Exception):
            try:
                return self._commit(self._sample(*forwarded, masks))
            except ENGINE_ERRORS:
                raise
            except Exception as exc:
                forwarded = exc
        return self._commit(self._one_at_a_time(out, forwarded, masks))

    def _one_at_a_time(self, out: SchedulerOutput, batch_error: Exception, masks: dict[str, torch.Tensor]) -> ModelRunnerOutput:
        logger.warning("a step of %d requests failed (%r); running them one at a time", len(out.num_scheduled_tokens), batch_error)
        for generator, state in self._generator_states:
            generator.set_state(state)
        result = ModelRunnerOutput()
        for request_id, num_tokens in out.num_scheduled_tokens.items():
            # The same block ids: rewriting the KV slots the batch wrote, with the same tokens, is harmless.
            try:
                alone = self._sample(*self._forward({request_id: num_tokens}), masks)
            except ENGINE_ERRORS:
                raise
            except Exception as exc:
                if not isinstance(exc, RequestFailedError):
                    logger.error("request %s failed alone", request_id, exc_info=exc)
                result.failed[request_id] = as_request_error(exc)
                continue
            result.merge(alone)
        # Even when every request fails alone, they are failed and the engine goes on: one HTTP
        # request can carry several engine requests, so "all of them fail" is no proof that the
        # engine is broken, and dying would let one client stop the server.
        return result

    def _commit(self, result: ModelRunnerOutput) -> ModelRunnerOutput:
        states = self.input_batch.states
        for request_id, token_id in result.sampled_token_ids.items():
            states[request_id].append_output_token(token_id)
        return result

    def _forward(self, num_scheduled_tokens: dict[str, int]) -> tuple[StepLayout, torch.Tensor | None]:
        layout = self.input_batch.prepare(num_scheduled_tokens, self.kv_caches)
        if not layout.logits_rows:
            self.model(layout.batch)
            return layout, None
        hidden = self.model(layout.batch)
        if len(layout.logits_rows) != hidden.shape[0]:  # a pure decode step needs every row: no copy
            hidden = hidden[layout.batch.logits_indices]
        return layout, self.model.compute_logits(hidden)

    def _sample(self, layout: StepLayout, logits: torch.Tensor | None, masks: dict[str, torch.Tensor]) -> ModelRunnerOutput:
        """Sample the requests whose chunk ends their known tokens; only their generators change."""
        result = ModelRunnerOutput()
        if logits is None:
            return result
        row_of = {r: i for i, r in enumerate(layout.logits_rows)}
        sample_rows: list[int] = []
        sampled: list[ScheduledChunk] = []
        for chunk in layout.chunks:
            state = chunk.state
            if state.wants_prompt_logprobs():
                rows = [row_of[r] for r in range(chunk.row, chunk.row + chunk.num_tokens)]
                result.prompt_logprobs[state.request_id] = self._prompt_logprobs(chunk, logits, rows)
            if chunk.reaches_end:
                sample_rows.append(row_of[chunk.row + chunk.num_tokens - 1])
                sampled.append(chunk)
        if not sampled:
            return result
        rows = [
            SamplingRow(
                params=c.state.params,
                prompt_token_ids=c.state.prompt_token_ids,
                output_token_ids=c.state.output_token_ids,
                eos_token_ids=self.eos_token_ids,
                generator=c.state.generator,
                grammar_mask=masks.get(c.state.request_id),
            )
            for c in sampled
        ]
        if sample_rows != list(range(logits.shape[0])):
            logits = logits[torch.tensor(sample_rows, device=logits.device)]
        out = self.sampler(logits, rows)
        for chunk, token_id, lp in zip(sampled, out.token_ids, out.logprobs):
            result.sampled_token_ids[chunk.state.request_id] = token_id
            if lp is not None:
                result.logprobs[chunk.state.request_id] = lp
        return result

    def _prompt_logprobs(self, chunk: ScheduledChunk, logits: torch.Tensor, rows: list[int]) -> PromptLogprobs:
        """Logprob of each prompt token this chunk covers, given the tokens before it."""
        state, start = chunk.state, chunk.start
        num_top = state.params.prompt_logprobs
        logprobs = logits[torch.tensor(rows, device=logits.device)].log_softmax(dim=-1)
        out: list[TokenLogprob | None] = [None] if start == 0 else []
        # Row j predicts token start + j + 1; the chunk's last row predicts the next chunk's first
        # prompt token (or the first generated token, which the sampler reports).
        for j in range(len(rows)):
            target = start + j + 1
            if target >= state.num_prompt_tokens:
                break
            out.append(token_logprobs(logprobs[j], state.token_ids[target], num_top))
        # The chunk covers positions from 0 (its None) when it starts the prompt, else from the
        # token after its first one (the previous chunk's last row predicted that one).
        return PromptLogprobs(0 if start == 0 else start + 1, out)
