"""Fault isolation on the bundled SmolLM2-135M (fp32 on CPU): one request that fails while it is
sampled, grammar-checked or detokenized ends alone, with a RequestFailedError on its final output
and its KV blocks freed, and the requests batched with it generate exactly what they generate
alone. Only engine failures (the scheduler, out of memory, a step where nobody runs) kill it.

Failures are injected through what a request may carry (an `allowed_tokens_fn` that raises) or by
patching one request's own objects (its detokenizer, its grammar matcher), never the shared code
path of its bystanders, unless the test is about the shared path.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from heron.engine.async_engine import AsyncEngine, EngineDeadError
from heron.engine.core import EngineCore
from heron.engine.errors import RequestFailedError
from heron.models.loader import LoadedModel, load_model
from heron.outputs import FinishReason, RequestOutput
from heron.sampling_params import SamplingParams, StructuredOutputsParams
from heron.structured.bitmask import GrammarBitmask
from heron.worker import sampler as sampler_module
from tests.integration.test_engine import make_core

TIMEOUT_S = 60
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(None, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def core(loaded) -> EngineCore:
    return make_core(loaded, num_blocks=64)


@pytest.fixture(autouse=True)
def _idle_before_and_after(core):
    assert not core.has_unfinished()
    yield
    assert not core.has_unfinished()
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_blocks, "a failed request kept its KV blocks"


@pytest.fixture(scope="module")
def prompt(core) -> list[int]:
    return core.tokenizer.encode("The history of the printing press begins", add_special_tokens=True)


@pytest.fixture(scope="module")
def other_prompt(core) -> list[int]:
    return core.tokenizer.encode("def fibonacci(n):", add_special_tokens=True)


def run(core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    """Add every request and step until idle; each request's final output (exactly one each)."""
    for request_id, (prompt, params) in requests.items():
        core.add_request(request_id, prompt, params)
    finished: dict[str, RequestOutput] = {}
    for _ in range(1000):
        if not core.has_unfinished():
            break
        for output in core.step():
            assert output.request_id not in finished, f"{output.request_id} reported after it finished"
            if output.finished:
                finished[output.request_id] = output
    assert set(finished) == set(requests)
    return finished


def tokens_alone(core: EngineCore, prompt: list[int], params: SamplingParams) -> list[int]:
    output = run(core, {"alone": (prompt, params)})["alone"]
    assert output.error is None
    return output.outputs[0].token_ids


def raising_after(num_tokens: int):
    """An allowed_tokens_fn that fails once the request has `num_tokens` output tokens."""

    def allowed(output_token_ids: list[int]) -> torch.Tensor | None:
        if len(output_token_ids) >= num_tokens:
            raise RuntimeError("injected sampling failure")
        return None

    return allowed


def assert_failed(output: RequestOutput, code: str, num_tokens: int | None = None) -> RequestFailedError:
    assert output.finished and isinstance(output.error, RequestFailedError), output
    assert output.error.code == code
    for completion in output.outputs:
        assert completion.finish_reason == FinishReason.ABORT
        if num_tokens is not None:
            assert len(completion.token_ids) == num_tokens
    return output.error


@pytest.mark.parametrize("bystander", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_failing_in_the_sampler_ends_alone(core, prompt, other_prompt, bystander):
    reference = tokens_alone(core, other_prompt, bystander)
    bad = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, allowed_tokens_fn=raising_after(3))
    outputs = run(core, {"bystander": (other_prompt, bystander), "bad": (prompt, bad)})
    assert outputs["bystander"].error is None
    assert outputs["bystander"].outputs[0].token_ids == reference
    error = assert_failed(outputs["bad"], "internal_error", num_tokens=3)
    assert error.status == 500 and "RuntimeError" in error.message and "injected" not in error.message


def test_a_seeded_bystander_is_rewound_when_a_step_fails_after_its_draw(core, prompt, other_prompt, monkeypatch):
    """The failure comes after the batch's draws (in the bad request's logprobs), so the seeded
    bystander's generator has already moved when the batch is re-run one request at a time."""
    reference = tokens_alone(core, other_prompt, SEEDED)
    real = sampler_module.token_logprobs
    calls = {"n": 0}

    def failing_on_the_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise RuntimeError("injected logprobs failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler_module, "token_logprobs", failing_on_the_third)
    bad = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=1)
    outputs = run(core, {"bystander": (other_prompt, SEEDED), "bad": (prompt, bad)})
    assert outputs["bystander"].error is None
    assert outputs["bystander"].outputs[0].token_ids == reference
    assert_failed(outputs["bad"], "internal_error", num_tokens=2)


