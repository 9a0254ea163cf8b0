"""heron.env: the engine's environment switches, parsed once, with bad values refused by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from heron import env


def test_defaults_of_an_empty_environment(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    settings = env.EnvSettings.from_env({})
    assert settings == env.EnvSettings(True, "auto", True, Path("/home/someone/.cache/heron"), None)


def test_every_variable_is_read():
    settings = env.EnvSettings.from_env(
        {"HERON_CPU_KERNELS": "off", "HERON_CPU_ISA": "AVX2", "HERON_CPU_INT8": "False", "HERON_CACHE_DIR": "/c", "CC": "clang"}
    )
    assert settings == env.EnvSettings(False, "avx2", False, Path("/c"), "clang")


def test_cache_dir_falls_back_to_xdg_then_home():
    assert env.EnvSettings.from_env({"XDG_CACHE_HOME": "/x"}).cache_dir == Path("/x/heron")
    # An empty variable counts as unset, for every switch.
    assert env.EnvSettings.from_env({"HERON_CACHE_DIR": "", "XDG_CACHE_HOME": "/x"}).cache_dir == Path("/x/heron")
    assert env.EnvSettings.from_env({"HERON_CPU_INT8": " "}).cpu_int8


@pytest.mark.parametrize("name", ["HERON_CPU_KERNELS", "HERON_CPU_INT8"])
def test_a_boolean_that_is_not_one_names_the_variable(name):
    with pytest.raises(ValueError, match=f"{name}='maybe' is not a boolean"):
        env.EnvSettings.from_env({name: "maybe"})


def test_read_once_then_overridden_and_restored(monkeypatch):
    first = env.env_settings()
    monkeypatch.setenv("HERON_CPU_INT8", "0" if first.cpu_int8 else "1")
    assert env.env_settings() is first  # a variable set after the first read changes nothing
    with env.override(cpu_int8=not first.cpu_int8, cache_dir="/tmp/elsewhere") as changed:
        assert env.env_settings() is changed and changed.cache_dir == Path("/tmp/elsewhere")
    assert env.env_settings() is first
    with env.override():  # restores the process's record after the reload too
        assert env.reload() is env.env_settings() and env.env_settings().cpu_int8 is not first.cpu_int8
    assert env.env_settings() is first
    with pytest.raises(TypeError):
        with env.override(cpu_int9=False):
            pass


def test_a_bad_value_stops_the_first_model_load():
    proc = subprocess.run(
        [sys.executable, "-c", "from heron import kernels; kernels.status()"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("HERON_CPU")}, "HERON_CPU_KERNELS": "perhaps"},
        capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "HERON_CPU_KERNELS='perhaps' is not a boolean" in proc.stderr
