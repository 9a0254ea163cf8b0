"""`heron bench`: a streaming load generator and report for any OpenAI-compatible server.

Owns the serving benchmark. `Bench` drives one server by its root URL (Heron, vLLM, llama.cpp's
`llama-server`, Ollama...): it picks the model from GET /v1/models, sends one warm-up request, then for
each concurrency level C runs C clients in a closed loop (each sends its next streaming request when its
previous one ends) for a number of requests per client or a number of seconds. The report functions turn
the outcome into report.md, results.json and PNG plots (matplotlib, optional: without it the plots are
skipped, never the run). benchmarks/serving.py uses the same pieces and adds Heron's offline engine.

In: a URL and `BenchParams` (endpoint, levels, requests per client or seconds per level, max_tokens,
prompt length, ignore_eos, timeout). Out: `BenchResult` (a `LevelResult` of `RequestResult`s per level),
and `RunSummary`, the part of a results.json that reports and plots compare across runs.

What is measured, per request: TTFT = request sent -> first content chunk; TPOT = (last content chunk -
first content chunk) / (output tokens - 1); ITL = the gaps between consecutive content chunks. Output
tokens come from the usage chunk (`stream_options.include_usage`), or are counted as content chunks where
the server sends none. Per level: output tokens/s and requests/s over the level's wall time, and the
p50/p90/p99 of each latency. Every request has its own prompt, its index first, so a prefix cache cannot
flatter the numbers. A failed request (HTTP error, error frame, broken stream, timeout) is recorded with
its error and never stops the run; only a server that cannot be reached at all does (`BenchError`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx

from heron.cpu_info import CpuInfo

RESULTS_FORMAT = "heron-bench/1"
PERCENTILES = (50, 90, 99)
PLOT_FILES = ("throughput.png", "ttft.png", "tpot.png")
PLOTS_HINT = "pip install 'heron[bench]'"
# Model ids that name an embedding or reranking model, skipped when picking the model to load.
NON_CHAT_MODEL_HINTS = ("embed", "minilm", "bge-", "e5-", "gte-", "rerank", "sentence-t")
CHARS_PER_TOKEN = 4.4  # English text in a BPE vocabulary; only sizes `prompt_tokens` prompts


class BenchError(Exception):
    """The benchmark cannot run at all: no server answers, it refuses our credentials, a bad input file."""


# --------------------------------------------------------------------------------------------- prompts

SUBJECTS = (
    "a lighthouse keeper", "a retired astronaut", "a stubborn goat", "two rival bakers", "a lost robot",
    "a village librarian", "a young cartographer", "an old fisherman", "a clockmaker's apprentice",
    "a travelling musician", "a curious fox", "a night-shift nurse", "a beekeeper", "a chess prodigy",
    "a ship's cat", "a desert botanist",
)
TASKS = (
    "Write a short story about", "Describe a day in the life of", "Write a poem about",
    "Explain to a child what happens to", "Write a diary entry by", "Invent a legend about",
    "Write a letter from", "Tell a funny anecdote about",
)
DETAILS = (
    "during a thunderstorm", "on the first day of spring", "in a city built on stilts", "after the power fails",
    "on a train crossing the mountains", "at a noisy harbour market", "in a house full of clocks",
    "while snow covers the valley", "on an island with no name", "beneath an orange autumn sky",
)
EXTRAS = (
    "use vivid details", "keep the tone warm", "include one surprising twist", "mention a smell and a sound",
    "end with a question", "avoid clichés", "write in the present tense", "give every character a name",
)


def make_prompt(index: int, prompt_tokens: int | None = None) -> str:
    """A deterministic, distinct prompt: roughly 20-40 tokens, or padded with more sentences to about
    `prompt_tokens`. The index comes first so even the first KV block differs between requests."""
    rng = random.Random(index)
    extras = ", ".join(rng.sample(EXTRAS, rng.randint(1, 3)))
    text = (
        f"Request {index}. {rng.choice(TASKS)} {rng.choice(SUBJECTS)} {rng.choice(DETAILS)}. "
        f"{extras[0].upper() + extras[1:]}."
    )
    if prompt_tokens is not None:
        parts = [text]
        length = len(text)
        while length / CHARS_PER_TOKEN < prompt_tokens:
            sentence = f" Also think of {rng.choice(SUBJECTS)} {rng.choice(DETAILS)}, and {rng.choice(EXTRAS)}."
            parts.append(sentence)
            length += len(sentence)
        text = "".join(parts)
    return text


def make_prompts(start: int, count: int, prompt_tokens: int | None = None) -> list[str]:
    return [make_prompt(start + i, prompt_tokens) for i in range(count)]


# --------------------------------------------------------------------------------------------- stats


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; NaN for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict[str, float | None]:
    """Mean and PERCENTILES of some latencies, None where there were none (JSON has no NaN)."""
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    return {"mean": sum(values) / len(values), **{f"p{q}": percentile(values, q) for q in PERCENTILES}}


def machine_description() -> str:
    """CPU model, count and the flags that decide Heron's paths (AVX2, AVX-512, native bf16)."""
    return f"{CpuInfo.read().describe()}, {os.cpu_count()} CPUs"


