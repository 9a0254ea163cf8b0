"""TPWorker: one tensor-parallel rank, the object a worker process (or Ray actor) hosts.

It joins the group, loads its shard of the model (the model code cuts it from the checkpoint; see
heron.models.llama) and, once the executor knows the KV budget, owns a ModelRunner over its share of
the KV heads. Every rank runs every step the same way: the collectives inside the forward keep the
ranks in lockstep, each gets the whole (all-gathered) logits and samples them itself. The ranks'
global generators start from one seed the executor draws, and they make the same draws in the same
order, so they sample the same tokens without a broadcast (the executor checks that they did).
"""

from __future__ import annotations

import torch

from heron.distributed.parallel_state import destroy_tp, init_tp
from heron.engine.messages import GrammarOutput, ModelRunnerOutput, SchedulerOutput


class TPWorker:
    def __init__(
        self,
        rank: int,
        size: int,
        init_method: str,
        backend: str,
        source: str,
        dtype: str,
        device: str,
        threads: int,
        seed: int = 0,
        shared_memory: str | None = None,
    ):
        """`shared_memory`: a /dev/shm path when every rank runs on this machine (see init_tp)."""
        torch.set_num_threads(max(1, threads))
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        self.group = init_tp(rank, size, init_method, backend, shared_memory)
        torch.manual_seed(seed)
        from heron.models.loader import load_model

        self.loaded = load_model(source, dtype=dtype, device=device, progress=False)
        self.runner = None

    def collectives(self) -> str:
        """How this rank's all-reduces travel: "shared memory" or "torch.distributed"."""
        return "shared memory" if self.group.shm is not None else "torch.distributed"

    def kv_heads(self) -> int:
        return self.loaded.model.layout.local_kv_heads

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        from heron.worker.model_runner import ModelRunner

        self.runner = ModelRunner.for_loaded(self.loaded, num_blocks, block_size, self.kv_heads())

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self.runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar: GrammarOutput | None) -> ModelRunnerOutput:
        return self.runner.sample_tokens(grammar)

    @torch.inference_mode()
    def logits(self, sequences: list[list[int]]) -> torch.Tensor:
        """Logits [tokens, vocab] of `sequences` packed in one cache-free forward (every rank must be
        asked together: the forward's collectives pair them). For parity checks across sizes."""
        from heron.worker.forward_batch import ForwardBatch

        model = self.loaded.model
        return model.compute_logits(model(ForwardBatch.for_sequences(sequences)))

    def close(self) -> None:
        self.runner = None
        destroy_tp()
