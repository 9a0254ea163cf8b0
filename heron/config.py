"""User-facing configuration, frozen after construction.

Values discovered at start-up (number of KV blocks, EOS ids, the chosen dtype) live in runtime
records owned by the engine, never written back here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how. `model=None` means the embedded default."""

    model: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None
    chat_template: str | None = None  # path of a user override file
    seed: int = 0


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size and the memory it may take."""

    block_size: int = 16
    # Bytes for K/V blocks; None picks a default from the device (see engine start-up).
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits per engine step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