def loadavg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def fmt_s(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.2f} s"


def fmt_ms(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x * 1000:.1f} ms"


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class BenchParams:
    """What each level sends; the same for every server so that runs compare."""

    endpoint: str = "chat"  # "chat" (/v1/chat/completions) or "completions" (/v1/completions)
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests_per_client: int = 4
    duration: float | None = None  # seconds per level; when set, requests_per_client is not used
    max_tokens: int = 128
    prompt_tokens: int | None = None  # about this many prompt tokens; None: short prompts (~20-40 tokens)
    ignore_eos: bool = True  # vLLM's extension (Heron has it): every answer is max_tokens long
    timeout: float = 300.0  # seconds per request

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', not {self.endpoint!r}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be positive integers")
        if self.requests_per_client < 1 or self.max_tokens < 1:
            raise ValueError("requests per client and max tokens must be positive")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.prompt_tokens is not None and self.prompt_tokens < 1:
            raise ValueError("prompt tokens must be positive")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        object.__setattr__(self, "concurrency", tuple(sorted(set(self.concurrency))))

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def describe(self, mean_prompt_tokens: float | None = None) -> str:
        amount = f"{self.duration:g} s per level" if self.duration is not None else (
            f"{self.requests_per_client} request(s) per client")
        prompts = f"prompts of ~{self.prompt_tokens} tokens" if self.prompt_tokens else "short prompts (~20-40 tokens)"
        if mean_prompt_tokens is not None:  # as the server tokenized them, chat template included
            prompts += f", {mean_prompt_tokens:.1f} prompt tokens on average by the server's count"
        return (f"POST {self.path}, streaming, temperature 0, max_tokens {self.max_tokens}, "
                f"{'ignore_eos' if self.ignore_eos else 'no ignore_eos'}, {amount}, {prompts}, "
                f"timeout {self.timeout:g} s per request")

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint, "concurrency": list(self.concurrency),
            "requests_per_client": self.requests_per_client, "duration": self.duration,
            "max_tokens": self.max_tokens, "prompt_tokens": self.prompt_tokens,
            "ignore_eos": self.ignore_eos, "timeout": self.timeout,
        }


@dataclass
class RequestResult:
    """One streaming request, timed; `ok` False carries the error instead."""

    ok: bool
    output_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float = 0.0
    usage_reported: bool = False
    error: str | None = None
    prompt_tokens: int | None = None  # as the usage chunk reports it
    num_chunks: int = 0  # chunks that carried content
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    start_s: float = 0.0  # when it was sent, seconds after its level began

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return {
            "ok": self.ok, "error": self.error, "start_s": r(self.start_s), "latency_s": r(self.latency_s),
            "ttft_s": r(self.ttft_s), "tpot_s": r(self.tpot_s), "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens, "usage_reported": self.usage_reported,
            "num_chunks": self.num_chunks, "itl_s": [round(x, 6) for x in self.itl_s],
        }


