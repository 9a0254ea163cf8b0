"""GET /metrics (Prometheus text format) and the per-request log line, against real servers.

The metrics tests run against the session's default server and compare two scrapes around the
requests they send, so whatever other tests did before does not matter. The JSON log line is
checked on a small server of this module's own (`--log-format json --log-prompts`, plus an API key
to show that /metrics stays open); the text form on the default server's log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    DEFAULT_MODEL,
    Server,
    make_client,
    start_server,
    stop_server,
    stream_post,
)

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, frozenset], float]
MODEL_LABEL = {"model_name": DEFAULT_MODEL}
# Histograms every finished engine request observes once.
PER_REQUEST_HISTOGRAMS = (
    "heron:time_to_first_token_seconds",
    "heron:e2e_request_latency_seconds",
    "heron:request_queue_time_seconds",
    "heron:request_prompt_tokens",
    "heron:request_generation_tokens",
)
# A prompt of several 16-token blocks, sent twice: the second request hits the prefix cache.
LONG_QUESTION = (
    "Here is a list of things to remember: apples, pears, plums, cherries, grapes, lemons, limes, "
    "oranges, melons and figs. Which of them is the largest fruit?"
)


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"].startswith("text/plain"), response.headers["content-type"]
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_for_metrics(client: httpx.Client, condition: Callable[[Samples], bool], timeout: float = 5.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(client)
        if condition(samples):
            return samples
        assert time.monotonic() < deadline, "metrics never reached the expected state"
        time.sleep(0.05)


def idle(samples: Samples) -> bool:
    return (
        value(samples, "heron:num_requests_running", **MODEL_LABEL) == 0
        and value(samples, "heron:num_requests_waiting", **MODEL_LABEL) == 0
    )


def log_lines(server: Server, marker: str, timeout: float = 3.0) -> list[str]:
    """The server's log lines containing `marker` (the line is written just after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.log_text().splitlines() if marker in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def stream_usage(client: httpx.Client, path: str, body: dict[str, Any], **kwargs: Any) -> tuple[dict, list[str]]:
    """Stream a request with include_usage; its usage and each choice's finish reason."""
    _, sse = stream_post(client, path, {**body, "stream": True, "stream_options": {"include_usage": True}}, **kwargs)
    reasons = [c["finish_reason"] for chunk in sse.chunks for c in chunk["choices"] if c.get("finish_reason")]
    return sse.chunks[-1]["usage"], reasons


# =============================================================================================
# Metrics on the default server
# =============================================================================================


