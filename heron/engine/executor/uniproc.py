"""UniprocExecutor: one worker (a ModelRunner) in the engine's own process and thread."""

from __future__ import annotations

from heron.engine.executor import Executor
from heron.engine.messages import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from heron.models.loader import LoadedModel
from heron.worker.model_runner import ModelRunner


class UniprocExecutor(Executor):
    def __init__(self, loaded: LoadedModel):
        if loaded.arch_config is None:
            raise ValueError(f"{loaded.source} is an embedding model; it cannot generate text")
        self.loaded = loaded
        self.runner: ModelRunner | None = None

    def kv_bytes_per_block(self, block_size: int) -> int:
        arch = self.loaded.arch_config
        return ModelRunner.kv_bytes_per_block(
            arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim, block_size, self.loaded.dtype
        )

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        self.runner = ModelRunner.for_loaded(self.loaded, num_blocks, block_size)

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self.runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar: GrammarOutput | None) -> ModelRunnerOutput:
        return self.runner.sample_tokens(grammar)

    def shutdown(self) -> None:
        self.runner = None