def test_a_request_failing_to_detokenize_ends_alone(core, prompt, other_prompt):
    reference = tokens_alone(core, other_prompt, GREEDY)
    core.add_request("bystander", other_prompt, GREEDY)
    core.add_request("bad", prompt, GREEDY)
    detokenizer = core.output_processor._groups["bad"].samples[0].detokenizer
    real_update = detokenizer.update

    def update(token_ids):
        if len(detokenizer.output_text) > 5:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real_update(token_ids)

    detokenizer.update = update
    finished = {}
    while core.has_unfinished():
        for output in core.step():
            if output.finished:
                finished[output.request_id] = output
    assert finished["bystander"].error is None
    assert finished["bystander"].outputs[0].token_ids == reference
    error = assert_failed(finished["bad"], "internal_error")
    assert "UnicodeDecodeError" in error.message
    assert 0 < len(finished["bad"].outputs[0].token_ids) < MAX_TOKENS


def test_one_failing_sample_ends_its_whole_request(core, prompt, other_prompt):
    """n > 1: the request is one unit for its caller; all its samples end, with one final output."""
    reference = tokens_alone(core, other_prompt, GREEDY)
    bad = SamplingParams(temperature=1.0, n=3, max_tokens=MAX_TOKENS, allowed_tokens_fn=raising_after(2))
    outputs = run(core, {"bystander": (other_prompt, GREEDY), "bad": (prompt, bad)})
    assert outputs["bystander"].outputs[0].token_ids == reference
    assert_failed(outputs["bad"], "internal_error", num_tokens=2)
    assert len(outputs["bad"].outputs) == 3


def test_a_lone_failing_request_does_not_kill_the_engine(core, prompt):
    bad = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, allowed_tokens_fn=raising_after(0))
    assert_failed(run(core, {"bad": (prompt, bad)})["bad"], "internal_error", num_tokens=0)
    assert tokens_alone(core, prompt, GREEDY)  # and it still serves


def test_a_step_where_every_request_fails_alone_fails_them_and_keeps_serving(core, prompt, other_prompt):
    """Two engine requests can come from one HTTP request (two prompts): their failing together
    must not stop the engine for everyone else."""
    bad = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, allowed_tokens_fn=raising_after(0))
    outputs = run(core, {"bad-1": (prompt, bad), "bad-2": (other_prompt, bad)})
    for request_id in ("bad-1", "bad-2"):
        assert_failed(outputs[request_id], "internal_error", num_tokens=0)
    assert tokens_alone(core, prompt, GREEDY)


def test_running_out_of_memory_kills_the_engine_without_retrying(core, prompt, other_prompt, monkeypatch):
    calls = {"n": 0}

    def out_of_memory(out):
        calls["n"] += 1
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(core.executor, "execute_model", out_of_memory)
    core.add_request("a", prompt, GREEDY)
    core.add_request("b", other_prompt, GREEDY)
    with pytest.raises(torch.OutOfMemoryError):
        core.step()
    assert calls["n"] == 1
    assert core.abort_request("a") and core.abort_request("b")


def test_add_request_refuses_token_ids_past_the_vocabulary(core, prompt):
    vocab = core.loaded.arch_config.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        core.add_request("r", prompt, SamplingParams(logit_bias={vocab: 1.0}))
    with pytest.raises(ValueError, match="stop_token_ids"):
        core.add_request("r", prompt, SamplingParams(stop_token_ids=[1, vocab + 5]))
    # Up to the last id is fine.
    run(core, {"r": (prompt, SamplingParams(max_tokens=2, logit_bias={vocab - 1: 1.0}, stop_token_ids=[vocab - 1]))})


# -- structured outputs fail closed -------------------------------------------------------------

WORDS = StructuredOutputsParams(regex=r"[a-z]+( [a-z]+){0,20}")


def test_a_grammar_that_errors_mid_decode_ends_its_request(core, prompt, other_prompt):
    reference = tokens_alone(core, other_prompt, GREEDY)
    core.add_request("bystander", other_prompt, GREEDY)
    core.add_request("bad", prompt, SamplingParams(temperature=0, max_tokens=30, structured_outputs=WORDS))
    finished: dict[str, RequestOutput] = {}
    num_steps = 0
    while core.has_unfinished():
        for output in core.step():
            if output.finished:
                finished[output.request_id] = output
        num_steps += 1
        if num_steps == 3 and "bad" not in finished:
            matcher = core.output_processor._groups["bad"].samples[0].request.grammar
            digit = core.tokenizer.encode("7", add_special_tokens=False)[0]
            assert not matcher.consume_token(digit) and matcher.is_error()  # corrupt its grammar state
    assert finished["bystander"].outputs[0].token_ids == reference
    error = assert_failed(finished["bad"], "grammar_failed", num_tokens=3)
    assert "output constraint" in error.message


