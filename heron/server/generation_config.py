"""Which sampling defaults a request that leaves a field out gets: `--generation-config`.

As vLLM's `--generation-config auto`: a field the request omits takes the model's own
recommendation, and OpenAI's default only where the model says nothing; a field the request sets
always wins (heron/server/serving_common.py `sampling_params`). Sources:

- `auto` (default): the checkpoint's generation_config.json (Hugging Face directories); for the
  bundled SmolLM2-135M-Instruct, which ships as a GGUF file without one, the values Heron ships
  with it (`BUNDLED_DEFAULTS`, below, with their source); otherwise none.
- `openai`: none, so OpenAI's defaults (temperature 1, top_p 1) apply, as a plain OpenAI server.
- a path: a generation_config.json file, or a directory holding one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heron.models.bundled import DEFAULT_CHAT_MODEL_NAME, default_chat_model_path
from heron.models.loader import sampling_from_generation_config

# SmolLM2-135M-Instruct's model card (HuggingFaceTB/SmolLM2-135M-Instruct, "How to use") generates
# with temperature=0.2, top_p=0.9; its generation_config.json sets no sampling values. At OpenAI's
# temperature 1.0 the 135M model mostly writes nonsense ("The capital of France is arrondse").
BUNDLED_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}
BUNDLED_SOURCE = f"Heron's defaults for the bundled {DEFAULT_CHAT_MODEL_NAME} (from its model card)"


@dataclass(frozen=True)
class SamplingDefaults:
    values: dict[str, Any] = field(default_factory=dict)
    source: str = "none (OpenAI's defaults)"


def _read(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json" if path.is_dir() else path
    try:
        gen = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--generation-config {path}: cannot read a generation_config.json there ({exc})") from exc
    if not isinstance(gen, dict):
        raise ValueError(f"--generation-config {path}: {file} is not a JSON object")
    return gen


def _is_bundled(source: str) -> bool:
    try:
        return Path(source).resolve() == default_chat_model_path().resolve()
    except (OSError, FileNotFoundError):
        return False


def sampling_defaults(setting: str, loaded: Any) -> SamplingDefaults:
    """The defaults for one loaded generation model under `--generation-config setting`."""
    if setting == "openai":
        return SamplingDefaults(source="--generation-config openai (OpenAI's defaults)")
    if setting != "auto":
        path = Path(setting)
        values = sampling_from_generation_config(_read(path))
        return SamplingDefaults(values, f"--generation-config {path}")
    if loaded.generation.sampling:
        return SamplingDefaults(dict(loaded.generation.sampling), f"{loaded.source}/generation_config.json")
    if _is_bundled(loaded.source):
        return SamplingDefaults(dict(BUNDLED_DEFAULTS), BUNDLED_SOURCE)
    return SamplingDefaults()
