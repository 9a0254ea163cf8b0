"""MultiprocExecutor: a replica's model split over tensor-parallel ranks in local worker processes.

Each rank is a heron.distributed.tp_worker.TPWorker in its own process (ProcessHandle); the ranks
meet over torch.distributed (gloo on CPU, NCCL on CUDA, one GPU per rank) at a TCP address on this
machine. Every step goes to every rank: `execute_model` sends the message and returns (the forwards
run meanwhile, while the core computes the grammar masks), `sample_tokens` sends the masks and
collects each rank's answer. The ranks sample the same tokens (see tp_worker); rank 0's output is
the step's, and one that differs is a bug the executor refuses to hide.

Death: waiting on any rank also watches every rank's process. A rank that exits (killed, out of
memory) raises WorkerDiedError out of the step, which kills the engine (its requests fail, /health
says 503 and the server exits non-zero); the surviving ranks, stuck in a collective with the dead
one, are killed. Start-up fails the same way, with the rank's own error, never a hang.
"""

from __future__ import annotations

import logging
import random
import socket

import torch

from heron.distributed.parallel_state import TPLayout, check_tp_layout
from heron.distributed import shm_comm
from heron.distributed.shm_comm import shm_path
from heron.distributed.procs import ProcessHandle, RemoteHandle, WorkerDiedError, recv_all
from heron.distributed.tp_worker import TPWorker
from heron.engine.executor import Executor
from heron.engine.messages import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from heron.models.loader import LoadedModel
from heron.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Loading a shard of a large checkpoint from a slow disk takes a while; a rank that neither answers
# nor dies in this long is stuck.
START_TIMEOUT_S = 600.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MultiprocExecutor(Executor):
    def __init__(self, loaded: LoadedModel, tensor_parallel_size: int):
        arch = loaded.arch_config
        if arch is None:
            raise ValueError(f"{loaded.source} is an embedding model; it cannot generate text")
        check_tp_layout(tensor_parallel_size, arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size)
        self.loaded = loaded
        self.size = tensor_parallel_size
        self.layout = TPLayout(0, tensor_parallel_size, arch.num_attention_heads, arch.num_key_value_heads,
                               arch.head_dim, arch.intermediate_size, arch.vocab_size)
        self.backend = "nccl" if loaded.device.type == "cuda" else "gloo"
        # The ranks share this process's thread budget (a replica's, under data parallelism).
        self.threads = max(1, torch.get_num_threads() // tensor_parallel_size)
        self.seed = random.getrandbits(63)
        self.handles: list[RemoteHandle] = []
        try:
            self.handles = self._start_workers()
            recv_all(self.handles, START_TIMEOUT_S)
        except BaseException as exc:
            self._kill_all()
            if isinstance(exc, WorkerDiedError):
                raise RuntimeError(f"a tensor-parallel worker failed to start: {exc}") from exc
            raise
        logger.info("tensor parallel: %d ranks over %s, %d thread(s) each", self.size, self.backend, self.threads)

    def worker_args(self, rank: int, init_method: str, device: str, shared_memory: str | None = None) -> tuple:
        """TPWorker's arguments for `rank` (a Ray executor passes the same to its actors)."""
        dtype = str(self.loaded.dtype).removeprefix("torch.")
        return (rank, self.size, init_method, self.backend, self.loaded.source, dtype, device, self.threads, self.seed,
                shared_memory)

    def _start_workers(self) -> list[RemoteHandle]:
        init_method = f"tcp://127.0.0.1:{free_port()}"
        device = self.loaded.device
        if device.type == "cuda" and torch.cuda.device_count() < self.size:
            # Here, not in __init__: a Ray executor's ranks find their GPUs on other nodes.
            raise ValueError(f"--tensor-parallel-size {self.size} needs {self.size} GPUs; {torch.cuda.device_count()} are visible")
        # Every rank is on this machine: CPU collectives go through shared memory (NCCL has its own).
        shared_memory = shm_path() if device.type == "cpu" and shm_comm.available() else None
        handles = []
        for rank in range(self.size):
            rank_device = f"cuda:{rank}" if device.type == "cuda" else str(device)
            args = self.worker_args(rank, init_method, rank_device, shared_memory)
            handles.append(ProcessHandle(f"tensor-parallel rank {rank}", TPWorker, args))
        return handles

    # ----------------------------------------------------------------- Executor

    def kv_bytes_per_block(self, block_size: int) -> int:
        arch = self.loaded.arch_config
        return ModelRunner.kv_bytes_per_block(
            arch.num_hidden_layers, self.layout.local_kv_heads, arch.head_dim, block_size, self.loaded.dtype
        )

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        self._broadcast("initialize_cache", num_blocks, block_size)
        self._collect()

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self._broadcast("execute_model", scheduler_output)

    def sample_tokens(self, grammar: GrammarOutput | None) -> ModelRunnerOutput:
        self._broadcast("sample_tokens", grammar)
        self._collect()  # execute_model's answers (None, or the engine error it raised)
        results: list[ModelRunnerOutput] = self._collect()
        first = results[0]
        for rank, other in enumerate(results[1:], 1):
            if other.sampled_token_ids != first.sampled_token_ids or other.failed.keys() != first.failed.keys():
                raise RuntimeError(f"tensor-parallel rank {rank} sampled other tokens than rank 0")
        return first

    def shutdown(self) -> None:
        for handle in self.handles:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - best effort: kill what does not stop
                logger.exception("stopping %s failed", handle.name)
                handle.kill()
        self.handles = []

    # ----------------------------------------------------------------- ranks

    def _broadcast(self, method: str, *args: object) -> None:
        try:
            for handle in self.handles:
                handle.send(method, *args)
        except WorkerDiedError:
            self._kill_all()
            raise

    def _collect(self) -> list:
        try:
            return recv_all(self.handles)
        except WorkerDiedError:
            self._kill_all()
            raise
        except BaseException:
            # A rank raised (an engine error: out of memory, say): the engine dies with it, and
            # the other ranks' answers to this call are never read.
            self._kill_all()
            raise

    def _kill_all(self) -> None:
        for handle in self.handles:
            try:
                handle.kill()
            except Exception:  # noqa: BLE001
                logger.exception("killing %s failed", handle.name)