def test_metrics_count_what_the_responses_report(http, server):
    before = wait_for_metrics(http, idle)
    usages: list[dict] = []
    reasons: list[str] = []

    first = http.post(CHAT_PATH, json=chat(LONG_QUESTION, max_tokens=5), headers={"X-Request-Id": "metrics-chat-1"})
    assert first.status_code == 200, first.text
    usages.append(first.json()["usage"])
    reasons += [c["finish_reason"] for c in first.json()["choices"]]
    # The same prompt again, streamed: its full blocks come from the prefix cache.
    usage, stream_reasons = stream_usage(http, CHAT_PATH, chat(LONG_QUESTION, max_tokens=6), headers={"X-Request-Id": "metrics-chat-2"})
    usages.append(usage)
    reasons += stream_reasons
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 16, usage
    completion = http.post(COMPLETIONS_PATH, json={"model": DEFAULT_MODEL, "prompt": "Once upon a time", "max_tokens": 4})
    assert completion.status_code == 200, completion.text
    usages.append(completion.json()["usage"])
    reasons += [c["finish_reason"] for c in completion.json()["choices"]]
    usage, stream_reasons = stream_usage(
        http, COMPLETIONS_PATH, {"model": DEFAULT_MODEL, "prompt": "The sky is", "max_tokens": 3, "stop": ["\n"]}
    )
    usages.append(usage)
    reasons += stream_reasons
    bad = http.post(CHAT_PATH, json={"model": DEFAULT_MODEL}, headers={"X-Request-Id": "metrics-bad-1"})
    assert bad.status_code == 400
    assert http.get("/no/such/path/1234").status_code == 404
    num_requests = len(usages)

    after = scrape(http)
    # Finish reasons: one per sample, as the engine reports them (no tool calls here).
    for reason in ("stop", "length", "abort"):
        assert delta(before, after, "heron:request_success_total", finished_reason=reason, **MODEL_LABEL) == reasons.count(reason), reason
    # Token counters equal the usage the responses reported.
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    completion_tokens = sum(u["completion_tokens"] for u in usages)
    assert delta(before, after, "heron:prompt_tokens_total", **MODEL_LABEL) == prompt_tokens
    assert delta(before, after, "heron:generation_tokens_total", **MODEL_LABEL) == completion_tokens
    assert delta(before, after, "heron:request_prompt_tokens_sum", **MODEL_LABEL) == prompt_tokens
    assert delta(before, after, "heron:request_generation_tokens_sum", **MODEL_LABEL) == completion_tokens
    # Prefix cache, in tokens: every prompt is looked up once; hits are what usage calls cached.
    cached_tokens = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert delta(before, after, "heron:prefix_cache_queries_total", **MODEL_LABEL) == prompt_tokens
    assert delta(before, after, "heron:prefix_cache_hits_total", **MODEL_LABEL) == cached_tokens >= 16
    # Histograms: one observation per request; inter-token latency one per token after the first.
    for name in PER_REQUEST_HISTOGRAMS:
        assert delta(before, after, f"{name}_count", **MODEL_LABEL) == num_requests, name
        assert delta(before, after, f"{name}_bucket", le="+Inf", **MODEL_LABEL) == num_requests, name
    assert delta(before, after, "heron:inter_token_latency_seconds_count", **MODEL_LABEL) == sum(
        u["completion_tokens"] - 1 for u in usages
    )
    assert delta(before, after, "heron:time_per_output_token_seconds_count", **MODEL_LABEL) == sum(
        u["completion_tokens"] >= 2 for u in usages
    )
    assert delta(before, after, "heron:time_to_first_token_seconds_sum", **MODEL_LABEL) > 0
    assert 0 <= delta(before, after, "heron:request_queue_time_seconds_sum", **MODEL_LABEL) < delta(
        before, after, "heron:e2e_request_latency_seconds_sum", **MODEL_LABEL
    )
    # HTTP requests by route template and status; unknown paths share one label, /metrics is not counted.
    assert delta(before, after, "heron:http_requests_total", route=CHAT_PATH, status="200") == 2
    assert delta(before, after, "heron:http_requests_total", route=COMPLETIONS_PATH, status="200") == 2
    assert delta(before, after, "heron:http_requests_total", route=CHAT_PATH, status="400") == 1
    assert delta(before, after, "heron:http_requests_total", route="unmatched", status="404") == 1
    assert not any(labels and dict(labels).get("route") == "/metrics" for _, labels in after)
    assert not any("/no/such/path" in str(labels) for _, labels in after)
    # Idle again: nothing running, every KV block free (cached blocks nobody holds count as free).
    assert idle(after)
    assert value(after, "heron:kv_cache_num_free_blocks", **MODEL_LABEL) == value(after, "heron:kv_cache_num_blocks", **MODEL_LABEL) > 0
    assert value(after, "heron:kv_cache_usage_perc", **MODEL_LABEL) == 0.0

    # The text log lines of the same requests: real counts for the stream too, no prompt text.
    [line] = log_lines(server, "id=metrics-chat-2 ")
    assert f"model={DEFAULT_MODEL} status=200 stream=true prompt_tokens={usages[1]['prompt_tokens']} " in line, line
    assert f"completion_tokens={usages[1]['completion_tokens']} " in line, line
    assert f"finish={reasons[1]} client=127.0.0.1" in line and " ttft=" in line and " time=" in line, line
    assert "fruit" not in line
    [line] = log_lines(server, "id=metrics-chat-1 ")
    assert f"prompt_tokens={usages[0]['prompt_tokens']} completion_tokens={usages[0]['completion_tokens']} " in line, line
    [line] = log_lines(server, "id=metrics-bad-1 ")
    assert f"model={DEFAULT_MODEL} status=400 " in line and "error=missing_required_parameter" in line, line


def test_metrics_expose_every_series(http):
    samples = scrape(http)
    for name in (
        "heron:num_requests_running",
        "heron:num_requests_waiting",
        "heron:kv_cache_usage_perc",
        "heron:kv_cache_num_free_blocks",
        "heron:kv_cache_num_blocks",
        "heron:prefix_cache_queries_total",
        "heron:prefix_cache_hits_total",
        "heron:prompt_tokens_total",
        "heron:generation_tokens_total",
        "heron:num_preemptions_total",
        "heron:inter_token_latency_seconds_count",
        "heron:time_per_output_token_seconds_count",
    ):
        assert (name, frozenset(MODEL_LABEL.items())) in samples, name
    for reason in ("stop", "length", "abort"):
        assert ("heron:request_success_total", frozenset({**MODEL_LABEL, "finished_reason": reason}.items())) in samples
    # vLLM's TTFT buckets, so dashboards' le="..." selectors carry over.
    ttft_buckets = {dict(labels)["le"] for name, labels in samples if name == "heron:time_to_first_token_seconds_bucket"}
    assert {"0.001", "0.1", "2560.0", "+Inf"} <= ttft_buckets and len(ttft_buckets) == 23
    # The embedding model has no engine series.
    assert {dict(labels).get("model_name") for _, labels in samples} <= {None, DEFAULT_MODEL}


