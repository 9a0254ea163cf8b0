"""heron.server.metrics with fakes: scrape-time engine series, request tracking, HTTP counting, log lines."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from heron.engine.async_engine import EngineStats
from heron.outputs import CompletionOutput, FinishReason, RequestMetrics, RequestOutput
from heron.server.metrics import (
    Metrics,
    MetricsMiddleware,
    RequestRecord,
    build_1_2_5_buckets,
    format_request_log,
)


def fake_models(stats: EngineStats | None = None, name: str = "tiny", max_model_len: int = 100):
    generate = SimpleNamespace(
        name=name, kind="generate", max_model_len=max_model_len, engine=SimpleNamespace(stats=stats or EngineStats())
    )
    embed = SimpleNamespace(name="embedder", kind="embed", max_model_len=512, engine=None)
    return SimpleNamespace(models=[generate, embed])


def samples_of(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples, name, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def step(token_id: int, index: int = 0, finish: FinishReason | None = None) -> CompletionOutput:
    return CompletionOutput(index=index, delta_token_ids=[token_id], finish_reason=finish)


async def engine_stream(outputs: list[RequestOutput], closed: list[bool], fail: BaseException | None = None):
    try:
        for output in outputs:
            await asyncio.sleep(0)
            yield output
        if fail is not None:
            raise fail
    finally:
        closed.append(True)


def finished_run(num_tokens: int, reason: FinishReason = FinishReason.LENGTH) -> list[RequestOutput]:
    outputs = [RequestOutput("r", [1, 2, 3], [step(10 + i)]) for i in range(num_tokens - 1)]
    final = CompletionOutput(
        index=0, token_ids=list(range(10, 10 + num_tokens)), delta_token_ids=[10 + num_tokens - 1], finish_reason=reason
    )
    timing = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.25, first_token_time=100.5, finished_time=101.0)
    outputs.append(RequestOutput("r", [1, 2, 3], [final], finished=True, num_cached_tokens=2, metrics=timing))
    return outputs


def test_1_2_5_buckets():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(1024)[-1] == 1000


def test_engine_series_are_read_at_scrape_time():
    stats = EngineStats(
        num_running=2, num_waiting=1, num_free_kv_blocks=30, num_kv_blocks=40, num_prefix_cache_queries=64,
        num_prefix_cache_hits=16, num_prompt_tokens=50, num_generation_tokens=7, num_preemptions=1,
    )
    models = fake_models(stats)
    metrics = Metrics(lambda: models)
    samples = samples_of(metrics)
    label = {"model_name": "tiny"}
    assert get(samples, "heron:num_requests_running", **label) == 2
    assert get(samples, "heron:num_requests_waiting", **label) == 1
    assert get(samples, "heron:kv_cache_usage_perc", **label) == pytest.approx(0.25)
    assert get(samples, "heron:kv_cache_num_free_blocks", **label) == 30
    assert get(samples, "heron:kv_cache_num_blocks", **label) == 40
    assert get(samples, "heron:prefix_cache_queries_total", **label) == 64
    assert get(samples, "heron:prefix_cache_hits_total", **label) == 16
    assert get(samples, "heron:prompt_tokens_total", **label) == 50
    assert get(samples, "heron:generation_tokens_total", **label) == 7
    assert get(samples, "heron:num_preemptions_total", **label) == 1
    # Every finish reason and histogram exists at 0 before any request; no series for the encoder.
    assert get(samples, "heron:request_success_total", finished_reason="abort", **label) == 0
    assert get(samples, "heron:request_prompt_tokens_bucket", le="100.0", **label) == 0
    assert get(samples, "heron:request_prompt_tokens_bucket", le="200.0", **label) is None  # buckets up to the context
    assert not any(dict(labels).get("model_name") == "embedder" for _, labels in samples)
    # The snapshot is read anew on every scrape.
    models.models[0].engine.stats = EngineStats(num_free_kv_blocks=40, num_kv_blocks=40)
    assert get(samples_of(metrics), "heron:num_requests_running", **label) == 0


def test_before_models_load_only_http_series():
    metrics = Metrics(lambda: None)
    samples = samples_of(metrics)
    assert not any(name.startswith("heron:num_requests") for name, _ in samples)


def test_apps_have_separate_registries():
    first, second = Metrics(lambda: None), Metrics(lambda: None)
    first.count_http("/v1/models", 200)
    assert get(samples_of(first), "heron:http_requests_total", route="/v1/models", status="200") == 1
    assert get(samples_of(second), "heron:http_requests_total", route="/v1/models", status="200") is None


def test_track_observes_a_finished_request():
    metrics = Metrics(lambda: fake_models())
    record = RequestRecord()
    closed: list[bool] = []

    async def run():
        seen = [o async for o in metrics.track(engine_stream(finished_run(4), closed), record, "tiny", 3, 1)]
        assert len(seen) == 4

    asyncio.run(run())
    samples = samples_of(metrics)
    label = {"model_name": "tiny"}
    assert get(samples, "heron:request_success_total", finished_reason="length", **label) == 1
    assert get(samples, "heron:request_success_total", finished_reason="abort", **label) == 0
    assert get(samples, "heron:time_to_first_token_seconds_count", **label) == 1
    assert get(samples, "heron:inter_token_latency_seconds_count", **label) == 3
    assert get(samples, "heron:time_per_output_token_seconds_count", **label) == 1
    assert get(samples, "heron:e2e_request_latency_seconds_count", **label) == 1
    assert get(samples, "heron:request_queue_time_seconds_sum", **label) == pytest.approx(0.25)
    assert get(samples, "heron:request_prompt_tokens_sum", **label) == 3
    assert get(samples, "heron:request_generation_tokens_sum", **label) == 4
    assert closed == [True]
    assert (record.num_prompt_tokens, record.num_completion_tokens, record.num_cached_tokens) == (3, 4, 2)
    assert record.first_token_time is not None and record.first_token_time >= record.started


@pytest.mark.parametrize("how", ["consumer_leaves", "engine_fails"])
def test_track_counts_an_unfinished_request_as_abort(how):
    metrics = Metrics(lambda: fake_models())
    record = RequestRecord()
    closed: list[bool] = []

    async def run():
        fail = RuntimeError("engine died") if how == "engine_fails" else None
        outputs = [RequestOutput("r", [1, 2], [step(5, 0), step(6, 1)])]  # n = 2
        tracked = metrics.track(engine_stream(outputs, closed, fail), record, "tiny", 2, 2)
        if how == "consumer_leaves":
            await tracked.__anext__()
            await tracked.aclose()
        else:
            with pytest.raises(RuntimeError):
                async for _ in tracked:
                    pass

    asyncio.run(run())
    samples = samples_of(metrics)
    assert get(samples, "heron:request_success_total", finished_reason="abort", model_name="tiny") == 2
    assert get(samples, "heron:request_generation_tokens_sum", model_name="tiny") == 2
    assert get(samples, "heron:request_queue_time_seconds_count", model_name="tiny") == 0  # no engine timings
    assert closed == [True]  # the engine stream was closed, which aborts the engine request
    assert record.num_completion_tokens == 2


def test_middleware_counts_route_templates_and_calls_the_end_hook():
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict:
        return {"id": item_id}

    @app.get("/metrics")
    async def scrape() -> dict:
        return {}

    metrics = Metrics(lambda: None)
    ended: list[tuple[str, int, RequestRecord]] = []
    app.add_middleware(MetricsMiddleware, metrics=metrics, on_end=lambda scope, route, status, record: ended.append((route, status, record)))

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/items/1")).status_code == 200
            assert (await client.get("/items/2")).status_code == 200
            assert (await client.post("/items/3")).status_code == 405
            assert (await client.get("/nowhere/7")).status_code == 404
            assert (await client.get("/metrics")).status_code == 200

    asyncio.run(run())
    samples = samples_of(metrics)
    assert get(samples, "heron:http_requests_total", route="/items/{item_id}", status="200") == 2
    assert get(samples, "heron:http_requests_total", route="/items/{item_id}", status="405") == 1
    assert get(samples, "heron:http_requests_total", route="unmatched", status="404") == 1
    assert get(samples, "heron:http_requests_total", route="/metrics", status="200") is None
    assert [(route, status) for route, status, _ in ended] == [
        ("/items/{item_id}", 200), ("/items/{item_id}", 200), ("/items/{item_id}", 405), ("unmatched", 404), ("/metrics", 200)
    ]
    assert all(isinstance(record, RequestRecord) for _, _, record in ended)


def test_requests_refused_before_routing_count_under_an_included_routers_template():
    # Heron's routes live in APIRouters; a request a middleware refuses (413, a drain) never reaches
    # routing, so its template must be found inside the included router.
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse

    router = APIRouter()

    @router.get("/things/{thing_id}")
    async def thing(thing_id: str) -> dict:
        return {"id": thing_id}

    app = FastAPI()
    app.include_router(router)

    @app.middleware("http")
    async def refuse_big(request, call_next):
        if request.headers.get("x-too-big"):
            return JSONResponse({"error": "too big"}, status_code=413)
        return await call_next(request)

    metrics = Metrics(lambda: None)
    app.add_middleware(MetricsMiddleware, metrics=metrics, on_end=lambda *args: None)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/things/1")).status_code == 200
            assert (await client.get("/things/2", headers={"x-too-big": "1"})).status_code == 413
            assert (await client.post("/things/3")).status_code == 405

    asyncio.run(run())
    samples = samples_of(metrics)
    assert get(samples, "heron:http_requests_total", route="/things/{thing_id}", status="200") == 1
    assert get(samples, "heron:http_requests_total", route="/things/{thing_id}", status="413") == 1
    assert get(samples, "heron:http_requests_total", route="/things/{thing_id}", status="405") == 1


def test_log_line_formats():
    record = RequestRecord(started=10.0, model="m", stream=True, num_prompt_tokens=5, num_completion_tokens=3,
                           first_token_time=10.25, finish_reasons={0: "stop"}, num_choices=2, prompt=[{"role": "user", "content": 'say "hi"'}])
    fields = record.log_fields("rid", 200, "127.0.0.1", 11.5)
    text = format_request_log(fields, "text")
    assert text.startswith("request id=rid model=m status=200 stream=true prompt_tokens=5 completion_tokens=3 ")
    assert "ttft=0.250s time=1.500s finish=stop,abort client=127.0.0.1" in text
    assert 'prompt=[{"role": "user", "content": "say \\"hi\\""}]' in text and "\n" not in text
    line = json.loads(format_request_log(fields, "json"))
    assert line == {
        "event": "request", "request_id": "rid", "model": "m", "status": 200, "stream": True, "prompt_tokens": 5,
        "completion_tokens": 3, "cached_tokens": 0, "ttft_s": 0.25, "time_s": 1.5, "finish_reasons": ["stop", "abort"],
        "client": "127.0.0.1", "error": None, "prompt": [{"role": "user", "content": 'say "hi"'}],
    }
    # A request refused before generating: no token or finish fields in the text form.
    refused = RequestRecord(started=0.0, error="invalid_json").log_fields("x", 400, None, 0.5)
    assert format_request_log(refused, "text") == "request id=x status=400 time=0.500s error=invalid_json"


def test_client_chosen_values_cannot_forge_fields_or_lines():
    from heron.server.app import clean_request_id

    assert clean_request_id("fake status=200 model=admin") != "fake status=200 model=admin"
    assert clean_request_id("req_01HZX-abc.def:42") == "req_01HZX-abc.def:42"
    assert clean_request_id("x" * 129) != "x" * 129 and len(clean_request_id("x" * 129)) <= 128
    assert clean_request_id("bad\nid") != "bad\nid"
    record = RequestRecord(started=0.0, model='gpt status=200 client="10.0.0.1"\u2028next line', num_choices=0)
    fields = record.log_fields("rid", 404, "127.0.0.1", 1.0)
    text = format_request_log(fields, "text")
    assert " status=404 " in text and " status=200" not in text.replace('\\"', "").split("model=")[0]
    assert text.count("status=") == 2 and 'model="gpt status=200 client=\\"10.0.0.1\\"' in text
    line = format_request_log(fields, "json")
    assert len(line.splitlines()) == 1 and json.loads(line)["model"].startswith("gpt status=200")
    long = format_request_log(RequestRecord(started=0.0, model="m" * 10_000).log_fields("r", 404, None, 1.0), "json")
    assert len(long) < 1000
