"""Loading a model from a GGUF file or a Hugging Face directory into Heron's own modules.

`load_model(path, dtype, device)` returns a LoadedModel: the module with weights in place, its
ArchConfig, tokenizer, chat template source and generation defaults. The module is built on the
meta device and materialised empty, and weights stream in one tensor at a time, so peak memory is
about one copy of the model plus its largest tensor.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from heron import kernels
from heron.cpu_info import CpuInfo
from heron.models.arch_config import ArchConfig
from heron.models.bundled import default_chat_model_path
from heron.models.gguf import GGUFFile, hf_tensor_name, unpermute_qk
from heron.models.layers.quantized import QuantizedTensor
from heron.models.registry import CROSS_ENCODER_ARCHITECTURES, ENCODER_ARCHITECTURES, resolve_model_class
from heron.models.tokenizer import Tokenizer

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# GGUF architectures whose Q/K rows llama.cpp's converter permuted for its interleaved RoPE.
_PERMUTED_QK_ARCHS = {"llama", "mistral"}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Start-up probe: bf16 must beat float32 by this much on a model-sized matmul to be picked.
_BF16_MIN_SPEEDUP = 1.15


def measure_bf16_speedup(hidden_size: int = 1024, tokens: int = 32, repeats: int = 5) -> float:
    """float32 time / bf16 time of one [tokens, H] @ [H, 3H] matmul here (median of `repeats`)."""
    import time

    def median_time(dt: torch.dtype) -> float:
        x = torch.randn(tokens, hidden_size).to(dt)
        w = torch.randn(hidden_size, 3 * hidden_size).to(dt)
        x @ w  # warm-up: oneDNN picks and caches its kernel on the first call
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ w
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    return median_time(torch.float32) / max(median_time(torch.bfloat16), 1e-9)


@dataclass(frozen=True)
class RunPath:
    """How a model runs here: the dtype and why, and whether its GGUF matrices run Heron's kernels."""

    dtype: torch.dtype
    dtype_reason: str
    quantized_kernels: bool  # GGUF Q4_0/Q4_1/Q8_0 matrices multiplied from their blocks
    kernels: kernels.KernelStatus | None  # None off the CPU

    def describe(self) -> str:
        parts = [f"{str(self.dtype).removeprefix('torch.')} ({self.dtype_reason})"]
        if self.kernels is not None:
            parts.append(self.kernels.describe())
            if self.kernels.isa is not None and not self.quantized_kernels:
                parts.append("no matrix in a type the kernels read: PyTorch matmuls")
        return "; ".join(parts)


def choose_dtype(
    dtype: str,
    device: torch.device,
    *,
    quantized_kernels: bool = False,
    embedding: bool = False,
    cpu: CpuInfo | None = None,
    bf16_speedup: Callable[[], float] = measure_bf16_speedup,
) -> tuple[torch.dtype, str]:
    """The run dtype and why. `auto` on a CPU: float32 where Heron's kernels run the quantized
    weights (they take float32 activations), for embedding models (a bf16 vector moves by ~1e-3
    with the inputs batched beside it, so one text's vector would depend on other clients'
    traffic), and where the CPU has no native bf16 (oneDNN emulates it on AVX-512, several times
    slower); bf16 only with AVX512-BF16/AMX *and* a start-up matmul measured at least 1.15x faster
    than float32's. Never fp16 on a CPU."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
        return _DTYPES[dtype], "asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU computes bf16"
        return torch.float16, "auto: the GPU has no bf16"
    if device.type != "cpu":
        return torch.float32, f"auto on {device.type}"
    if quantized_kernels:
        return torch.float32, "auto: the quantized matrices run Heron's kernels on float32 activations"
    if embedding:
        return torch.float32, "auto: embedding models run float32 on a CPU, so a vector does not depend on its batch"
    cpu = cpu or CpuInfo.read()
    if not cpu.native_bf16:
        return torch.float32, "auto: no native bf16 on this CPU (no avx512_bf16 / amx_bf16)"
    speedup = bf16_speedup()
    if speedup >= _BF16_MIN_SPEEDUP:
        return torch.bfloat16, f"auto: native bf16, a matmul measured {speedup:.2f}x float32's speed"
    return torch.float32, f"auto: native bf16, but a matmul measured only {speedup:.2f}x float32's speed"


def resolve_dtype(dtype: str, device: torch.device, *, quantized_kernels: bool = False) -> torch.dtype:
    return choose_dtype(dtype, device, quantized_kernels=quantized_kernels)[0]


def plan_run_path(path: Path, dtype: str, device: torch.device, keep_quantized: bool = True,
                  gguf: GGUFFile | None = None) -> RunPath:
    """Decide, without loading weights, the dtype and kernels a model at `path` runs with here.
    `gguf`: the file already opened, if the caller has it (opening one parses all its metadata)."""
    if path.is_file() and gguf is None:
        gguf = GGUFFile(path)
    if gguf is None:
        return _run_path(dtype, device, False, _is_embedding_dir(path))
    return _run_path(dtype, device, bool(_kept_blocks(gguf, device, keep_quantized)))


def _architecture_of(model_dir: Path) -> str | None:
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    return architectures[0] if architectures else None


def _is_embedding_dir(model_dir: Path) -> bool:
    """An encoder (embedding model or cross-encoder): built from its HF config dict, run by the
    EmbeddingEngine, float32 on a CPU."""
    return _architecture_of(model_dir) in ENCODER_ARCHITECTURES


def _is_cross_encoder_dir(model_dir: Path) -> bool:
    return _architecture_of(model_dir) in CROSS_ENCODER_ARCHITECTURES


def _run_path(dtype: str, device: torch.device, quantized_kernels: bool, embedding: bool = False) -> RunPath:
    torch_dtype, reason = choose_dtype(dtype, device, quantized_kernels=quantized_kernels, embedding=embedding)
    return RunPath(torch_dtype, reason, quantized_kernels, kernels.status() if device.type == "cpu" else None)


@dataclass
class GenerationDefaults:
    """What a checkpoint's generation_config.json says; request values override these."""

    eos_token_ids: tuple[int, ...] = ()
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k, ...


