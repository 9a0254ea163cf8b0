"""`heron serve` settings: sizes, flags over HERON_* variables over defaults, --model specs."""

from __future__ import annotations

import pytest

from heron.server.registry import parse_model_spec
from heron.server.settings import ServerSettings, parse_args, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1048576", 1048576), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5KiB", 1536), ("64 mib", 64 * 2**20)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "12XB", "-5MiB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_defaults_environment_and_flags():
    assert parse_args([], environ={}) == ServerSettings()
    env = {
        "HERON_PORT": "9000",
        "HERON_API_KEY": "a, b",
        "HERON_STRICT_FIELDS": "true",
        "HERON_KV_CACHE_MEMORY": "256MiB",
        "HERON_MODELS": "x.gguf=one;y-dir",
        "HERON_MODEL": "main.gguf",
    }
    from_env = parse_args([], environ=env)
    assert (from_env.port, from_env.api_key, from_env.strict_fields) == (9000, ["a", "b"], True)
    assert from_env.kv_cache_memory == 256 * 2**20
    assert from_env.models == ["x.gguf=one", "y-dir"] and from_env.model == "main.gguf"
    # A flag beats the environment; repeated list flags collect.
    flagged = parse_args(
        ["m.gguf", "--port", "9100", "--api-key", "k1", "--api-key", "k2", "--no-strict-fields",
         "--served-model-name", "n1", "n2"],
        environ=env,
    )
    assert (flagged.model, flagged.port, flagged.api_key, flagged.strict_fields) == ("m.gguf", 9100, ["k1", "k2"], False)
    assert flagged.served_model_name == ["n1", "n2"]


def test_model_spec():
    assert parse_model_spec("path/model.gguf") == ("path/model.gguf", [])
    assert parse_model_spec("dir=embed, alias") == ("dir", ["embed", "alias"])
    with pytest.raises(ValueError):
        parse_model_spec("dir=")
