"""--generation-config: which sampling defaults a request that omits a field gets, per source."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from heron.models.bundled import default_chat_model_path
from heron.models.loader import GenerationDefaults, sampling_from_generation_config
from heron.server.generation_config import BUNDLED_DEFAULTS, sampling_defaults


def _loaded(source: str, sampling: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(source=source, generation=GenerationDefaults(sampling=dict(sampling or {})))


def test_auto_takes_the_checkpoints_generation_config():
    defaults = sampling_defaults("auto", _loaded("/models/qwen", {"temperature": 0.7, "top_p": 0.8, "top_k": 20}))
    assert defaults.values == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    assert defaults.source == "/models/qwen/generation_config.json"


def test_auto_gives_the_bundled_model_heron_shipped_values():
    defaults = sampling_defaults("auto", _loaded(str(default_chat_model_path())))
    assert defaults.values == BUNDLED_DEFAULTS == {"temperature": 0.2, "top_p": 0.9}
    assert "bundled SmolLM2-135M-Instruct" in defaults.source and "model card" in defaults.source


def test_auto_with_nothing_from_the_model_leaves_openais_defaults():
    defaults = sampling_defaults("auto", _loaded("/models/other.gguf"))
    assert defaults.values == {}
    assert "OpenAI" in defaults.source


def test_openai_ignores_what_the_model_recommends():
    for source in (str(default_chat_model_path()), "/models/qwen"):
        defaults = sampling_defaults("openai", _loaded(source, {"temperature": 0.7}))
        assert defaults.values == {} and "openai" in defaults.source


@pytest.mark.parametrize("as_dir", [True, False])
def test_a_path_names_a_generation_config_file_or_its_directory(tmp_path, as_dir):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "min_p": 0.05, "eos_token_id": 2}))
    setting = str(tmp_path if as_dir else tmp_path / "generation_config.json")
    defaults = sampling_defaults(setting, _loaded(str(default_chat_model_path())))
    assert defaults.values == {"temperature": 0.3, "min_p": 0.05}  # over the bundled values, not merged
    assert defaults.source == f"--generation-config {setting}"


def test_a_path_without_a_readable_config_fails_at_start_up(tmp_path):
    with pytest.raises(ValueError, match="cannot read a generation_config.json"):
        sampling_defaults(str(tmp_path), _loaded("/m"))
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        sampling_defaults(str(tmp_path), _loaded("/m"))


def test_do_sample_false_means_greedy():
    assert sampling_from_generation_config({"do_sample": False, "temperature": 0.6}) == {"temperature": 0.0}
    assert sampling_from_generation_config({"temperature": None, "top_k": 50, "max_new_tokens": 9}) == {"top_k": 50}
