"""Prometheus metrics (`GET /metrics`) and the per-request record behind each request's log line.

One `Metrics` per app, with its own `CollectorRegistry` (several apps may share a process; nothing
here is module-level state). What flows in:

- Engine state, read at scrape time from each generation model's `AsyncEngine.stats` snapshot:
  running / waiting requests, KV-cache usage and free blocks, and the engine's cumulative counts
  (prefix-cache queries and hits in tokens, preemptions, prompt and generated tokens). Nothing is
  pushed per engine step.
- Each engine request's outputs, passed through `Metrics.track()`: time to first token and
  inter-token latency as outputs arrive (one `observe()` per engine step of the request), then at
  the end the finish reason of every sample (`request_success_total`; a request whose consumer left,
  or that failed, counts as "abort"), end-to-end latency, queue time, mean time per output token and
  the prompt / generation token histograms.
- Each HTTP request, through `MetricsMiddleware`: counted by route template and status, and handed
  with its `RequestRecord` to the app's request log once its response is sent (or abandoned).

Clock: every latency is `time.monotonic()` of the server process. A request starts when
`MetricsMiddleware` receives it (before its body is read). TTFT ends when the output carrying the
first token reaches the serving layer on the event loop; inter-token latency is the gap between
consecutive outputs of one engine request (one per engine step: a token per sample); time per output
token is the per-request mean of those gaps; e2e ends when the final output arrives. Queue time is
the engine's own (`RequestOutput.metrics`): from `AsyncEngine.generate()` to the engine step that
first scheduled the request.

Names and buckets are vLLM's with `vllm:` -> `heron:`, so existing dashboards port; every engine
series carries `model_name` (the served model's first name).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.routing import Match

from heron.outputs import FinishReason, RequestOutput

METRICS_ROUTE = "/metrics"
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED_ROUTE = "unmatched"  # the `route` label of every path no route template matches

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)
TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_value:
                return buckets
            buckets.append(value)
        scale *= 10


# ---------------------------------------------------------------------------------------------
# The per-request record (what the request log line reports)
# ---------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One HTTP request as its log line reports it, filled in while it runs.

    `MetricsMiddleware` creates it (in `request.state.request_record`) and logs it at the end; routes
    set the model, prompt and the response's usage; `Metrics.track()` adds the engine's token counts
    and first-token time (what a streamed request reports, since its usage is never built here).
    """

    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    stream: bool | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    # Choice index -> the finish reason sent for it (the serving layer fills the dict as choices end);
    # choices below `num_choices` that never got one were cut short: "abort".
    finish_reasons: dict[int, str] | None = None
    num_choices: int = 0
    error: str | None = None  # the error code (or type) of a failed request
    prompt: Any = None  # only with --log-prompts
    extra: dict[str, Any] = field(default_factory=dict)  # route-specific fields (embeddings: inputs)

    def log_fields(self, request_id: str | None, status: int, client: str | None, now: float) -> dict[str, Any]:
        """The log line's fields, in order; None values are left out of the text form."""
        reasons = None
        if self.finish_reasons is not None and self.num_choices:
            reasons = [self.finish_reasons.get(i, FinishReason.ABORT.value) for i in range(self.num_choices)]
        fields: dict[str, Any] = {
            "request_id": request_id,
            "model": self.model,
            "status": status,
            "stream": self.stream,
            "prompt_tokens": self.num_prompt_tokens or None,
            "completion_tokens": self.num_completion_tokens if self.num_choices else None,
            "cached_tokens": self.num_cached_tokens if self.num_choices else None,
            "ttft_s": round(self.first_token_time - self.started, 4) if self.first_token_time is not None else None,
            "time_s": round(now - self.started, 4),
            "finish_reasons": reasons,
            "client": client,
            "error": self.error,
            **self.extra,
        }
        if self.prompt is not None:
            fields["prompt"] = self.prompt
        return fields


# A value a client chose (a model name, a request id, a field name) is cut to this in a log line.
MAX_LOGGED_VALUE_CHARS = 256
# Characters that would end a line for some reader even inside a JSON string (str.splitlines does).
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_LOGGED_VALUE_CHARS:
        return value[: MAX_LOGGED_VALUE_CHARS - 3] + "..."
    if isinstance(value, list) and any(isinstance(v, str) for v in value):
        return [_bounded(v) for v in value]
    return value


