"""AsyncEngine on the bundled model: streams match the synchronous core, and the engine thread and
the event loop never stall or outlive each other (cancel, bad input, shutdown, a failing step).

Each test runs its own event loop with asyncio.run and its own AsyncEngine over one shared core;
every test leaves the core idle with all KV blocks free, which the next one checks.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from heron.engine.async_engine import AsyncEngine, EngineDeadError
from heron.engine.core import EngineCore
from heron.models.loader import load_model
from heron.outputs import FinishReason, RequestOutput
from heron.sampling_params import SamplingParams

TIMEOUT_S = 60  # a hang fails the test instead of stalling the suite

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "List three colors:",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "Water boils at",
    "My favourite food is",
]


@pytest.fixture(scope="module")
def core() -> EngineCore:
    return EngineCore(load_model(None, progress=False))


@pytest.fixture
def engine(core):
    # Every test starts from an idle core whose blocks are all free (prefix-cached ones count).
    assert not core.has_unfinished()
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_blocks
    engine = AsyncEngine(core)
    yield engine
    assert not any(t.name == "heron-engine" and t.is_alive() for t in threading.enumerate())


def encode(core: EngineCore, text: str) -> list[int]:
    return core.tokenizer.encode(text, add_special_tokens=True)


def varied_params() -> list[SamplingParams]:
    """Greedy, but otherwise different: lengths, EOS handling, stop strings, logprobs, n."""
    return [
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=16, stop=["."]),
        SamplingParams(temperature=0, max_tokens=14, logprobs=2),
        SamplingParams(temperature=0, max_tokens=10, n=2),
        SamplingParams(temperature=0, max_tokens=18, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[13]),
        SamplingParams(temperature=0, max_tokens=15, include_stop_str_in_output=True, stop=[" "]),
    ]


def run_sync(core: EngineCore, request_id: str, prompt: list[int], params: SamplingParams) -> RequestOutput:
    core.add_request(request_id, prompt, params)
    final = None
    while core.has_unfinished():
        for output in core.step():
            if output.finished:
                final = output
    assert final is not None
    return final


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams, request_id: str) -> list[RequestOutput]:
    return [output async for output in engine.generate(prompt, params, request_id)]


async def wait_for_free_blocks(core: EngineCore, within_s: float) -> float:
    deadline = time.monotonic() + within_s
    start = time.monotonic()
    while core.kv_cache.num_free_blocks != core.kv_cache.num_blocks:
        assert time.monotonic() < deadline, (
            f"{core.kv_cache.num_blocks - core.kv_cache.num_free_blocks} KV blocks still held after {within_s} s"
        )
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_concurrent_streams_match_the_synchronous_core(core, engine):
    prompts = [encode(core, text) for text in PROMPTS]
    params = varied_params()
    # Reference: each request alone on the synchronous core, before the engine thread exists.
    expected = [run_sync(core, f"sync-{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]

    async def main():
        async with engine:
            coros = [collect(engine, p, sp, f"async-{i}") for i, (p, sp) in enumerate(zip(prompts, params))]
            return await asyncio.wait_for(asyncio.gather(*coros), TIMEOUT_S)

    streams = asyncio.run(main())
    for i, (outputs, reference) in enumerate(zip(streams, expected)):
        final = outputs[-1]
        assert final.finished and not any(o.finished for o in outputs[:-1]), f"request {i}"
        assert final.request_id == f"async-{i}"
        assert len(final.outputs) == len(reference.outputs) == params[i].n
        for got, want in zip(final.outputs, reference.outputs):
            assert got.token_ids == want.token_ids, f"request {i} sample {got.index}"
            assert got.text == want.text
            assert got.finish_reason == want.finish_reason
            # The deltas, in order, are exactly the final text and tokens.
            deltas = [c for o in outputs for c in o.outputs if c.index == got.index]
            assert "".join(c.delta_text for c in deltas) == got.text
            assert [t for c in deltas for t in c.delta_token_ids] == got.token_ids
        if params[i].logprobs is not None:
            assert [lp.token_id for lp in final.outputs[0].logprobs] == final.outputs[0].token_ids
    assert engine.num_running == engine.num_waiting == 0


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_a_consumer_that_leaves_aborts_its_request_and_frees_its_blocks(core, engine, how):
    prompt = encode(core, "Write a long story about a dragon who learns to fly.")
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def consume(seen: list[RequestOutput], started: asyncio.Event) -> None:
        async for output in engine.generate(prompt, params, "leaver"):
            seen.append(output)
            if len(seen) == 3:
                started.set()
                if how == "break":
                    break  # the client went away: the generator is dropped unfinished

    async def main():
        async with engine:
            seen: list[RequestOutput] = []
            started = asyncio.Event()
            task = asyncio.create_task(consume(seen, started))
            await asyncio.wait_for(started.wait(), TIMEOUT_S)
            assert core.kv_cache.num_free_blocks < core.kv_cache.num_blocks  # it holds blocks now
            if how == "cancel":
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await wait_for_free_blocks(core, within_s=1.0)
            assert not seen[-1].finished
            # The engine still serves others afterwards.
            outputs = await asyncio.wait_for(collect(engine, prompt, SamplingParams(temperature=0, max_tokens=4), "next"), TIMEOUT_S)
            assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 4

    asyncio.run(main())
    assert not core.has_unfinished()


def test_explicit_abort_ends_the_stream_with_an_abort_output(core, engine):
    prompt = encode(core, "Tell me about the sea.")

    async def main():
        async with engine:
            outputs = []
            async for output in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True), "victim"):
                outputs.append(output)
                if len(outputs) == 3:
                    await engine.abort("victim")
            return outputs

    outputs = asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    final = outputs[-1]
    assert final.finished and final.outputs[0].finish_reason == FinishReason.ABORT
    streamed = [o.outputs[0] for o in outputs[:-1]]
    assert final.outputs[0].text == "".join(c.delta_text for c in streamed)
    assert final.outputs[0].token_ids == [t for c in streamed for t in c.delta_token_ids]
    assert len(final.outputs[0].token_ids) < 500
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_blocks


def test_bad_requests_raise_value_error_and_leave_others_running(core, engine):
    prompt = encode(core, "The capital of France is")
    vocab = core.loaded.arch_config.vocab_size

    async def first_output(prompt_ids, request_id):
        async for output in engine.generate(prompt_ids, SamplingParams(max_tokens=4), request_id):
            return output

    async def main():
        async with engine:
            good = asyncio.create_task(collect(engine, prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), "good"))
            await asyncio.sleep(0.05)
            with pytest.raises(ValueError, match="at least one token"):
                await first_output([], "empty")
            with pytest.raises(ValueError, match="token ids"):
                await first_output([1, vocab], "out-of-vocab")
            with pytest.raises(ValueError, match="already in use"):
                await first_output(prompt, "good")  # the id of the request in flight
            with pytest.raises(ValueError, match="context length"):
                await first_output([1] * (core.max_model_len + 1), "too-long")
            return await asyncio.wait_for(good, TIMEOUT_S)

    outputs = asyncio.run(main())
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 24


def test_the_event_loop_stays_responsive_while_generating(core, engine):
    prompts = [encode(core, text) for text in PROMPTS[:4]]

    async def main():
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        async with engine:
            tick = asyncio.create_task(ticker())
            params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
            started = time.monotonic()
            streams = await asyncio.wait_for(
                asyncio.gather(*(collect(engine, p, params, f"busy-{i}") for i, p in enumerate(prompts))), TIMEOUT_S
            )
            elapsed = time.monotonic() - started
            stop.set()
            await tick
        return gaps, streams, elapsed

    gaps, streams, elapsed = asyncio.run(main())
    assert all(len(s[-1].outputs[0].token_ids) == 48 for s in streams)
    assert max(gaps) < 0.5, f"event loop stalled for {max(gaps):.3f} s"
    # The ticker really ran throughout, not just before and after (each tick is >= 10 ms).
    assert len(gaps) > 0.5 * elapsed / 0.02


def test_shutdown_ends_pending_requests_and_the_thread(core, engine):
    prompt = encode(core, "Once upon a time")

    async def main():
        engine.start()
        first_seen = asyncio.Event()

        async def consume(request_id):
            outputs = []
            async for output in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True), request_id):
                outputs.append(output)
                first_seen.set()
            return outputs

        tasks = [asyncio.create_task(consume(f"pending-{i}")) for i in range(3)]
        await asyncio.wait_for(first_seen.wait(), TIMEOUT_S)
        await asyncio.wait_for(engine.shutdown(), TIMEOUT_S)
        results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
        with pytest.raises(EngineDeadError):
            await collect(engine, prompt, SamplingParams(max_tokens=2), "too-late")
        await engine.shutdown()  # idempotent
        return results

    results = asyncio.run(main())
    for outputs in results:
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == FinishReason.ABORT
    assert not engine.is_running
    assert not core.has_unfinished() and core.kv_cache.num_free_blocks == core.kv_cache.num_blocks


def test_a_failing_step_fails_requests_instead_of_hanging(core, engine, monkeypatch):
    prompt = encode(core, "The quick brown fox")
    real_step = core.step
    calls = {"n": 0}

    def step_failing_once():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected step failure")
        return real_step()

    monkeypatch.setattr(core, "step", step_failing_once)

    async def main():
        async with engine:
            params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
            tasks = [asyncio.create_task(collect(engine, prompt, params, f"doomed-{i}")) for i in range(3)]
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT_S)
            # Dead for good: new requests fail at once, before touching the core.
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(collect(engine, prompt, params, "after"), 1.0)
            return results

    results = asyncio.run(main())
    assert calls["n"] == 3  # the loop stopped stepping the failed core
    for result in results:
        assert isinstance(result, EngineDeadError), result
        assert isinstance(result.__cause__, RuntimeError) and "injected" in str(result.__cause__)
    assert isinstance(engine.dead_error, RuntimeError) and not engine.is_running
    # The in-flight requests were aborted in the core, so their blocks are back.
    assert not core.has_unfinished() and core.kv_cache.num_free_blocks == core.kv_cache.num_blocks


def test_generate_before_start_is_an_error(core, engine):
    async def main():
        with pytest.raises(RuntimeError, match="start"):
            await collect(engine, encode(core, "Hi"), SamplingParams(max_tokens=2), "early")

    asyncio.run(main())
