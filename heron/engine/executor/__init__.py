"""Executors: what runs the engine's steps on the workers, behind one interface.

The core talks to its workers only through an Executor and the messages of heron.engine.messages:
`initialize_cache` once the KV budget is known, then for every step `execute_model` (the forward
pass) and `sample_tokens` (sampling under the step's grammar masks, which the core computes in
between). UniprocExecutor runs one worker in this process; a tensor-parallel or multi-process
executor is another subclass: it would send each step to every rank and return rank 0's output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from heron.engine.messages import GrammarOutput, ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    @abstractmethod
    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one KV block of `block_size` tokens takes on each worker (all layers, K and V)."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        """Allocate every worker's KV cache; called once, before the first step."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        """Start a step: the workers take in its message and run the forward pass."""

    @abstractmethod
    def sample_tokens(self, grammar: GrammarOutput | None) -> ModelRunnerOutput:
        """Finish the step started last: sample, and report what was sampled and what failed."""

    def shutdown(self) -> None:
        """Release the workers."""
