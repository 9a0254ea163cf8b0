"""The `heron` command as a user runs it: inspect and generate on the bundled models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from heron.cpu_info import CpuInfo


def heron(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "heron.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )


def test_inspect_bundled_gguf_reports_what_a_user_needs():
    result = heron("inspect", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "gguf"
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == 134_515_008
    assert info["context_length"] == 8192
    assert info["vocab_size"] == 49152
    assert info["quantization"].startswith("Q4_1 x210")
    assert info["special_tokens"]["eos_token"] == "<|im_end|>"
    assert info["chat_template_source"].startswith("GGUF metadata")
    assert info["weight_memory"].endswith(("MiB", "GiB"))
    # Which path runs and why, from this CPU's own flags.
    cpu = CpuInfo.read()
    assert info["cpu"] == cpu.describe()
    if cpu.kernel_isas:
        assert info["run_dtype"] == "float32"
        assert f"CPU kernels {cpu.kernel_isas[0]}" in info["run_path"] and "int8 activations" in info["run_path"]


def test_inspect_names_the_forced_build():
    if not CpuInfo.read().kernel_isas:
        pytest.skip("no kernel build runs on this CPU")
    result = heron("inspect", "--json", env={"HERON_CPU_ISA": "avx2"})
    assert result.returncode == 0, result.stderr
    assert "CPU kernels avx2 (avx2, forced by HERON_CPU_ISA)" in json.loads(result.stdout)["run_path"]


def test_inspect_hf_directory(minilm_dir):
    result = heron("inspect", str(minilm_dir), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "hf"
    assert info["architecture"] == "BertModel"
    assert info["vocab_size"] == 30522
    assert info["parameters"] == 22_713_216  # weights only, not the position-id buffer


def test_inspect_missing_model_is_a_clean_error(tmp_path):
    result = heron("inspect", str(tmp_path / "nope.gguf"))
    assert result.returncode == 2
    assert "model not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_answers_the_capital_of_france_with_progress():
    result = heron("generate", "-p", "What is the capital of France?", "--max-tokens", "32", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Paris" in answer["text"]
    # Loading shows a progress bar on stderr.
    assert "Loading SmolLM2-135M-Instruct.Q4_1.gguf" in result.stderr
    assert "272/272" in result.stderr


def test_generate_without_the_cpu_kernels_gives_the_same_answer():
    # HERON_CPU_KERNELS=0: the PyTorch float32 path (weights dequantized at load), as on a CPU
    # without AVX2 or a machine without a C compiler. The kernels with float32 activations
    # (HERON_CPU_INT8=0) compute the same products in another order: the same text. The default,
    # int8 activations, may pick other words, not another answer.
    args = ("generate", "-p", "What is the capital of France?", "--max-tokens", "32", "--json")
    texts = {}
    for name, env in (("plain", {"HERON_CPU_KERNELS": "0"}), ("float32", {"HERON_CPU_INT8": "0"}), ("int8", None)):
        result = heron(*args, env=env)
        assert result.returncode == 0, result.stderr
        texts[name] = json.loads(result.stdout.strip().splitlines()[-1])["text"]
    assert "Paris" in texts["plain"] and "Paris" in texts["int8"]
    assert texts["plain"] == texts["float32"]
