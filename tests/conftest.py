"""Shared fixtures: where the bundled models lie."""

import pytest

from heron.models.bundled import default_chat_model_path, default_embedding_model_path


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    return default_chat_model_path()


@pytest.fixture(scope="session")
def minilm_dir():
    return default_embedding_model_path()