@dataclass
class LevelResult:
    """All requests of one concurrency level and the level's wall time."""

    concurrency: int
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0
    load_avg: str = ""  # at the level's end

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[RequestResult]:
        return [r for r in self.results if not r.ok]

    @property
    def output_tokens_per_s(self) -> float:
        tokens = sum(r.output_tokens for r in self.ok)
        return tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def requests_per_s(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s > 0 else float("nan")

    def errors(self) -> dict[str, int]:
        """Each distinct error and how often it happened, most frequent first."""
        return dict(Counter(r.error or "unknown" for r in self.failed).most_common())

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        tokens_per_s, requests_per_s = self.output_tokens_per_s, self.requests_per_s
        return {
            "concurrency": self.concurrency,
            "num_requests": len(self.results),
            "num_ok": len(ok),
            "num_failed": len(self.results) - len(ok),
            "wall_s": self.wall_s,
            "output_tokens": sum(r.output_tokens for r in ok),
            "output_tokens_per_s": None if math.isnan(tokens_per_s) else tokens_per_s,
            "requests_per_s": None if math.isnan(requests_per_s) else requests_per_s,
            "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
            "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
            "tpot_s": distribution([r.tpot_s for r in ok if r.tpot_s is not None]),
            "itl_s": distribution([gap for r in ok for gap in r.itl_s]),
            "latency_s": distribution([r.latency_s for r in ok]),
            "errors": self.errors(),
            "load_avg": self.load_avg,
        }


def level_notes(level: LevelResult, params: BenchParams) -> list[str]:
    """What a reader must know besides a level's numbers: its errors and odd responses."""
    c = level.concurrency
    notes = [f"C={c}: {count} failed request(s): {error}" for error, count in level.errors().items()]
    if params.ignore_eos:
        short = [r.output_tokens for r in level.ok if r.output_tokens != params.max_tokens]
        if short:
            notes.append(f"C={c}: {len(short)} response(s) with {sorted(set(short))} output tokens "
                         f"instead of max_tokens={params.max_tokens} despite ignore_eos")
    empty = sum(1 for r in level.ok if r.ttft_s is None)
    if empty:
        notes.append(f"C={c}: {empty} complete response(s) with no content (no TTFT/TPOT for them)")
    no_usage = sum(1 for r in level.ok if not r.usage_reported)
    if no_usage:
        notes.append(f"C={c}: {no_usage} response(s) without a usage chunk; tokens counted as content chunks")
    return notes


# --------------------------------------------------------------------------------------------- client


class Client:
    """Sends one streaming request and times it; never raises (errors become a failed RequestResult)."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, params: BenchParams, model: str | None,
                 progress: Progress | None = None):
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.params = params
        self.model = model
        self.progress = progress

    def payload(self, prompt: str, max_tokens: int) -> dict:
        body: dict = {
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model is not None:
            body["model"] = self.model
        if self.params.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.params.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def request(self, prompt: str, max_tokens: int, level_start: float | None = None) -> RequestResult:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.params.timeout):
                result = await self._stream(prompt, max_tokens, start)
        except TimeoutError:
            result = RequestResult(False, error=f"timed out after {self.params.timeout:g} s")
        except httpx.HTTPError as e:
            result = RequestResult(False, error=f"{type(e).__name__}: {e}")
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:  # malformed stream content
            result = RequestResult(False, error=f"bad stream: {type(e).__name__}: {e}")
        if not result.ok:
            result.latency_s = time.perf_counter() - start
        result.start_s = start - level_start if level_start is not None else 0.0
        return result

    async def _stream(self, prompt: str, max_tokens: int, start: float) -> RequestResult:
        first = last = None
        gaps: list[float] = []
        num_chunks = 0
        usage_tokens = prompt_tokens = None
        saw_done = False
        chat = self.params.endpoint == "chat"
        async with self.http.stream("POST", self.base_url + self.params.path, json=self.payload(prompt, max_tokens)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                return RequestResult(False, error=f"HTTP {resp.status_code}: {body[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, ": keep-alive" comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    saw_done = True
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError(f"chunk is not an object: {data[:200]}")
                if chunk.get("error"):
                    return RequestResult(False, error=f"error frame: {json.dumps(chunk['error'])[:300]}")
                now = time.perf_counter()
                for choice in chunk.get("choices") or []:
                    if chat:
                        delta = choice.get("delta") or {}
                        text = "".join(delta.get(key) or "" for key in ("content", "reasoning_content", "reasoning"))
                    else:
                        text = choice.get("text") or ""
                    if text:
                        num_chunks += 1
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
                        if self.progress is not None:
                            self.progress.chunk()
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        prompt_tokens = int(usage["prompt_tokens"])
        end = time.perf_counter()
        if not saw_done:
            return RequestResult(False, error="stream ended without data: [DONE]")
        tokens = usage_tokens if usage_tokens is not None else num_chunks
        result = RequestResult(True, tokens, latency_s=end - start, usage_reported=usage_tokens is not None,
                               prompt_tokens=prompt_tokens, num_chunks=num_chunks, itl_s=gaps)
        if first is not None:  # else a complete, empty answer (EOS first without ignore_eos): no TTFT or TPOT
            result.ttft_s = first - start
            result.tpot_s = (last - first) / (tokens - 1) if tokens > 1 else None
        return result


# --------------------------------------------------------------------------------------------- progress


class Progress:
    """Progress of each level on a stream (stderr): on a terminal a bar redrawn in place (requests done of
    the total, elapsed time, output tokens/s so far), elsewhere one line per finished level."""

    BAR_WIDTH = 24

    def __init__(self, stream: TextIO | None = None, live: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.active = False  # a level is running (the warm-up request draws nothing)
        self._reset(0, None, None)

    def _reset(self, concurrency: int, total: int | None, duration: float | None) -> None:
        self.concurrency, self.total, self.duration = concurrency, total, duration
        self.start = time.perf_counter()
        self.num_done = self.num_failed = 0
        self.tokens_done = 0  # output tokens of finished requests
        self.chunks_live = 0  # content chunks of requests still streaming
        self._last_draw = 0.0

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start_level(self, concurrency: int, total: int | None, duration: float | None) -> None:
        self._reset(concurrency, total, duration)
        self.active = True
        if self.live:
            self._draw()

    def chunk(self) -> None:
        self.chunks_live += 1
        if self.live and time.perf_counter() - self._last_draw > 0.1:
            self._draw()

    def done(self, result: RequestResult) -> None:
        self.num_done += 1
        self.chunks_live = max(0, self.chunks_live - result.num_chunks)
        if result.ok:
            self.tokens_done += result.output_tokens
        else:
            self.num_failed += 1
        if self.live:
            self._draw()

    async def tick(self) -> None:
        """Keeps the elapsed time moving while no request finishes."""
        while True:
            await asyncio.sleep(0.5)
            self._draw()

    def end_level(self, level: LevelResult) -> None:
        self.active = False
        line = (f"C={level.concurrency}: {len(level.ok)}/{len(level.results)} ok, "
                f"{level.output_tokens_per_s:.1f} output tok/s, {level.requests_per_s:.2f} req/s, "
                f"{level.wall_s:.1f} s, load {level.load_avg}")
        if self.live:
            self._write("\r" + self._fit(line) + "\x1b[K\n")
        else:
            self.message("  " + line)

    def _draw(self) -> None:
        if not self.active:
            return
        self._last_draw = now = time.perf_counter()
        elapsed = now - self.start
        if self.total:
            fraction, count = self.num_done / self.total, f"{self.num_done}/{self.total} requests"
        else:
            fraction, count = min(1.0, elapsed / self.duration) if self.duration else 0.0, f"{self.num_done} requests"
        filled = int(fraction * self.BAR_WIDTH)
        bar = "#" * filled + "-" * (self.BAR_WIDTH - filled)
        rate = (self.tokens_done + self.chunks_live) / elapsed if elapsed > 0 else 0.0
        failed = f", {self.num_failed} failed" if self.num_failed else ""
        self._write("\r" + self._fit(f"C={self.concurrency} [{bar}] {count}{failed}, {elapsed:.1f} s, "
                                     f"{rate:.1f} tok/s") + "\x1b[K")

    def _fit(self, line: str) -> str:
        return line[: max(20, shutil.get_terminal_size((100, 20)).columns - 1)]

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


# --------------------------------------------------------------------------------------------- bench


def normalize_url(url: str) -> str:
    """The server root: 'http://host:port' from that, a trailing slash or OpenAI's base_url ('.../v1')."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return url.removesuffix("/v1").rstrip("/")


def pick_model(ids: list[str]) -> str | None:
    """The first id that does not look like an embedding or reranking model, else the first id."""
    chat = [i for i in ids if not any(hint in i.lower() for hint in NON_CHAT_MODEL_HINTS)]
    return (chat or ids or [None])[0]


class Bench:
    """Drives one server: finds the model, warms it up, then runs each concurrency level in turn.

    Use as `async with Bench(url, params) as bench: await bench.connect(); await bench.run()`.
    """

    def __init__(self, url: str, params: BenchParams, *, model: str | None = None, api_key: str | None = None,
                 progress: Progress | None = None):
        self.url = normalize_url(url)
        self.params = params
        self.model = model
        self.api_key = api_key
        self.progress = progress if progress is not None else Progress()
        self.server_owner: str | None = None  # `owned_by` of the model's card: "heron", "vllm", "llamacpp"...
        self.warmup: RequestResult | None = None
        self.levels: list[LevelResult] = []
        self.notes: list[str] = []  # warnings worth a line in the report
        self._http: httpx.AsyncClient | None = None
        self._client: Client | None = None

    async def __aenter__(self) -> Bench:
        biggest = max(self.params.concurrency)
        limits = httpx.Limits(max_connections=biggest + 8, max_keepalive_connections=biggest + 8)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(self.params.timeout, connect=30),
                                       headers=headers)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._http.aclose()

    def _warn(self, text: str) -> None:
        self.notes.append(text)
        self.progress.message(f"heron bench: warning: {text}")

    async def connect(self) -> None:
        """Reads GET /v1/models (the model to send, unless given) and sends one warm-up request.
        Raises BenchError when nothing answers at the URL or it refuses the credentials."""
        try:
            resp = await self._http.get(self.url + "/v1/models", timeout=min(30.0, self.params.timeout))
        except httpx.TransportError as e:
            raise BenchError(f"cannot reach a server at {self.url} ({type(e).__name__}: {e or 'no detail'}); "
                             "is it running, and is this its root URL (e.g. http://127.0.0.1:8000)?") from None
        if resp.status_code in (401, 403):
            raise BenchError(f"{self.url}/v1/models answered HTTP {resp.status_code}: the server wants an API key "
                             "(--api-key, or the HERON_API_KEY / OPENAI_API_KEY environment variable)")
        cards: list[dict] = []
        if resp.status_code == 200:
            try:
                cards = [c for c in resp.json()["data"] if isinstance(c, dict) and isinstance(c.get("id"), str)]
            except (ValueError, KeyError, TypeError):
                self._warn(f"GET /v1/models returned no model list: {resp.text[:200]}")
        else:
            self._warn(f"GET /v1/models answered HTTP {resp.status_code}")
        if self.model is None:
            self.model = pick_model([c["id"] for c in cards])
            if self.model is None:
                self._warn("no model found in /v1/models; sending requests without a model name (--model sets one)")
        card = next((c for c in cards if c["id"] == self.model), cards[0] if cards else None)
        if card is not None and isinstance(card.get("owned_by"), str):
            self.server_owner = card["owned_by"]
        self._client = Client(self._http, self.url, self.params, self.model, self.progress)

        self.warmup = await self._client.request(make_prompt(999_999, self.params.prompt_tokens),
                                                 min(16, self.params.max_tokens))
        if self.warmup.ok:
            self.progress.message(f"warm-up request: ok, {self.warmup.output_tokens} tokens in "
                                  f"{self.warmup.latency_s:.2f} s (model {self.model or 'not named'})")
        else:
            self._warn(f"warm-up request failed: {self.warmup.error}{self._hint(self.warmup.error or '')}")

    def _hint(self, error: str) -> str:
        if error.startswith(("HTTP 401", "HTTP 403")):
            return " (hint: --api-key, or HERON_API_KEY / OPENAI_API_KEY)"
        if error.startswith("HTTP 404"):
            return f" (hint: does the server serve {self.params.path} and the model {self.model!r}? see --endpoint, --model)"
        if error.startswith("HTTP 4") and self.params.ignore_eos:
            return " (hint: servers without vLLM's ignore_eos extension need --no-ignore-eos)"
        return ""

    async def run_level(self, concurrency: int, prompts: list[str]) -> LevelResult:
        """C clients in a closed loop: each sends its next request when its previous one ends."""
        params, client = self.params, self._client
        level = LevelResult(concurrency)
        queue = iter(prompts)
        total = None if params.duration is not None else concurrency * params.requests_per_client
        self.progress.start_level(concurrency, total, params.duration)
        start = time.perf_counter()
        deadline = start + params.duration if params.duration is not None else None

        async def worker(worker_index: int) -> None:
            sent = 0
            while True:
                if deadline is not None:
                    if time.perf_counter() >= deadline:
                        return
                elif sent >= params.requests_per_client:
                    return
                prompt = next(queue, None)
                if prompt is None:  # duration mode ran past the list: fresh indices, distinct per level
                    prompt = make_prompt(10_000_000 + (concurrency * 10_000 + worker_index) * 10_000 + sent,
                                         params.prompt_tokens)
                result = await client.request(prompt, params.max_tokens, start)
                level.results.append(result)
                self.progress.done(result)
                sent += 1

        ticker = asyncio.create_task(self.progress.tick()) if self.progress.live else None
        try:
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        finally:
            if ticker is not None:
                ticker.cancel()
        level.wall_s = time.perf_counter() - start
        level.load_avg = loadavg()
        self.progress.end_level(level)
        return level

    async def run(self, level_prompts: dict[int, list[str]] | None = None) -> list[LevelResult]:
        """Every level in turn; by default each level gets its own range of prompts."""
        if self._client is None:
            raise RuntimeError("Bench.connect() must run before Bench.run()")
        next_index = 0
        for c in self.params.concurrency:
            if level_prompts is not None and c in level_prompts:
                prompts = level_prompts[c]
            else:
                count = c * self.params.requests_per_client
                prompts = make_prompts(next_index, count, self.params.prompt_tokens)
                next_index += count
            self.levels.append(await self.run_level(c, prompts))
        return self.levels