def test_client_disconnect_counts_as_abort(http, server):
    before = wait_for_metrics(http, idle)
    body = chat("Tell me a long story.", max_tokens=900, ignore_eos=True, stream=True)
    with http.stream("POST", CHAT_PATH, json=body, headers={"X-Request-Id": "metrics-gone-1"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept referenced: dropping it would close the connection early
        data_lines = 0
        for line in lines:
            data_lines += line.startswith("data: ")
            if data_lines >= 4:
                break
        during = scrape(http)
        assert value(during, "heron:num_requests_running", **MODEL_LABEL) == 1
        assert value(during, "heron:kv_cache_num_free_blocks", **MODEL_LABEL) < value(during, "heron:kv_cache_num_blocks", **MODEL_LABEL)
    after = wait_for_metrics(
        http, lambda s: idle(s) and delta(before, s, "heron:request_success_total", finished_reason="abort", **MODEL_LABEL) == 1
    )
    assert value(after, "heron:kv_cache_num_free_blocks", **MODEL_LABEL) == value(after, "heron:kv_cache_num_blocks", **MODEL_LABEL)
    for reason in ("stop", "length"):
        assert delta(before, after, "heron:request_success_total", finished_reason=reason, **MODEL_LABEL) == 0
    generated = delta(before, after, "heron:generation_tokens_total", **MODEL_LABEL)
    assert generated >= 3
    assert delta(before, after, "heron:e2e_request_latency_seconds_count", **MODEL_LABEL) == 1
    assert delta(before, after, "heron:time_to_first_token_seconds_count", **MODEL_LABEL) == 1
    assert delta(before, after, "heron:http_requests_total", route=CHAT_PATH, status="200") == 1
    # Logged once, at the end, as an abort.
    [line] = log_lines(server, "id=metrics-gone-1 ")
    assert "status=200 stream=true " in line and "finish=abort " in line, line


# =============================================================================================
# JSON log lines (a server of this module's own)
# =============================================================================================

JSON_KEY = "metrics-key"


@pytest.fixture(scope="module")
def json_server(tmp_path_factory) -> Iterator[Server]:
    srv = start_server(
        "json-log",
        tmp_path_factory.mktemp("heron-json-log"),
        ["--log-format", "json", "--log-prompts", "--max-model-len", "512"],
        env={"HERON_API_KEY": JSON_KEY},
        api_key=JSON_KEY,
        max_model_len=512,
    )
    yield srv
    problem = stop_server(srv)
    assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


def json_record(server: Server, request_id: str) -> dict[str, Any]:
    [line] = log_lines(server, f'"request_id":"{request_id}"')
    record = json.loads(line[line.index("{") :])
    assert record["event"] == "request"
    return record


def test_json_log_lines_and_open_metrics(json_server, response_checker):
    with make_client(json_server.base_url, response_checker, api_key=JSON_KEY) as http:
        messages = [{"role": "user", "content": "Name a colour."}]
        usage, reasons = stream_usage(
            http, CHAT_PATH, {"model": DEFAULT_MODEL, "messages": messages, "max_tokens": 4}, headers={"X-Request-Id": "json-1"}
        )
        reply = http.post(
            COMPLETIONS_PATH,
            json={"model": DEFAULT_MODEL, "prompt": "One, two,", "max_tokens": 3, "n": 2},
            headers={"X-Request-Id": "json-2"},
        )
        assert reply.status_code == 200, reply.text
        assert http.post(CHAT_PATH, json={"model": DEFAULT_MODEL, "messages": []}, headers={"X-Request-Id": "json-3"}).status_code == 400
    with make_client(json_server.base_url, response_checker) as anonymous:
        assert anonymous.get("/v1/models").status_code == 401
        samples = scrape(anonymous)  # like /health, no key needed
    assert delta({}, samples, "heron:http_requests_total", route="/v1/models", status="401") == 1

    streamed = json_record(json_server, "json-1")
    assert streamed["model"] == DEFAULT_MODEL and streamed["status"] == 200 and streamed["stream"] is True
    assert streamed["prompt_tokens"] == usage["prompt_tokens"] and streamed["completion_tokens"] == usage["completion_tokens"]
    assert streamed["finish_reasons"] == reasons
    assert 0 < streamed["ttft_s"] <= streamed["time_s"]
    assert streamed["client"] == "127.0.0.1"
    assert streamed["prompt"] == messages  # --log-prompts
    completion = json_record(json_server, "json-2")
    assert completion["stream"] is False and completion["prompt"] == "One, two,"
    assert completion["prompt_tokens"] == reply.json()["usage"]["prompt_tokens"]
    assert completion["completion_tokens"] == reply.json()["usage"]["completion_tokens"]
    assert completion["finish_reasons"] == [c["finish_reason"] for c in sorted(reply.json()["choices"], key=lambda c: c["index"])]
    failed = json_record(json_server, "json-3")
    assert failed["status"] == 400 and failed["error"] and failed["completion_tokens"] is None
    assert set(failed) >= {"request_id", "model", "status", "prompt_tokens", "completion_tokens", "ttft_s", "time_s", "finish_reasons", "client"}
