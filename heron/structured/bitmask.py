"""GrammarBitmask: the allowed-token masks of one engine step, computed while the model runs.

The model runner calls `start()` with the grammar matchers of the rows it will sample, before the
forward pass; llguidance fills a packed bitmask (one bit per token, 32 per int32 word) in a
background thread, releasing the GIL, so the masks cost the batch nothing but a join. `wait()`
unpacks them into one bool row per sampled row (None for unconstrained rows) for the sampler.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import torch


class GrammarBitmask:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._words = (vocab_size + 31) // 32
        self._executor = llguidance.LLExecutor()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heron-grammar")
        self._bits = torch.arange(32, dtype=torch.int32)

    def start(self, matchers: list[llguidance.LLMatcher | None]) -> Future[torch.Tensor] | None:
        """Begin computing the masks of `matchers` (one per sampled row; None = unconstrained)."""
        rows = [(matcher, i) for i, matcher in enumerate(matchers) if matcher is not None]
        if not rows:
            return None
        packed = torch.full((len(matchers), self._words), -1, dtype=torch.int32)

        def fill() -> torch.Tensor:
            self._executor.unsafe_compute_mask_ptr(rows, packed.data_ptr(), self._words * 4, len(matchers))
            return packed

        return self._pool.submit(fill)

    def wait(self, pending: Future[torch.Tensor] | None, matchers: list[llguidance.LLMatcher | None]) -> list[torch.Tensor | None]:
        """Bool masks over the vocabulary, one per row (None where the row is unconstrained)."""
        if pending is None:
            return [None] * len(matchers)
        packed = pending.result()
        constrained = [i for i, m in enumerate(matchers) if m is not None]
        words = packed[constrained]
        allowed = ((words.unsqueeze(-1) >> self._bits) & 1).bool().reshape(len(constrained), -1)[:, : self.vocab_size]
        masks: list[torch.Tensor | None] = [None] * len(matchers)
        for row, i in enumerate(constrained):
            masks[i] = allowed[row]
        return masks

    def close(self) -> None:
        self._pool.shutdown(wait=False)
