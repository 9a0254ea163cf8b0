"""What this CPU can run, read from its own flags, and the paths Heron picks from them.

`CpuInfo.read()` parses /proc/cpuinfo (the kernel's view of CPUID), never a library's notion of what it
can emulate: oneDNN reports bf16 "supported" on any AVX-512 CPU, where bf16 matmuls are emulated and
several times slower than float32. From the flags:

- `kernel_isas`: the builds of heron/kernels/cpu_kernels.c this CPU runs, best first: "avx512"
  (AVX-512 F/BW/VL with VNNI, for the int8 matmuls) and "avx2" (AVX2/FMA/F16C).
- `native_bf16`: AVX512-BF16 or AMX-BF16, the only CPUs where bf16 is even a candidate.
- `choose_isa` picks the build of heron/kernels to load, honouring `HERON_CPU_ISA` (auto | avx2 | avx512) when the CPU
  runs the one asked for, and says why in words for the start-up log and `heron inspect`.

Pure functions of the flags, so tests can feed them the flags of machines they do not run on.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

AVX2_FLAGS = frozenset({"avx2", "fma", "f16c"})
AVX512_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
ISAS = ("avx512", "avx2")  # the kernel builds, best first
_ISA_FLAGS = {"avx512": AVX512_FLAGS, "avx2": AVX2_FLAGS}


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    flags: frozenset[str]
    machine: str = "x86_64"

    @classmethod
    def parse(cls, cpuinfo: str, machine: str = "x86_64") -> CpuInfo:
        """From the text of /proc/cpuinfo (its first processor's `model name` and `flags`)."""
        model, flags = "unknown CPU", frozenset()
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown CPU":
                model = " ".join(value.split()) or model
            elif key == "flags" and not flags:
                flags = frozenset(value.split())
        return cls(model, flags, machine.lower())

    @classmethod
    def read(cls) -> CpuInfo:
        """This machine's CPU (read once per process)."""
        return _read_once()

    @property
    def is_x86_64(self) -> bool:
        return self.machine in ("x86_64", "amd64")

    @property
    def kernel_isas(self) -> tuple[str, ...]:
        if not self.is_x86_64:
            return ()
        return tuple(isa for isa in ISAS if _ISA_FLAGS[isa] <= self.flags)

    @property
    def native_bf16(self) -> bool:
        return self.is_x86_64 and bool(NATIVE_BF16_FLAGS & self.flags)

    def describe(self) -> str:
        """One line for logs and benchmark headers: model and the flags that decide Heron's paths."""
        shown = sorted((AVX512_FLAGS | NATIVE_BF16_FLAGS | {"amx_tile", "amx_int8", "avx_vnni"}) & self.flags)
        return f"{self.model_name} ({self.machine}; {' '.join(shown) or 'no AVX2'})"


@functools.cache
def _read_once() -> CpuInfo:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    return CpuInfo.parse(text, platform.machine())


def choose_isa(cpu: CpuInfo, requested: str = "auto") -> tuple[str | None, str]:
    """The kernel build to run on `cpu` and why. `requested`: auto (the best this CPU runs), or a
    build's name, taken when the CPU runs it (else the best it does, never an illegal instruction)."""
    runnable = cpu.kernel_isas
    if not runnable:
        why = "not x86-64" if not cpu.is_x86_64 else f"no {'/'.join(sorted(AVX2_FLAGS - cpu.flags))}"
        return None, f"CPU kernels off: {why} on {cpu.model_name}"
    requested = (requested or "auto").lower()
    if requested in ("", "auto"):
        best = runnable[0]
        if best == "avx512":
            return best, "AVX-512 VNNI: the CPU has avx512f/bw/vl and avx512_vnni"
        missing = sorted(AVX512_FLAGS - cpu.flags)
        return best, f"AVX2: the CPU lacks {' '.join(missing)} for the AVX-512 build"
    if requested not in ISAS:
        return runnable[0], f"{runnable[0]} (HERON_CPU_ISA={requested!r} is not one of auto, {', '.join(ISAS)})"
    if requested in runnable:
        return requested, f"{requested}, forced by HERON_CPU_ISA"
    return runnable[0], f"{runnable[0]}: HERON_CPU_ISA={requested} asked for a build this CPU cannot run"