@dataclass
class LoadedModel:
    model: torch.nn.Module | None  # None when loaded with_weights=False (the model runs in workers)
    arch_config: ArchConfig | None  # None for encoder models, which keep their HF config dict
    hf_config: dict[str, Any] | None
    tokenizer: Tokenizer
    chat_template: str | None
    generation: GenerationDefaults
    source: str  # the file or directory loaded
    source_format: str  # "gguf" | "hf"
    quantization: str  # e.g. "Q4_1 (210), F32 (61), Q8_0 (1)" or "bf16"
    num_parameters: int
    dtype: torch.dtype
    device: torch.device
    is_embedding: bool = False  # an encoder, run by heron.engine.embedding (embeddings, or scores below)
    is_cross_encoder: bool = False  # an encoder that scores (query, document) pairs: /v1/rerank, /v1/score
    run_path: RunPath | None = None  # how it runs here, for the start-up log

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = list(self.generation.eos_token_ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(ids)


def _progress(label: str, total: int, enabled: bool) -> Callable[[int], None]:
    """A one-line progress indicator on stderr; returns a callback taking the count done."""
    start = time.monotonic()
    width = 30
    last_filled = -1

    def update(done: int) -> None:
        nonlocal last_filled
        filled = width * done // max(total, 1)
        # Redraw only when the bar moves: a terminal write per tensor is itself slow.
        if not enabled or (filled == last_filled and done < total):
            return
        last_filled = filled
        sys.stderr.write(
            f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {time.monotonic() - start:5.1f}s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return update


def _materialise(model_class: type, config: ArchConfig, dtype: torch.dtype, device: torch.device, **kwargs):
    # Build on meta (no memory, no random init), then allocate uninitialised storage on the device:
    # every parameter is overwritten by load_weights, which fails loudly on any it did not fill.
    with torch.device("meta"):
        model = model_class(config, **kwargs)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.init_tables(device)
    # The device and dtype are final here: the attention backend and fused ops are chosen for them.
    model.prepare(device, dtype)
    return model.eval()


def _kept_blocks(gguf: GGUFFile | None, device: torch.device, keep_quantized: bool) -> set[str]:
    """GGUF tensors to keep as blocks for the CPU kernels: every weight of a module (fused Q/K/V and
    gate/up count as one) whose tensors all have a type the kernels read. On CPU, whatever the dtype of
    the rest (the layers hand the kernels float32 activations and cast the results back)."""
    if gguf is None or not keep_quantized or device.type != "cpu" or not kernels.available():
        return set()
    config = ArchConfig.from_gguf(gguf, has_output_weight="output.weight" in set(gguf.tensor_names))
    model_class = resolve_model_class(config.architecture)
    if not hasattr(model_class, "module_of"):
        return set()
    by_module: dict[str, list] = {}
    for t in gguf.tensors:
        name = hf_tensor_name(t.name)
        if name is None or not name.endswith(".weight") or len(t.shape) != 2:
            continue
        by_module.setdefault(model_class.module_of(name), []).append(t)
    keep = set()
    for tensors in by_module.values():
        if all(t.qtype.name in kernels.QTYPE_CODES and t.shape[1] % 32 == 0 for t in tensors):
            keep.update(t.name for t in tensors)
    return keep


def _load_gguf(path: Path, gguf: GGUFFile, dtype: torch.dtype, device: torch.device, progress: bool,
               keep: set[str], with_weights: bool = True) -> LoadedModel:
    names = set(gguf.tensor_names)
    config = ArchConfig.from_gguf(gguf, has_output_weight="output.weight" in names)
    model_class = resolve_model_class(config.architecture)
    if not with_weights:
        return _without_weights(path, config, Tokenizer.from_gguf(gguf.metadata), gguf.metadata.get("tokenizer.chat_template"),
                                GenerationDefaults(eos_token_ids=config.eos_token_ids), "gguf", gguf.num_parameters, dtype, device)
    freq_factors = None
    if "rope_freqs.weight" in names:
        freq_factors = next(t for n, t in gguf.iter_tensors(torch.float32, only={"rope_freqs.weight"}))
    model = _materialise(model_class, config, dtype, device, rope_freq_factors=freq_factors)
    permute = gguf.architecture in _PERMUTED_QK_ARCHS
    update = _progress(f"Loading {path.name}", len(names), progress)

    def tensors() -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        for gguf_name, tensor in gguf.iter_tensors(dtype, only=names - keep):
            yield gguf_name, tensor.to(device)
        for t in gguf.tensors:
            if t.name in keep:
                yield t.name, QuantizedTensor(t.qtype.name, gguf.raw_blocks(t), (t.shape[0], t.shape[1]))

    def weights() -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        for i, (gguf_name, tensor) in enumerate(tensors(), 1):
            update(i)
            name = hf_tensor_name(gguf_name)
            if name is None:
                if gguf_name == "rope_freqs.weight":
                    continue
                raise ValueError(f"GGUF tensor {gguf_name!r} has no place in {config.architecture}")
            for suffix, heads in (("q_proj.weight", config.num_attention_heads), ("k_proj.weight", config.num_key_value_heads)):
                if permute and name.endswith(suffix):
                    if isinstance(tensor, QuantizedTensor):
                        # Blocks run along a row, so permuting rows moves whole rows of blocks.
                        tensor = tensor.with_blocks(unpermute_qk(tensor.blocks, heads))
                    else:
                        tensor = unpermute_qk(tensor, heads)
            yield name, tensor

    model.load_weights(weights())
    tokenizer = Tokenizer.from_gguf(gguf.metadata)
    types = gguf.tensor_types()
    quantization = ", ".join(f"{k} ({v})" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))
    if keep:
        kept = sorted({t.qtype.name for t in gguf.tensors if t.name in keep})
        activations = "int8" if kernels.int8_activations() else "float32"
        quantization += (
            f"; {len(keep)} matrices run from their {'/'.join(kept)} blocks "
            f"(CPU kernels {kernels.status().isa}, {activations} activations)"
        )
    return LoadedModel(
        model=model,
        arch_config=config,
        hf_config=None,
        tokenizer=tokenizer,
        chat_template=gguf.metadata.get("tokenizer.chat_template"),
        generation=GenerationDefaults(eos_token_ids=config.eos_token_ids),
        source=str(path),
        source_format="gguf",
        quantization=quantization,
        num_parameters=gguf.num_parameters,
        dtype=dtype,
        device=device,
    )


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors shards, in index order when an index file is present."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_safetensors(model_dir: str | Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time across all shards, converted to dtype when given."""
    from safetensors import safe_open

    for file in safetensors_files(Path(model_dir)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor if dtype is None else tensor.to(dtype)


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_from_generation_config(gen: dict[str, Any]) -> dict[str, Any]:
    """The sampling defaults a generation_config.json recommends (`do_sample: false` is greedy)."""
    if gen.get("do_sample") is False:
        return {"temperature": 0.0}
    return {key: gen[key] for key in SAMPLING_KEYS if gen.get(key) is not None}


def _generation_defaults(model_dir: Path, config: dict[str, Any]) -> GenerationDefaults:
    path = model_dir / "generation_config.json"
    gen = json.loads(path.read_text()) if path.exists() else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return GenerationDefaults(eos_token_ids=eos_ids, sampling=sampling_from_generation_config(gen))


def _num_safetensors(model_dir: Path) -> int:
    from safetensors import safe_open

    count = 0
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            count += len(f.keys())
    return count


def _without_weights(path: Path, config: ArchConfig, tokenizer: Tokenizer, chat_template: str | None,
                     generation: GenerationDefaults, source_format: str, num_parameters: int, dtype: torch.dtype,
                     device: torch.device, hf_config: dict[str, Any] | None = None) -> LoadedModel:
    """A decoder's description without its weights: what an API server whose model runs in worker
    processes (tensor-parallel ranks, data-parallel replicas) needs of it."""
    return LoadedModel(
        model=None,
        arch_config=config,
        hf_config=hf_config,
        tokenizer=tokenizer,
        chat_template=chat_template,
        generation=generation,
        source=str(path),
        source_format=source_format,
        quantization="in the workers",
        num_parameters=num_parameters,
        dtype=dtype,
        device=device,
    )


def _load_hf_dir(model_dir: Path, dtype: torch.dtype, device: torch.device, progress: bool,
                 with_weights: bool = True) -> LoadedModel:
    hf_config = json.loads((model_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_hf_dir(model_dir)
    architectures = hf_config.get("architectures") or []
    is_embedding = _is_embedding_dir(model_dir)
    is_cross_encoder = _is_cross_encoder_dir(model_dir)
    if is_embedding:
        # Encoders keep their HF config dict; they are small enough to build directly.
        config = None
        model = resolve_model_class(architectures[0])(hf_config).to(dtype=dtype, device=device)
        if is_cross_encoder and model.num_labels != 1:
            # Rerank and score give one number per pair; a several-label classifier gives several.
            raise ValueError(
                f"{model_dir}: {architectures[0]} with {model.num_labels} labels is not supported; "
                "Heron serves cross-encoders with one label (a relevance logit)"
            )
    else:
        config = ArchConfig.from_hf_config(hf_config)
        if not with_weights:
            with torch.device("meta"):
                count = sum(p.numel() for p in resolve_model_class(config.architecture)(config).parameters())
            return _without_weights(model_dir, config, tokenizer, tokenizer.chat_template,
                                    _generation_defaults(model_dir, hf_config), "hf", count, dtype, device, hf_config)
        model = _materialise(resolve_model_class(config.architecture), config, dtype, device)
    update = _progress(f"Loading {model_dir.name}", _num_safetensors(model_dir), progress)

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for i, (name, tensor) in enumerate(iter_safetensors(model_dir, dtype), 1):
            update(i)
            yield name, tensor.to(device)

    model.load_weights(weights())
    return LoadedModel(
        model=model.eval(),
        arch_config=config,
        hf_config=hf_config,
        tokenizer=tokenizer,
        chat_template=None if is_embedding else tokenizer.chat_template,
        generation=GenerationDefaults() if is_embedding else _generation_defaults(model_dir, hf_config),
        source=str(model_dir),
        source_format="hf",
        quantization=str(dtype).removeprefix("torch."),
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype=dtype,
        device=device,
        is_embedding=is_embedding,
        is_cross_encoder=is_cross_encoder,
    )


def resolve_model_path(model: str | None) -> Path:
    """None -> the bundled default; otherwise a .gguf file or a Hugging Face directory."""
    path = default_chat_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (Heron loads local GGUF files and Hugging Face directories)")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise FileNotFoundError(f"{path} has no config.json and not exactly one .gguf file")
    return path


def load_model(
    model: str | Path | None = None,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
    keep_quantized: bool = True,
    with_weights: bool = True,
) -> LoadedModel:
    """keep_quantized: run GGUF matrices from their blocks where the CPU kernels can (an x86-64 CPU
    with AVX2, whatever the dtype); False dequantizes every tensor to `dtype` at load time.
    with_weights=False: a decoder's config, tokenizer and chat template only (`model` is None), for
    a process whose model runs elsewhere; an encoder loads whole either way."""
    path = resolve_model_path(None if model is None else str(model))
    torch_device = resolve_device(device)
    if path.is_file():
        gguf = GGUFFile(path)
        keep = _kept_blocks(gguf, torch_device, keep_quantized)
        run_path = _run_path(dtype, torch_device, bool(keep))
        loaded = _load_gguf(path, gguf, run_path.dtype, torch_device, progress, keep, with_weights)
    else:
        run_path = _run_path(dtype, torch_device, False, _is_embedding_dir(path))
        loaded = _load_hf_dir(path, run_path.dtype, torch_device, progress, with_weights)
    loaded.run_path = run_path
    return loaded