def _text_value(value: str) -> str:
    # Bare when it cannot be mistaken for other fields; otherwise quoted and escaped, so that
    # `model="a status=200"` stays one field.
    if value and value.isprintable() and value.isascii() and not any(c in value for c in ' ="\\'):
        return value
    return json.dumps(value)


def one_line_json(payload: Any, separators: tuple[str, str] = (",", ":")) -> str:
    text = json.dumps(payload, ensure_ascii=False, separators=separators, default=str)
    for char, escaped in _LINE_BREAKS.items():
        text = text.replace(char, escaped)
    return text


def format_request_log(fields: dict[str, Any], log_format: str) -> str:
    """One line: `{"event": "request", ...}` for json, `request key=value ...` for text. Every value
    a client chose is cut to a bounded length and escaped, so no request can forge fields or lines."""
    fields = {key: value if key == "prompt" else _bounded(value) for key, value in fields.items()}
    if log_format == "json":
        return one_line_json({"event": "request", **fields})
    parts = ["request"]
    for key, value in fields.items():
        if value is None:
            continue
        if key == "request_id":
            key = "id"
        elif key == "finish_reasons":
            key, value = "finish", ",".join(value)
        elif key in ("ttft_s", "time_s"):
            key, value = key[:-2], f"{value:.3f}s"
        elif key == "prompt":
            value = one_line_json(value, (", ", ": "))  # one line, quoted and escaped
        elif isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, str):
            value = _text_value(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


@dataclass
class _ModelSeries:
    """One model's labelled children, looked up once per request rather than per observation."""

    ttft: Any
    tpot: Any
    itl: Any
    e2e: Any
    queue: Any
    prompt_tokens: Any
    generation_tokens: Any
    success: dict[str, Any]


class Metrics:
    """The app's metrics: a private registry, request tracking, and the scrape-time engine view.

    `models` returns the app's ModelRegistry (None while it loads); it is read at scrape time and
    when a model's series are first needed.
    """

    def __init__(self, models: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        self._models = models
        registry = self.registry
        self._http_requests = Counter(
            "heron:http_requests", "HTTP requests by route template and status code.", ["route", "status"],
            registry=registry,
        )
        model = ["model_name"]
        self._ttft = Histogram(
            "heron:time_to_first_token_seconds", "Histogram of time to first token in seconds.", model,
            buckets=TTFT_BUCKETS, registry=registry,
        )
        self._tpot = Histogram(
            "heron:time_per_output_token_seconds",
            "Histogram of the mean time per output token of each request (after its first), in seconds.", model,
            buckets=TOKEN_LATENCY_BUCKETS, registry=registry,
        )
        self._itl = Histogram(
            "heron:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", model,
            buckets=TOKEN_LATENCY_BUCKETS, registry=registry,
        )
        self._e2e = Histogram(
            "heron:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", model,
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry,
        )
        self._queue = Histogram(
            "heron:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", model,
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry,
        )
        self._success = Counter(
            "heron:request_success", "Count of finished generations (one per sample) by finish reason.",
            [*model, "finished_reason"], registry=registry,
        )
        # Token-count histograms take their buckets from the longest context served, known only once
        # the models are loaded: built on first use.
        self._prompt_tokens: Histogram | None = None
        self._generation_tokens: Histogram | None = None
        self._series: dict[str, _ModelSeries] = {}
        registry.register(_EngineCollector(models))

    # ----------------------------------------------------------------- scrape

    def render(self) -> bytes:
        """The Prometheus text exposition of everything (engine gauges read now)."""
        registry = self._models()
        if registry is not None:
            for model in registry.models:
                if model.kind == "generate":
                    self._series_for(model.name)  # so a fresh server shows every series at 0
        return generate_latest(self.registry)

    # ----------------------------------------------------------------- HTTP

    def count_http(self, route: str, status: int) -> None:
        self._http_requests.labels(route, str(status)).inc()

    # ----------------------------------------------------------------- engine requests

    async def track(
        self,
        outputs: AsyncIterator[RequestOutput],
        record: RequestRecord,
        model_name: str,
        num_prompt_tokens: int,
        num_samples: int,
    ) -> AsyncIterator[RequestOutput]:
        """Pass one engine request's outputs through, observing its metrics.

        Closing this iterator closes `outputs` (which aborts the engine request), so it stands in
        for the engine iterator everywhere.
        """
        series = self._series_for(model_name)
        started = record.started
        first = last = end = None
        num_token_outputs = num_tokens = 0
        final: RequestOutput | None = None
        try:
            async for output in outputs:
                now = time.monotonic()
                num_new = 0
                for completion in output.outputs:
                    num_new += len(completion.delta_token_ids)
                if num_new:
                    if first is None:
                        first = now
                        series.ttft.observe(now - started)
                    else:
                        series.itl.observe(now - last)
                    last = now
                    num_token_outputs += 1
                    num_tokens += num_new
                if output.finished:
                    final, end = output, now
                yield output
        finally:
            try:
                if final is not None:
                    reasons = [(c.finish_reason or FinishReason.ABORT).value for c in final.outputs]
                    num_tokens = sum(len(c.token_ids) for c in final.outputs)
                    record.num_cached_tokens += final.num_cached_tokens
                    timing = final.metrics
                    if timing is not None and timing.first_scheduled_time is not None:
                        series.queue.observe(timing.first_scheduled_time - timing.arrival_time)
                else:  # the consumer left, or the request failed
                    reasons = [FinishReason.ABORT.value] * num_samples
                    end = time.monotonic()
                for reason in reasons:
                    counter = series.success.get(reason)
                    if counter is None:
                        counter = series.success[reason] = self._success.labels(model_name, reason)
                    counter.inc()
                series.e2e.observe(end - started)
                series.prompt_tokens.observe(num_prompt_tokens)
                series.generation_tokens.observe(num_tokens)
                if num_token_outputs >= 2:
                    series.tpot.observe((last - first) / (num_token_outputs - 1))
                record.num_prompt_tokens += num_prompt_tokens
                record.num_completion_tokens += num_tokens
                if first is not None and (record.first_token_time is None or first < record.first_token_time):
                    record.first_token_time = first
            finally:
                await outputs.aclose()  # after an early exit: abort the engine request now

    def _series_for(self, model_name: str) -> _ModelSeries:
        series = self._series.get(model_name)
        if series is not None:
            return series
        if self._prompt_tokens is None:
            registry = self._models()
            lengths = [m.max_model_len for m in registry.models if m.kind == "generate"] if registry else []
            buckets = build_1_2_5_buckets(max(lengths, default=1 << 20))
            self._prompt_tokens = Histogram(
                "heron:request_prompt_tokens", "Number of prefill tokens processed.", ["model_name"],
                buckets=buckets, registry=self.registry,
            )
            self._generation_tokens = Histogram(
                "heron:request_generation_tokens", "Number of generation tokens processed.", ["model_name"],
                buckets=buckets, registry=self.registry,
            )
        series = _ModelSeries(
            ttft=self._ttft.labels(model_name),
            tpot=self._tpot.labels(model_name),
            itl=self._itl.labels(model_name),
            e2e=self._e2e.labels(model_name),
            queue=self._queue.labels(model_name),
            prompt_tokens=self._prompt_tokens.labels(model_name),
            generation_tokens=self._generation_tokens.labels(model_name),
            success={reason.value: self._success.labels(model_name, reason.value) for reason in FinishReason},
        )
        self._series[model_name] = series
        return series


class _EngineCollector:
    """Engine gauges and cumulative counters, read from each generation engine's stats snapshot.

    With data-parallel replicas (--data-parallel-size > 1) every engine series is per replica, with
    an `engine` label ("0", "1", ...; as vLLM labels its engines), and the router's counts and each
    replica's liveness are added. Without replicas the output has no `engine` label at all, as before.
    """

    def __init__(self, models: Callable[[], Any]) -> None:
        self._models = models

    def describe(self) -> list[Metric]:
        return self._families(["model_name"])

    def collect(self) -> Iterator[Metric]:
        registry = self._models()
        models = [m for m in (registry.models if registry is not None else ()) if m.kind == "generate"]
        per_replica = any(getattr(m.engine, "replica_stats", None) is not None for m in models)
        labels = ["model_name", "engine"] if per_replica else ["model_name"]
        families = self._families(labels)
        router = self._router_families(labels) if per_replica else []
        for model in models:
            replicas = getattr(model.engine, "replica_stats", None)
            if replicas is None:
                rows = [([model.name, "0"] if per_replica else [model.name], model.engine.stats)]
            else:
                rows = [([model.name, str(r.index)], r.stats) for r in replicas]
                for replica in replicas:
                    values = (replica.routed, replica.affinity_routed, 1 if replica.alive else 0)
                    for family, value in zip(router, values):
                        family.add_metric([model.name, str(replica.index)], value)
            for label_values, stats in rows:
                values = (
                    stats.num_running,
                    stats.num_waiting,
                    stats.kv_cache_usage,
                    stats.num_free_kv_blocks,
                    stats.num_kv_blocks,
                    stats.num_prefix_cache_queries,
                    stats.num_prefix_cache_hits,
                    stats.num_prompt_tokens,
                    stats.num_generation_tokens,
                    stats.num_preemptions,
                )
                for family, value in zip(families, values):
                    family.add_metric(label_values, value)
        yield from families
        yield from router

    @staticmethod
    def _router_families(labels: list[str]) -> list[Metric]:
        return [
            CounterMetricFamily(
                "heron:data_parallel_routed_requests", "Requests the data-parallel router sent to each engine replica.",
                labels=labels,
            ),
            CounterMetricFamily(
                "heron:data_parallel_prefix_routed_requests",
                "Requests routed to an engine replica because it held the longest matching prompt prefix.",
                labels=labels,
            ),
            GaugeMetricFamily("heron:engine_replica_up", "1 while the engine replica serves, 0 once it is dead.", labels=labels),
        ]

    @staticmethod
    def _families(labels: list[str]) -> list[Metric]:
        return [
            GaugeMetricFamily("heron:num_requests_running", "Number of requests in model execution batches.", labels=labels),
            GaugeMetricFamily("heron:num_requests_waiting", "Number of requests waiting to be processed.", labels=labels),
            GaugeMetricFamily("heron:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=labels),
            GaugeMetricFamily(
                "heron:kv_cache_num_free_blocks",
                "KV-cache blocks free for new requests (truly free, plus cached blocks no request holds).",
                labels=labels,
            ),
            GaugeMetricFamily("heron:kv_cache_num_blocks", "KV-cache blocks in the pool.", labels=labels),
            CounterMetricFamily(
                "heron:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", labels=labels
            ),
            CounterMetricFamily(
                "heron:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels=labels
            ),
            CounterMetricFamily("heron:prompt_tokens", "Number of prefill tokens processed.", labels=labels),
            CounterMetricFamily("heron:generation_tokens", "Number of generation tokens processed.", labels=labels),
            CounterMetricFamily("heron:num_preemptions", "Cumulative number of preemption from the engine.", labels=labels),
        ]


# ---------------------------------------------------------------------------------------------
# ASGI middleware: HTTP counts and the end-of-request hook
# ---------------------------------------------------------------------------------------------

# (scope, route template, status, record) -> None; called once per HTTP request, at its very end.
RequestEndHook = Callable[[dict, str, int, RequestRecord], None]


def route_template(scope: dict) -> str:
    """The template of the route that served (or would serve) this request, e.g. /v1/models/{model_id:path}."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    # Not routed (refused by an outer middleware, or no route matched): find it as the router would.
    return _matching_template(getattr(getattr(scope.get("app"), "router", None), "routes", ()), scope)


def _matching_template(routes, scope: dict) -> str:
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            # An included APIRouter (FastAPI keeps it whole, without a prefix here): look inside.
            found = _matching_template(inner.routes, scope)
            if found != UNMATCHED_ROUTE:
                return found
            continue
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", None) or UNMATCHED_ROUTE
    return UNMATCHED_ROUTE


class MetricsMiddleware:
    """Counts every HTTP request by route template and status, then calls `on_end` with its record.

    Pure ASGI, so streamed bodies pass untouched; `on_end` runs once the response is fully sent, or
    the client is gone, so a stream is logged once, with what it really produced. `/metrics` itself
    is not counted. A request that fails before any response is sent counts as 500.
    """

    def __init__(self, app: Callable, metrics: Metrics, on_end: RequestEndHook | None = None):
        self.app = app
        self.metrics = metrics
        self.on_end = on_end

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord()
        scope.setdefault("state", {})["request_record"] = record
        status = 500

        async def send_with_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = route_template(scope)
            if route != METRICS_ROUTE:
                self.metrics.count_http(route, status)
            if self.on_end is not None:
                self.on_end(scope, route, status, record)