# --------------------------------------------------------------------------------------------- results


@dataclass
class BenchResult:
    """One finished (or interrupted) run with everything its report needs."""

    label: str
    url: str
    model: str | None
    params: BenchParams
    command: str
    started_at: str  # ISO 8601, local time with its UTC offset
    machine: str
    load_avg_start: str
    load_avg_end: str
    server_owner: str | None
    warmup: RequestResult | None
    levels: list[LevelResult]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        from heron import __version__

        return {
            "format": RESULTS_FORMAT,
            "label": self.label,
            "url": self.url,
            "model": self.model,
            "server_owner": self.server_owner,
            "command": self.command,
            "started_at": self.started_at,
            "machine": self.machine,
            "heron_version": __version__,
            "load_avg": {"start": self.load_avg_start, "end": self.load_avg_end},
            "params": self.params.to_json(),
            "notes": self.notes,
            "warmup": self.warmup.to_json() if self.warmup is not None else None,
            "levels": [{"summary": level.summary(), "requests": [r.to_json() for r in level.results]}
                       for level in self.levels],
        }

    def summary(self) -> RunSummary:
        return RunSummary(self.label, self.url, self.model, self.command, self.started_at, self.machine,
                          [level.summary() for level in self.levels])


@dataclass(frozen=True)
class RunSummary:
    """What reports and plots compare across runs: this run's, or one read back from a results.json."""

    label: str
    url: str
    model: str | None
    command: str
    started_at: str
    machine: str
    levels: list[dict[str, Any]]  # LevelResult.summary() of each level

    @classmethod
    def load(cls, path: str | Path) -> RunSummary:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise BenchError(f"cannot read {path}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
            raise BenchError(f"{path} is not a results.json written by `heron bench` (format {RESULTS_FORMAT})")
        try:
            levels = [level["summary"] for level in data["levels"]]
            for level in levels:
                int(level["concurrency"])
            return cls(str(data.get("label") or Path(path).parent.name), str(data.get("url", "?")), data.get("model"),
                       str(data.get("command", "?")), str(data.get("started_at", "?")), str(data.get("machine", "?")),
                       levels)
        except (KeyError, TypeError, ValueError) as e:
            raise BenchError(f"{path}: malformed results ({type(e).__name__}: {e})") from None


def unique_labels(runs: list[RunSummary]) -> list[RunSummary]:
    """Runs with distinct labels (a repeated label gets ' #2', ' #3'...), so plot legends tell them apart."""
    seen: Counter[str] = Counter()
    out = []
    for run in runs:
        seen[run.label] += 1
        if seen[run.label] > 1:
            run = RunSummary(f"{run.label} #{seen[run.label]}", run.url, run.model, run.command, run.started_at,
                             run.machine, run.levels)
        out.append(run)
    return out


# --------------------------------------------------------------------------------------------- report


TABLE_COLUMNS = (
    "system", "concurrency", "requests ok", "failed", "output tok/s", "requests/s",
    "TTFT p50 (s)", "TTFT p90 (s)", "TTFT p99 (s)", "TPOT p50 (ms)", "TPOT p90 (ms)", "TPOT p99 (ms)",
    "ITL p50 (ms)", "ITL p99 (ms)",
)


def _num(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def results_table(runs: list[RunSummary]) -> str:
    """One Markdown table, a row per system and concurrency level."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "| --- |" + " ---: |" * (len(TABLE_COLUMNS) - 1)]
    for run in runs:
        for s in run.levels:
            ttft, tpot, itl = s["ttft_s"], s["tpot_s"], s["itl_s"]
            cells = [
                run.label.replace("|", "/"), str(s["concurrency"]), str(s["num_ok"]), str(s["num_failed"]),
                _num(s["output_tokens_per_s"]), _num(s["requests_per_s"], digits=2),
                *(_num(ttft[f"p{q}"], digits=3) for q in PERCENTILES),
                *(_num(tpot[f"p{q}"], 1000) for q in PERCENTILES),
                _num(itl["p50"], 1000), _num(itl["p99"], 1000),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def result_notes(result: BenchResult) -> list[str]:
    notes = list(result.notes)
    for level in result.levels:
        notes += level_notes(level, result.params)
    return notes


def markdown_report(result: BenchResult, compare: list[RunSummary], plots: list[str], plot_problem: str | None) -> str:
    from heron import __version__

    runs = unique_labels([result.summary(), *compare])
    prompt_means = [s["prompt_tokens_mean"] for s in runs[0].levels if s["prompt_tokens_mean"] is not None]
    mean_prompt_tokens = sum(prompt_means) / len(prompt_means) if prompt_means else None
    out = [
        f"# Serving benchmark: {runs[0].label}",
        "",
        f"- Command: `{result.command}`",
        f"- Target: {result.url}" + (f" (`owned_by`: {result.server_owner})" if result.server_owner else ""),
        f"- Model: {result.model or 'not named (the server default)'}",
        f"- Requests: {result.params.describe(mean_prompt_tokens)}",
        f"- Concurrency levels: {', '.join(str(c) for c in result.params.concurrency)}",
        f"- Client machine: {result.machine}; load average {result.load_avg_start} at start, {result.load_avg_end} at end",
        f"- Date: {result.started_at}",
        f"- heron {__version__}",
        "",
        "## Results",
        "",
        results_table(runs),
        "",
    ]
    if compare:
        out += ["Compared runs:", ""]
        for run in runs[1:]:
            out.append(f"- **{run.label}**: {run.url}, model {run.model or '?'}, {run.started_at}, "
                       f"{run.machine}; `{run.command}`")
        out.append("")
    out += ["## Plots", ""]
    titles = {"throughput.png": "Output tokens/s", "ttft.png": "TTFT percentiles", "tpot.png": "TPOT percentiles"}
    out += [f"![{titles.get(name, name)}]({name})" for name in plots]
    if plot_problem:
        out.append(plot_problem)
    notes = result_notes(result)
    out += ["", "## Errors and notes", ""]
    out += [f"- {note}" for note in notes] if notes else ["None: every request succeeded."]
    out += [
        "",
        "## Definitions",
        "",
        "- TTFT: request sent to first content chunk. TPOT: (last content chunk - first) / (output tokens - 1). "
        "ITL: gap between consecutive content chunks.",
        "- Output tok/s and requests/s: output tokens (from the usage chunk) and successful requests of a level, "
        "over the level's wall time. Each of C clients sends its next request when the previous one ends.",
        "- Percentiles are over the successful requests of a level; failed requests are counted, not timed.",
        "",
    ]
    return "\n".join(out)


def write_plots(runs: list[RunSummary], out_dir: Path) -> list[str]:
    """throughput.png, ttft.png and tpot.png in out_dir; raises ImportError without matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no interactive backend

    runs = unique_labels(runs)
    all_c = sorted({s["concurrency"] for run in runs for s in run.levels})
    models = {run.model for run in runs}
    model = runs[0].model if len(models) == 1 and runs[0].model else ""  # in the titles only when shared
    styles = {50: ("-", "o"), 90: ("--", "s"), 99: (":", "^")}

    def points(run: RunSummary, get) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for s in run.levels:
            value = get(s)
            if value is not None:
                xs.append(s["concurrency"])
                ys.append(value)
        return xs, ys

    def axes(title: str, ylabel: str):
        fig = Figure(figsize=(7.5, 4.5), dpi=110)
        ax = fig.add_subplot()
        if len(all_c) > 1 and all_c[-1] / all_c[0] >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(all_c, [str(c) for c in all_c])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (clients)")
        ax.set_ylabel(ylabel)
        ax.set_title(title + (f" ({model})" if model else ""))
        ax.grid(True, alpha=0.3)
        return fig, ax

    written = []
    fig, ax = axes("Output tokens/s", "output tokens/s")
    for i, run in enumerate(runs):
        xs, ys = points(run, lambda s: s["output_tokens_per_s"])
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=run.label)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png")
    written.append("throughput.png")

    for name, key, title, ylabel, scale in (("ttft.png", "ttft_s", "Time to first token", "TTFT (s)", 1.0),
                                             ("tpot.png", "tpot_s", "Time per output token", "TPOT (ms)", 1000.0)):
        fig, ax = axes(title, ylabel)
        for i, run in enumerate(runs):
            for q in PERCENTILES:
                xs, ys = points(run, lambda s: s[key][f"p{q}"])
                linestyle, marker = styles[q]
                ax.plot(xs, [y * scale for y in ys], linestyle=linestyle, marker=marker, color=f"C{i}",
                        label=f"{run.label} p{q}" if len(runs) > 1 else f"p{q}")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_dir / name)
        written.append(name)
    return written


