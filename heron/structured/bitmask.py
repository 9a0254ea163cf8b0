"""GrammarBitmask: the allowed-token masks of one engine step, computed while the model runs.

The engine core calls `start()` with the grammar matchers of the requests that sample this step,
before it hands the step to the executor; llguidance fills a packed bitmask (one bit per token, 32
per int32 word) in a background thread, releasing the GIL, so the masks cost the step nothing but a
join. `wait()` returns the packed rows, which cross the step boundary as a GrammarOutput; the
worker unpacks them (heron.worker.sampler.unpack_bitmask).
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

    def start(self, matchers: list[llguidance.LLMatcher]) -> Future[torch.Tensor]:
        """Begin computing the masks of `matchers`, one packed row each."""
        packed = torch.full((len(matchers), self._words), -1, dtype=torch.int32)
        rows = [(matcher, i) for i, matcher in enumerate(matchers)]

        def fill() -> torch.Tensor:
            self._executor.unsafe_compute_mask_ptr(rows, packed.data_ptr(), self._words * 4, len(matchers))
            return packed

        return self._pool.submit(fill)

    def wait(self, pending: Future[torch.Tensor]) -> torch.Tensor:
        """The packed masks: int32 [rows, ceil(vocab / 32)]."""
        return pending.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
