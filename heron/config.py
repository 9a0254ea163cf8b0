"""User-facing configuration, frozen after construction, and the one place for its defaults.

Values discovered at start-up (number of KV blocks, EOS ids, the chosen dtype) live in runtime
records owned by the engine, never written back here. Defaults that depend on the device (the step
token budget) are decided here, by `SchedulerConfig.for_device`, for every entry point alike:
`heron serve`, `heron generate` / `heron chat` and the offline `LLM`. Environment switches (the CPU
kernels, the cache directory) are in heron.env, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_NUM_SEQS = 64
# The token budget of one engine step, by device type. On a CPU a step of 256 tokens takes ~0.6 s
# for the bundled model: small enough that a burst of 32 new requests gets its first tokens out in
# turn (TTFT p50 at 32 clients: 1.5 s, vs 2.2 s with 512), and served tokens/s was higher too. A GPU
# wants larger steps.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 256, "cuda": 2048}


def default_max_num_batched_tokens(device: object) -> int:
    """The step token budget for `device`: a torch.device, or its name ("cpu", "cuda", "cuda:1")."""
    device_type = getattr(device, "type", None) or str(device).partition(":")[0]
    if device_type not in DEFAULT_MAX_NUM_BATCHED_TOKENS:
        known = ", ".join(DEFAULT_MAX_NUM_BATCHED_TOKENS)
        raise ValueError(f"no default step token budget for device {device!r} (known: {known})")
    return DEFAULT_MAX_NUM_BATCHED_TOKENS[device_type]


def describe_batched_tokens_default() -> str:
    """'256 on CPU, 2048 on CUDA': the defaults in words, for help texts."""
    return ", ".join(f"{n} on {kind.upper()}" for kind, n in DEFAULT_MAX_NUM_BATCHED_TOKENS.items())


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
    """Continuous batching limits per engine step.

    A bare `SchedulerConfig()` holds the CPU defaults; `for_device` gives the defaults of the device
    the model runs on, which is what every entry point uses.
    """

    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS["cpu"]

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def for_device(
        cls, device: object, *, max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None
    ) -> SchedulerConfig:
        """The limits for a model on `device` (a torch.device or its name): each one given, else
        that device's default."""
        return cls(
            DEFAULT_MAX_NUM_SEQS if max_num_seqs is None else max_num_seqs,
            default_max_num_batched_tokens(device) if max_num_batched_tokens is None else max_num_batched_tokens,
        )
