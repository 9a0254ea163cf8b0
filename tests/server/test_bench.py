"""`heron bench` end to end, as a user runs it: a subprocess against the session's real `heron serve`.

One tiny run (concurrency 1 and 2, two requests per client, four tokens each) must exit 0 and leave
report.md (a table row per level with nonzero tokens/s), results.json (every request recorded, all
successful) and three real PNG plots. A run against a port where nothing listens must fail at once
with a clear message and write nothing. Report details, --compare and the no-matplotlib path are
covered in-process by tests/unit/test_bench_report.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import DEFAULT_MODEL

LEVELS = (1, 2)
REQUESTS_PER_CLIENT = 2
MAX_TOKENS = 4
PLOTS = ("throughput.png", "ttft.png", "tpot.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # No developer's API key or HERON_* setting may leak into the run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERON_") and k != "OPENAI_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "heron.cli", "bench", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _table(markdown: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table whose header names a `concurrency` column."""
    lines = [line.strip() for line in markdown.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and "| concurrency |" in line)
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return rows


@pytest.mark.timeout(120)
def test_bench_writes_report_results_and_plots(server, tmp_path: Path):
    out = tmp_path / "bench-out"
    result = _bench(
        "--url", server.base_url, "--concurrency", *map(str, LEVELS), "--requests-per-client", str(REQUESTS_PER_CLIENT),
        "--max-tokens", str(MAX_TOKENS), "--output", str(out), "--label", "heron-under-test",
        timeout=90,
    )
    assert result.returncode == 0, f"heron bench failed ({result.returncode}):\n{result.stderr}\n{result.stdout}"

    report = (out / "report.md").read_text()
    assert server.base_url in report and DEFAULT_MODEL in report
    rows = _table(report)
    assert [row["concurrency"] for row in rows] == [str(c) for c in LEVELS], report
    for row in rows:
        assert row["system"] == "heron-under-test"
        assert row["requests ok"] == str(int(row["concurrency"]) * REQUESTS_PER_CLIENT) and row["failed"] == "0"
        assert float(row["output tok/s"]) > 0 and float(row["TTFT p50 (s)"]) > 0, row
    for name in PLOTS:
        assert f"]({name})" in report
    assert _table(result.stdout) == rows  # the same table is printed at the end

    data = json.loads((out / "results.json").read_text())
    assert data["format"] == "heron-bench/1" and data["model"] == DEFAULT_MODEL
    assert [level["summary"]["concurrency"] for level in data["levels"]] == list(LEVELS)
    for level in data["levels"]:
        expected = level["summary"]["concurrency"] * REQUESTS_PER_CLIENT
        assert level["summary"]["num_ok"] == expected and level["summary"]["num_failed"] == 0
        assert len(level["requests"]) == expected and all(r["ok"] for r in level["requests"])
        # ignore_eos is on by default: every answer runs to max_tokens, counted from the usage chunk.
        assert all(r["output_tokens"] == MAX_TOKENS and r["usage_reported"] for r in level["requests"])
        assert level["summary"]["output_tokens_per_s"] > 0

    for name in PLOTS:
        png = (out / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1024, name


@pytest.mark.timeout(60)
def test_bench_without_a_server_fails_clearly(tmp_path: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free once closed: nothing listens there
    out = tmp_path / "never-written"
    result = _bench("--url", f"http://127.0.0.1:{port}", "--max-tokens", "4", "--output", str(out), timeout=45)
    assert result.returncode == 1, result
    assert f"cannot reach a server at http://127.0.0.1:{port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
