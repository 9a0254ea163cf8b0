"""Native CPU kernels: building cpu_kernels.c on first use, loading it, and calling it on tensors.

The C file is compiled once per source version and ISA with the system C compiler into Heron's cache
directory (`HERON_CACHE_DIR`, else `$XDG_CACHE_HOME/heron` or `~/.cache/heron`), a second or two.
Which build runs comes from the CPU's own flags (heron.cpu_info): the AVX-512 VNNI build where
the CPU has it, else the AVX2 one; `HERON_CPU_ISA=avx2` forces the AVX2 build on an AVX-512 CPU. Both
give the same bits. Where none can run (not x86-64 with AVX2/FMA/F16C, no compiler,
`HERON_CPU_KERNELS=0`) `available()` is False, and callers keep PyTorch's path: quantized weights are
then dequantized at load time. `status()` says which build runs and why.

Those variables are read once, into heron.env's EnvSettings, not here at call time: the build is
chosen on the first `load()`, and `HERON_CPU_INT8` is read when weights are packed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch  # loaded first: the kernels' OpenMP runtime must be the one torch already runs on

from heron.cpu_info import CpuInfo, choose_isa
from heron.env import env_settings

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_BASE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-std=gnu11", "-shared", "-fPIC"]
_ISA_FLAGS = {
    "avx2": [],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DHERON_AVX512"],
}

# GGML type codes the kernels read (names as gguf-py's GGMLQuantizationType spells them).
QTYPE_CODES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}


@dataclass(frozen=True)
class KernelStatus:
    """Which build of the kernels runs in this process (None: PyTorch's path), and why."""

    isa: str | None
    reason: str
    cpu: str

    def describe(self) -> str:
        if self.isa is None:
            return self.reason
        activations = "int8" if int8_activations() else "float32"
        return f"CPU kernels {self.isa} ({self.reason}), {activations} activations"


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: KernelStatus | None = None  # None until load() decided
_builds: dict[str, ctypes.CDLL] = {}  # every build loaded so far, by ISA (tests and benchmarks load two)


def build(isa: str, emulate_with: str | None = None) -> Path:
    """The shared library of `isa`'s build (compiled on first call, then cached). `emulate_with`: a
    SIMDe include directory, to build the AVX-512 code for a CPU without AVX-512 (tests only)."""
    settings = env_settings()
    if emulate_with is None:
        flags = _BASE_FLAGS + _ISA_FLAGS[isa]
        name = isa
    else:  # the AVX-512 source on AVX2 instructions: SIMDe implements the 512-bit intrinsics
        flags = _BASE_FLAGS + ["-DHERON_AVX512", "-DHERON_SIMDE", "-Wno-psabi", f"-I{emulate_with}"]
        name = f"{isa}-simde"
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = settings.cache_dir / f"cpu_kernels-{name}-{digest}.so"
    if target.exists():
        return target  # built before (or into an image's cache): no compiler needed
    compiler = settings.cc or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes (test servers) never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.heron_quant_rows.argtypes = [p, i32, i64, p, i64, p]
    lib.heron_paged_decode_attention.argtypes = [p, i64, p, p, p, i64, i64, p, p, i64, i64, i64, i64, f32]
    lib.heron_packed_linear.argtypes = [p, i64, p, p, p, i32, p, i64, i64, i64, i64]
    lib.heron_q8_linear.argtypes = [p, i64, p, p, p, i32, p, i64, i64, i64, i64]
    lib.heron_add_rms_norm.argtypes = [p, i64, p, i64, p, p, i64, i64, f32]
    lib.heron_silu_mul.argtypes = [p, p, i64, i64]
    lib.heron_rotary.argtypes = [p, i64, i64, i64, i64, p, p, p]
    for fn in (
        lib.heron_quant_rows,
        lib.heron_packed_linear,
        lib.heron_q8_linear,
        lib.heron_paged_decode_attention,
        lib.heron_add_rms_norm,
        lib.heron_silu_mul,
        lib.heron_rotary,
    ):
        fn.restype = ctypes.c_int


def load_build(isa: str, emulate_with: str | None = None) -> ctypes.CDLL:
    """`isa`'s build, loaded (once per process). Raises OSError/RuntimeError where it cannot be built."""
    key = isa if emulate_with is None else f"{isa}-simde"
    if key not in _builds:
        lib = ctypes.CDLL(str(build(isa, emulate_with)))
        _declare(lib)
        _builds[key] = lib
    return _builds[key]


def _decide() -> tuple[ctypes.CDLL | None, KernelStatus]:
    cpu = CpuInfo.read()
    settings = env_settings()
    if not settings.cpu_kernels:
        return None, KernelStatus(None, "CPU kernels off: HERON_CPU_KERNELS=0", cpu.describe())
    isa, reason = choose_isa(cpu, settings.cpu_isa)
    if isa is None:
        return None, KernelStatus(None, reason, cpu.describe())
    try:
        lib = load_build(isa)
    except (OSError, RuntimeError) as exc:
        return None, KernelStatus(None, f"CPU kernels off: {exc}", cpu.describe())
    return lib, KernelStatus(isa, reason, cpu.describe())


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first call; None where it cannot run here (logged once)."""
    global _lib, _status
    with _lock:
        if _status is None:
            _lib, _status = _decide()
            (logger.info if _lib is not None else logger.warning)("%s; CPU: %s", _status.describe(), _status.cpu)
        return _lib


def available() -> bool:
    if _status is not None:  # the common case, on every layer of every step: no lock
        return _lib is not None
    return load() is not None


def status() -> KernelStatus:
    """Which build runs (deciding now if nothing has asked yet)."""
    load()
    return _status


@contextlib.contextmanager
def using(isa: str | None, emulate_with: str | None = None) -> Iterator[None]:
    """Run `isa`'s build (None: no kernels, PyTorch's path) until the block ends: for tests and
    benchmarks that compare builds in one process. Weights packed under one build run under the
    other (both read the same layout); a model loaded with kernels off has no packed weights.
    `emulate_with` (a SIMDe include directory) runs the AVX-512 code on an AVX2 CPU, slowly.
    Raises RuntimeError for a build this CPU cannot run."""
    global _lib, _status
    load()
    runnable = CpuInfo.read().kernel_isas
    if isa is not None and isa not in runnable and not (emulate_with and "avx2" in runnable):
        raise RuntimeError(f"this CPU cannot run the {isa} build of the kernels")
    lib = None if isa is None else load_build(isa, emulate_with)
    with _lock:
        saved = _lib, _status
        _lib = lib
        why = "CPU kernels off: kernels.using(None)" if isa is None else "selected by kernels.using()"
        _status = KernelStatus(isa if emulate_with is None else f"{isa}-simde", why, saved[1].cpu)
    try:
        yield
    finally:
        with _lock:
            _lib, _status = saved


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def int8_activations() -> bool:
    """Whether weights packed from now on multiply int8-quantized activations (the default, as
    llama.cpp does for these types), or float32 ones (`HERON_CPU_INT8=0`: slower, closer to a float
    reference). Read from heron.env's settings, so `heron.env.override(cpu_int8=...)` changes it."""
    return env_settings().cpu_int8


