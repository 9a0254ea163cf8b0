"""EnvSettings: every environment variable the engine reads, read once into a frozen record.

| variable | default | read into | takes effect |
| --- | --- | --- | --- |
| `HERON_CPU_KERNELS` | on | `cpu_kernels` | when the kernels first load: off (0/false/no/off) keeps PyTorch's path everywhere |
| `HERON_CPU_ISA` | auto | `cpu_isa` | when the kernels first load: avx2 or avx512 forces that build where the CPU runs it |
| `HERON_CPU_INT8` | on | `cpu_int8` | when quantized weights are packed (model load): off gives float32 activations |
| `HERON_CACHE_DIR` | `$XDG_CACHE_HOME/heron`, else `~/.cache/heron` | `cache_dir` | when a kernel build is looked up or compiled |
| `CC` | `cc`, else `gcc` on PATH | `cc` | when a kernel build is compiled |

Booleans take 1/0, true/false, yes/no, on/off (any case); an empty variable counts as unset; any
other value is a ValueError naming the variable, raised at the first read (the first model load).

`env_settings()` reads the environment on its first call and returns that same record from then on,
so a variable changed later in the process changes nothing: set them before the process starts
(the benchmarks run each configuration as a subprocess with its own environment). Tests that compare
settings in one process use `override(...)`, a `with` block; `reload()` reads the environment again.
Either only affects what is read after it: the kernel build is chosen once, when the kernels first
load (compare builds with `heron.kernels.using()`), and weights already packed keep their layout.

`heron serve`'s own variables (HERON_HOST, HERON_PORT, ...) are not here: heron.server.settings reads
each beside its flag into ServerSettings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean: use 1 or 0 (true/false, yes/no, on/off)")


def _cache_dir(environ: Mapping[str, str]) -> Path:
    if environ.get("HERON_CACHE_DIR"):
        return Path(environ["HERON_CACHE_DIR"])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "heron"


@dataclass(frozen=True)
class EnvSettings:
    """The engine's environment switches (see the module's table for each variable)."""

    cpu_kernels: bool = True
    cpu_isa: str = "auto"  # auto | avx2 | avx512; heron.cpu_info.choose_isa says what an odd value does
    cpu_int8: bool = True
    cache_dir: Path = dataclasses.field(default_factory=lambda: Path.home() / ".cache" / "heron")
    cc: str | None = None  # None: cc, else gcc, found on PATH when a build is compiled

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))  # override() may be given a str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EnvSettings:
        env = os.environ if environ is None else environ
        return cls(
            cpu_kernels=_bool(env, "HERON_CPU_KERNELS", True),
            cpu_isa=env.get("HERON_CPU_ISA", "").strip().lower() or "auto",
            cpu_int8=_bool(env, "HERON_CPU_INT8", True),
            cache_dir=_cache_dir(env),
            cc=env.get("CC") or None,
        )


# The process's record: read once, swapped whole (never mutated) by reload() and override().
_lock = threading.Lock()
_current: EnvSettings | None = None


def env_settings() -> EnvSettings:
    """The settings of this process, read from the environment on the first call."""
    global _current
    current = _current
    if current is None:
        with _lock:
            if _current is None:
                _current = EnvSettings.from_env()
            current = _current
    return current


def reload(environ: Mapping[str, str] | None = None) -> EnvSettings:
    """Read the environment (or `environ`) again, for what reads the settings from now on."""
    global _current
    settings = EnvSettings.from_env(environ)
    with _lock:
        _current = settings
    return settings


@contextlib.contextmanager
def override(**changes: object) -> Iterator[EnvSettings]:
    """Run the block with some fields changed (`override(cpu_int8=False)`), then restore them: for
    tests and benchmarks that compare settings in one process. Unknown names raise TypeError."""
    global _current
    saved = env_settings()
    changed = dataclasses.replace(saved, **changes)
    with _lock:
        _current = changed
    try:
        yield changed
    finally:
        with _lock:
            _current = saved