def write_outputs(result: BenchResult, out_dir: Path, compare: list[RunSummary]) -> list[Path]:
    """results.json, the plots where matplotlib is installed, and report.md; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    written = [out_dir / "results.json"]
    plots: list[str] = []
    problem = None
    if result.levels:
        try:
            plots = write_plots([result.summary(), *compare], out_dir)
        except ImportError:
            problem = f"No plots: matplotlib is not installed (`{PLOTS_HINT}` adds it)."
    else:
        problem = "No plots: no level finished."
    written += [out_dir / name for name in plots]
    (out_dir / "report.md").write_text(markdown_report(result, compare, plots, problem))
    written.append(out_dir / "report.md")
    return written


# --------------------------------------------------------------------------------------------- command


def api_key_from_env() -> str | None:
    # HERON_API_KEY may list several keys, comma-separated (as `heron serve` reads it): use the first.
    heron = (os.environ.get("HERON_API_KEY") or "").split(",")[0].strip()
    return heron or os.environ.get("OPENAI_API_KEY") or None


def command_line(args: argparse.Namespace, params: BenchParams, url: str) -> str:
    """The run as a `heron bench` command with every setting spelled out; never the API key."""
    parts = ["heron", "bench", "--url", url, "--endpoint", params.endpoint,
             "--concurrency", *map(str, params.concurrency)]
    if params.duration is not None:
        parts += ["--duration", f"{params.duration:g}"]
    else:
        parts += ["--requests-per-client", str(params.requests_per_client)]
    parts += ["--max-tokens", str(params.max_tokens)]
    if params.prompt_tokens is not None:
        parts += ["--prompt-tokens", str(params.prompt_tokens)]
    if not params.ignore_eos:
        parts.append("--no-ignore-eos")
    parts += ["--timeout", f"{params.timeout:g}"]
    if args.model:
        parts += ["--model", args.model]
    if args.label:
        parts += ["--label", args.label]
    for path in args.compare or []:
        parts += ["--compare", path]
    return shlex.join(parts)


def run_command(args: argparse.Namespace) -> int:
    """`heron bench`: run, write the output directory, print the table. 0 when any request succeeded."""
    params = BenchParams(
        endpoint=args.endpoint, concurrency=tuple(args.concurrency), requests_per_client=args.requests_per_client,
        duration=args.duration, max_tokens=args.max_tokens, prompt_tokens=args.prompt_tokens,
        ignore_eos=args.ignore_eos, timeout=args.timeout,
    )
    url = normalize_url(args.url)
    try:
        compare = [RunSummary.load(path) for path in args.compare or []]
    except BenchError as e:
        print(f"heron bench: error: {e}", file=sys.stderr)
        return 2
    started = dt.datetime.now().astimezone()
    out_dir = Path(args.output or f"heron-bench-{started:%Y%m%d-%H%M%S}")
    load_start = loadavg()
    bench = Bench(url, params, model=args.model, api_key=args.api_key or api_key_from_env())

    async def go() -> None:
        async with bench:
            await bench.connect()
            try:
                out_dir.mkdir(parents=True, exist_ok=True)  # before the levels: a bad path fails fast
            except OSError as e:
                raise BenchError(f"cannot create the output directory {out_dir}: {e}") from None
            await bench.run()

    interrupted = False
    try:
        asyncio.run(go())
    except BenchError as e:
        print(f"heron bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        print("\nheron bench: interrupted; writing the levels that finished", file=sys.stderr)
        if not bench.levels:
            return 130
        bench.notes.append(f"interrupted: only {len(bench.levels)} of {len(params.concurrency)} level(s) finished")

    label = args.label or bench.server_owner or urlsplit(url).netloc
    result = BenchResult(
        label=label, url=url, model=bench.model, params=params, command=command_line(args, params, url),
        started_at=started.isoformat(timespec="seconds"), machine=machine_description(),
        load_avg_start=load_start, load_avg_end=loadavg(), server_owner=bench.server_owner, warmup=bench.warmup,
        levels=bench.levels, notes=bench.notes,
    )
    written = write_outputs(result, out_dir, compare)
    print()
    print(results_table(unique_labels([result.summary(), *compare])))
    notes = result_notes(result)
    if notes:
        print()
        for note in notes:
            print(f"- {note}")
    print()
    if not any(name.endswith(".png") for name in map(str, written)) and result.levels:
        print(f"No plots: matplotlib is not installed; `{PLOTS_HINT}` adds it.")
    print(f"Report: {out_dir / 'report.md'} (with {', '.join(p.name for p in written if p.name != 'report.md')})")
    if interrupted:
        return 130
    if not any(level.ok for level in result.levels):
        print("heron bench: error: no request succeeded; report.md lists the errors", file=sys.stderr)
        return 1
    return 0