@dataclass(frozen=True)
class PackedWeight:
    """A GGML-quantized weight [out_features, in_features] repacked into 8-row panels (pack_blocks)."""

    qtype: str
    q: torch.Tensor  # uint8 [panels, blocks, 128] (4-bit) or int8 [panels, blocks, 256] (Q8_0)
    d: torch.Tensor  # float32 [panels, blocks, 8]
    m: torch.Tensor | None  # float32 [panels, blocks, 8], the mins (Q4_1; Q4_0 too when int8)
    out_features: int
    in_features: int
    int8: bool = False  # the layout heron_q8_linear reads (int8 activations), else heron_packed_linear's

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m) if t is not None)


def pack_blocks(
    blocks: torch.Tensor, qtype: str, out_features: int, in_features: int, int8: bool | None = None
) -> PackedWeight:
    """GGML blocks [N, bytes per row] -> the panel layout the kernels read (see cpu_kernels.c): for
    int8 activations (heron_q8_linear) when `int8` is true, or by default when int8_activations()."""
    int8 = int8_activations() if int8 is None else int8
    n, nb = out_features, in_features // 32
    blk = blocks.reshape(n, nb, blocks.shape[-1] // nb)  # [N, blocks, bytes per block]
    panels = -(-n // 8)
    pad = panels * 8 - n

    def halves(offset: int) -> torch.Tensor:  # a float16 field of every block, as float32 [N, nb]
        return blk[..., offset : offset + 2].contiguous().view(torch.float16).reshape(n, nb).float()

    def to_panels(t: torch.Tensor) -> torch.Tensor:  # [N, nb, ...] -> [panels, nb, ..., 8]
        t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) if pad else t
        t = t.reshape(panels, 8, *t.shape[1:])
        return t.permute(0, *range(2, t.dim()), 1).contiguous()

    d = halves(0)
    m = None
    if qtype == "Q8_0":
        values = blk[..., 2:34].contiguous().view(torch.int8)  # [N, nb, 32], k order
        if int8:  # [panels, nb, group, row, 4]
            q = to_panels(values.reshape(n, nb, 8, 4)).transpose(-1, -2).contiguous().view(torch.uint8)
        else:  # [panels, nb, k, row]
            q = to_panels(values)
        q = q.reshape(panels, nb, 256)
    else:
        qs = blk[..., 4:20] if qtype == "Q4_1" else blk[..., 2:18]
        values = torch.cat([qs & 0xF, qs >> 4], dim=-1)  # [N, nb, 32], k order
        if int8:  # byte [v][row][i] = k 8v + i (low nibble) | k 8v + 4 + i (high nibble)
            v = values.reshape(n, nb, 4, 2, 4)
            q = to_panels(v[:, :, :, 0, :] | (v[:, :, :, 1, :] << 4)).transpose(-1, -2)
        else:  # byte [j][row] = k 2j (low nibble) | k 2j + 1 (high nibble)
            v = to_panels(values).reshape(panels, nb, 16, 2, 8)
            q = v[:, :, :, 0, :] | (v[:, :, :, 1, :] << 4)
        q = q.reshape(panels, nb, 128).contiguous()
        if qtype == "Q4_1":
            m = halves(2)
        elif int8:  # (q - 8) d = d q + m with m = -8 d: one kernel for both 4-bit types
            m = -8 * d
    d = to_panels(d.unsqueeze(-1)).reshape(panels, nb, 8).contiguous()
    if m is not None:
        m = to_panels(m.unsqueeze(-1)).reshape(panels, nb, 8).contiguous()
    return PackedWeight(qtype, q, d, m, out_features, in_features, int8)


def packed_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x [M, in_features] float32 (rows contiguous) @ W^T -> [M, out_features]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    y = torch.empty(m, w.out_features, dtype=torch.float32)
    if m:
        if w.int8:
            code = 8 if w.qtype == "Q8_0" else 4
            fn = _lib.heron_q8_linear
        else:
            code = QTYPE_CODES[w.qtype]
            fn = _lib.heron_packed_linear
        rc = fn(
            _ptr(x), x.stride(0), _ptr(w.q), _ptr(w.d), 0 if w.m is None else _ptr(w.m), code,
            _ptr(y), w.out_features, m, w.out_features, w.in_features,
        )
        if rc == -2:
            raise MemoryError(f"heron_q8_linear: no memory for {m} x {w.in_features} quantized activations")
        if rc != 0:
            name = "heron_q8_linear" if w.int8 else "heron_packed_linear"
            raise ValueError(f"{name} cannot take {w.qtype} with K={w.in_features}")
    return y


def quant_rows(blocks: torch.Tensor, qtype: str, in_features: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of W [N, in_features] (GGML blocks), dequantized to float32 [len(rows), in_features]."""
    rows = rows.to(torch.int64).contiguous()
    out = torch.empty(rows.numel(), in_features, dtype=torch.float32)
    rc = _lib.heron_quant_rows(_ptr(blocks), QTYPE_CODES[qtype], in_features, _ptr(rows), rows.numel(), _ptr(out))
    if rc != 0:
        raise ValueError(f"heron_quant_rows cannot take {qtype} with K={in_features}")
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D]: row b attends to cached positions slots[b, :seq_lens[b]] (int64), or
    slots[:seq_lens[b]] when `slots` is one list shared by every row (the tokens of a prefill chunk).
    `out`, when given, is a contiguous [B, H, D] float32 tensor to write into."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    if out is None:
        out = torch.empty(b, h, d, dtype=torch.float32)
    elif not out.is_contiguous() or out.shape != (b, h, d):
        raise ValueError("paged_decode_attention: out must be a contiguous [B, H, D] tensor")
    ld_slots = 0 if slots.dim() == 1 else slots.stride(0)
    if slots.stride(-1) != 1 or int(seq_lens.max()) > slots.shape[-1]:
        raise ValueError("paged_decode_attention: slots must be contiguous rows covering every length")
    rc = _lib.heron_paged_decode_attention(
        _ptr(q), q.stride(0), _ptr(k_cache), _ptr(v_cache), _ptr(slots), ld_slots, slots.shape[-1], _ptr(seq_lens),
        _ptr(out), b, h, hkv, d, scale,
    )
    if rc != 0:
        raise ValueError(f"paged decode attention cannot take head_dim={d}, heads={h}/{hkv}")
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [M, N] float32 (modified in place: x += delta when given) -> RMSNorm(x) * weight, [M, N]."""
    m, n = x.shape
    out = torch.empty(m, n, dtype=torch.float32)
    if delta is not None and delta.stride(-1) != 1:
        delta = delta.contiguous()
    rc = _lib.heron_add_rms_norm(
        _ptr(x), x.stride(0), None if delta is None else _ptr(delta), 0 if delta is None else delta.stride(0),
        _ptr(weight), _ptr(out), m, n, eps,
    )
    if rc != 0:
        raise ValueError(f"heron_add_rms_norm cannot take a hidden size of {n}")
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2I] float32 (contiguous) -> silu(gate) * up, [M, I]."""
    m, two_i = gate_up.shape
    gate_up = gate_up.contiguous()  # held by a name: the pointer must outlive the call
    out = torch.empty(m, two_i // 2, dtype=torch.float32)
    if _lib.heron_silu_mul(_ptr(gate_up), _ptr(out), m, two_i // 2) != 0:
        raise ValueError(f"heron_silu_mul cannot take an intermediate size of {two_i // 2}")
    return out


def rotary_(x: torch.Tensor, num_heads: int, head_dim: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE in place on heads 0 .. num_heads - 1 of each row of x [T, >= num_heads * head_dim]
    (rows may be strided, heads contiguous); cos/sin tables [max_position, head_dim // 2] float32."""
    rc = _lib.heron_rotary(_ptr(x), x.stride(0), x.shape[0], num_heads, head_dim, _ptr(positions), _ptr(cos), _ptr(sin))
    if rc != 0:
        raise ValueError(f"heron_rotary cannot take head_dim={head_dim}")