def test_a_sampled_token_the_grammar_refuses_ends_its_request(core, prompt, other_prompt):
    """An allowed_tokens_fn that bans everything the grammar allows: whatever comes out breaks the
    grammar, and the core must not let it (or anything after it) through."""
    reference = tokens_alone(core, other_prompt, GREEDY)
    digit = core.tokenizer.encode("7", add_special_tokens=False)[0]
    vocab = core.loaded.arch_config.vocab_size
    only_digit = torch.zeros(vocab, dtype=torch.bool)
    only_digit[digit] = True
    bad = SamplingParams(temperature=0, max_tokens=10, structured_outputs=WORDS, allowed_tokens_fn=lambda ids: only_digit)
    outputs = run(core, {"bystander": (other_prompt, GREEDY), "bad": (prompt, bad)})
    assert outputs["bystander"].outputs[0].token_ids == reference
    assert_failed(outputs["bad"], "grammar_failed", num_tokens=0)


def test_a_grammar_mask_allowing_nothing_ends_its_request(core, prompt, other_prompt, monkeypatch):
    reference = tokens_alone(core, other_prompt, GREEDY)
    real_wait = GrammarBitmask.wait

    def nothing_allowed(self, pending):
        return torch.zeros_like(real_wait(self, pending))

    monkeypatch.setattr(GrammarBitmask, "wait", nothing_allowed)
    bad = SamplingParams(temperature=0, max_tokens=10, structured_outputs=WORDS)
    outputs = run(core, {"bystander": (other_prompt, GREEDY), "bad": (prompt, bad)})
    assert outputs["bystander"].outputs[0].token_ids == reference
    assert_failed(outputs["bad"], "grammar_failed", num_tokens=0)


# -- AsyncEngine ---------------------------------------------------------------------------------


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams, request_id: str) -> list[RequestOutput]:
    return [output async for output in engine.generate(prompt, params, request_id)]


def test_async_engine_raises_the_failure_and_keeps_serving(core, prompt, other_prompt):
    reference = tokens_alone(core, other_prompt, GREEDY)
    bad = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, allowed_tokens_fn=raising_after(2))

    async def main():
        async with AsyncEngine(core) as engine:
            seen: list[RequestOutput] = []

            async def consume_bad():
                async for output in engine.generate(prompt, bad, "bad"):
                    seen.append(output)

            results = await asyncio.wait_for(
                asyncio.gather(consume_bad(), collect(engine, other_prompt, GREEDY, "bystander"), return_exceptions=True),
                TIMEOUT_S,
            )
            assert engine.is_running and engine.dead_error is None
            later = await asyncio.wait_for(collect(engine, other_prompt, GREEDY, "later"), TIMEOUT_S)
            return results, seen, later

    (bad_result, bystander), seen, later = asyncio.run(main())
    assert isinstance(bad_result, RequestFailedError) and bad_result.code == "internal_error"
    assert all(not output.finished and output.error is None for output in seen)  # nothing after the error
    assert sum(len(c.delta_token_ids) for output in seen for c in output.outputs) == 2
    assert bystander[-1].outputs[0].token_ids == reference
    assert later[-1].outputs[0].token_ids == reference


def test_a_scheduler_failure_still_kills_the_async_engine(core, prompt, monkeypatch):
    real_schedule = core.scheduler.schedule
    calls = {"n": 0}

    def schedule_failing_on_the_third():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected scheduler failure")
        return real_schedule()

    monkeypatch.setattr(core.scheduler, "schedule", schedule_failing_on_the_third)

    async def main():
        async with AsyncEngine(core) as engine:
            result = await asyncio.wait_for(
                asyncio.gather(collect(engine, prompt, GREEDY, "doomed"), return_exceptions=True), TIMEOUT_S
            )
            return engine, result[0]

    engine, result = asyncio.run(main())
    assert isinstance(result, EngineDeadError)
    assert isinstance(engine.dead_error, RuntimeError) and "injected" in str(engine.dead_error)
    assert not engine.is_running


def test_shutdown_releases_the_worker_and_later_steps_are_refused(loaded, prompt):
    own = make_core(loaded, num_blocks=8)
    own.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=2))
    while own.has_unfinished():
        own.step()
    assert own.executor.runner is not None
    own.shutdown()
    assert own.executor.runner is None  # its KV cache tensors go with it
    with pytest.raises(RuntimeError, match="shut down"):
        own.step()
    own.shutdown()  # a second call changes nothing
