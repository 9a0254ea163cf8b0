"""heron.bench without a server: the timed streaming client on canned SSE (httpx.MockTransport), the
level summaries, the report, --compare, and the report without matplotlib. The end-to-end run against
a real `heron serve` is tests/server/test_bench.py."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

from heron.bench import (
    PLOTS_HINT,
    BenchError,
    BenchParams,
    BenchResult,
    Client,
    LevelResult,
    RequestResult,
    RunSummary,
    make_prompt,
    normalize_url,
    percentile,
    pick_model,
    results_table,
    write_outputs,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sse(*frames: object, done: bool = True) -> bytes:
    body = b"".join(b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames)
    return body + (b"data: [DONE]\n\n" if done else b"")


def _request(handler, params: BenchParams | None = None) -> RequestResult:
    params = params or BenchParams(max_tokens=3)

    async def go() -> RequestResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await Client(http, "http://bench.test", params, "m").request("hi", params.max_tokens)

    return asyncio.run(go())


def _chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def test_client_times_a_stream_and_reads_usage():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content), path=request.url.path)
        usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}
        return httpx.Response(200, content=_sse(_chunk("a"), _chunk("b"), _chunk("c"), usage))

    result = _request(handler)
    assert result.ok and result.usage_reported
    assert (result.output_tokens, result.prompt_tokens, result.num_chunks, len(result.itl_s)) == (3, 9, 3, 2)
    assert result.ttft_s is not None and result.tpot_s is not None and result.latency_s >= result.ttft_s
    assert seen["path"] == "/v1/chat/completions" and seen["model"] == "m" and seen["stream"] is True
    assert seen["ignore_eos"] is True and seen["stream_options"] == {"include_usage": True}
    assert seen["messages"] == [{"role": "user", "content": "hi"}]


def test_client_completions_without_ignore_eos_and_without_usage():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return httpx.Response(200, content=_sse({"choices": [{"text": "x"}]}, {"choices": [{"text": "y"}]}))

    result = _request(handler, BenchParams(endpoint="completions", ignore_eos=False, max_tokens=2))
    assert result.ok and not result.usage_reported and result.output_tokens == 2
    assert seen["prompt"] == "hi" and "ignore_eos" not in seen and "messages" not in seen


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(400, json={"error": {"message": "unknown field ignore_eos"}}), "HTTP 400: "),
        (httpx.Response(200, content=_sse(_chunk("a"), done=False)), "stream ended without data: [DONE]"),
        (httpx.Response(200, content=_sse(_chunk("a"), {"error": {"message": "boom"}})), "error frame: "),
        (httpx.Response(200, content=b"data: not json\n\n"), "bad stream: "),
    ],
)
def test_client_turns_failures_into_failed_results(response: httpx.Response, error: str):
    result = _request(lambda request: response)
    assert not result.ok and result.error.startswith(error), result.error


def test_client_reports_a_broken_connection():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    result = _request(handler)
    assert not result.ok and result.error.startswith("ConnectError")


def test_prompts_urls_models_and_percentiles():
    assert make_prompt(3) == make_prompt(3) and make_prompt(3) != make_prompt(4)
    assert make_prompt(3).startswith("Request 3. ")
    assert len(make_prompt(3, prompt_tokens=500)) > 4 * len(make_prompt(3))
    assert normalize_url("127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert normalize_url("https://host/v1") == "https://host"
    with pytest.raises(ValueError):
        normalize_url("ftp://host")
    assert pick_model(["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"]) == "SmolLM2-135M-Instruct"
    assert pick_model(["bge-small"]) == "bge-small" and pick_model([]) is None
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    with pytest.raises(ValueError):
        BenchParams(concurrency=(0,))


def _result(label: str, tokens_per_request: int = 4) -> BenchResult:
    params = BenchParams(concurrency=(1, 2), requests_per_client=2, max_tokens=4)
    levels = []
    for c in params.concurrency:
        level = LevelResult(c, wall_s=1.0, load_avg="0.1/0.1/0.1")
        for i in range(2 * c):
            level.results.append(RequestResult(True, tokens_per_request, ttft_s=0.1 * c + 0.01 * i, tpot_s=0.02 * c,
                                               latency_s=0.3, usage_reported=True, prompt_tokens=30, num_chunks=4,
                                               itl_s=[0.02 * c] * 3))
        levels.append(level)
    levels[1].results.append(RequestResult(False, error="HTTP 503: overloaded", latency_s=0.01))
    return BenchResult(
        label=label, url="http://127.0.0.1:8000", model="m", params=params, command="heron bench --url x",
        started_at="2025-01-01T00:00:00+00:00", machine="test CPU, 2 CPUs", load_avg_start="0", load_avg_end="0",
        server_owner="heron", warmup=None, levels=levels,
    )


def test_level_summary_counts_failures():
    summary = _result("a").levels[1].summary()
    assert (summary["num_requests"], summary["num_ok"], summary["num_failed"]) == (5, 4, 1)
    assert summary["output_tokens_per_s"] == 16.0 and summary["requests_per_s"] == 4.0
    assert summary["errors"] == {"HTTP 503: overloaded": 1}
    assert summary["ttft_s"]["p50"] == pytest.approx(0.215) and summary["tpot_s"]["p99"] == pytest.approx(0.04)


def test_report_json_plots_and_compare(tmp_path: Path):
    first = write_outputs(_result("llama.cpp", tokens_per_request=3), tmp_path / "a", [])
    assert {p.name for p in first} == {"results.json", "report.md", "throughput.png", "ttft.png", "tpot.png"}
    earlier = RunSummary.load(tmp_path / "a" / "results.json")
    assert earlier.label == "llama.cpp" and [s["concurrency"] for s in earlier.levels] == [1, 2]

    write_outputs(_result("heron"), tmp_path / "b", [earlier])
    report = (tmp_path / "b" / "report.md").read_text()
    assert results_table([_result("heron").summary(), earlier]) in report
    assert "| heron | 2 | 4 | 1 | 16.0 |" in report and "| llama.cpp | 2 | 4 | 1 | 12.0 |" in report
    assert "C=2: 1 failed request(s): HTTP 503: overloaded" in report
    assert "Compared runs:" in report and "**llama.cpp**" in report
    for name in ("throughput.png", "ttft.png", "tpot.png"):
        png = (tmp_path / "b" / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1024


def test_compare_rejects_files_that_are_not_results(tmp_path: Path):
    bogus = tmp_path / "results.json"
    bogus.write_text(json.dumps({"hello": 1}))
    with pytest.raises(BenchError, match="not a results.json"):
        RunSummary.load(bogus)
    with pytest.raises(BenchError, match="cannot read"):
        RunSummary.load(tmp_path / "missing.json")


def test_without_matplotlib_the_report_says_how_to_get_plots(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    written = write_outputs(_result("heron"), tmp_path, [])
    assert {p.name for p in written} == {"results.json", "report.md"}
    assert PLOTS_HINT in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png"))
