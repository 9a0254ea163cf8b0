"""`heron serve` driven by the official `openai` Python SDK, as users drive it: only `base_url` changes.

The SDK's own parsing is part of what is tested (typed objects, stream accumulation, exception
classes). Raw bodies are checked against OpenAI's spec by the client's transport as well, and the
stream chunks, re-serialised with `to_dict()` (exactly the keys that arrived), go through the same
invariants as the raw-HTTP tests.
"""

from __future__ import annotations

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from server_helpers import DEFAULT_MODEL, STRICT_MODEL_NAMES, make_openai, summarize_stream

pytestmark = pytest.mark.timeout(120)

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_completion(oai):
    raw = oai.chat.completions.with_raw_response.create(model=DEFAULT_MODEL, messages=PARIS, max_tokens=16, temperature=0)
    assert raw.headers.get("x-request-id")
    completion = raw.parse()
    assert isinstance(completion, ChatCompletion)
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == DEFAULT_MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_chat_stream_with_usage_and_logprobs(oai):
    stream = oai.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=PARIS,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=2,
    )
    chunks = [chunk.to_dict(mode="json") for chunk in stream]
    choices, usage = summarize_stream(chunks, chat=True, include_usage=True)
    assert "Paris" in choices[0].text
    # usage counts the end-of-turn token the model generated (as vLLM does); logprobs show only the
    # tokens of the content, so they join back to the text (as OpenAI does).
    ended_by_eos = choices[0].finish_reason == "stop"
    assert len(choices[0].logprobs) == usage["completion_tokens"] - ended_by_eos
    assert "".join(entry["token"] for entry in choices[0].logprobs) == choices[0].text
    assert all(len(entry["top_logprobs"]) == 2 for entry in choices[0].logprobs)


def test_chat_stream_helper_accumulates_the_message(oai):
    # The SDK's higher-level streaming helper rebuilds a ChatCompletion from the chunks.
    with oai.chat.completions.stream(model=DEFAULT_MODEL, messages=PARIS, max_tokens=8, temperature=0) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "".join(deltas)
    assert "Paris" in final.choices[0].message.content
    assert final.choices[0].finish_reason in ("stop", "length")


def test_chat_n_choices(oai):
    completion = oai.chat.completions.create(
        model=DEFAULT_MODEL, messages=PARIS, n=2, temperature=1.0, seed=42, max_tokens=4
    )
    assert [choice.index for choice in completion.choices] == [0, 1]


def test_chat_seed_is_reproducible(oai):
    kwargs = dict(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Name a colour."}], temperature=1.0, seed=99, max_tokens=6)
    first = oai.chat.completions.create(**kwargs).choices[0].message.content
    second = oai.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second


def test_vllm_extras_through_extra_body(oai):
    completion = oai.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=PARIS,
        max_completion_tokens=3,
        extra_body={"top_k": 1, "ignore_eos": True, "min_tokens": 3, "repetition_penalty": 1.05},
    )
    assert completion.usage.completion_tokens == 3
    assert completion.choices[0].finish_reason == "length"


def test_completion_with_logprobs(oai):
    completion = oai.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    assert isinstance(completion, Completion)
    assert completion.id.startswith("cmpl-")
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == 4 == completion.usage.completion_tokens
    assert "".join(choice.logprobs.tokens) == choice.text


def test_completion_stream(oai):
    stream = oai.completions.create(
        model=DEFAULT_MODEL,
        prompt=["Once upon a time", "The capital of France is"],
        max_tokens=3,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk.to_dict(mode="json") for chunk in stream]
    choices, usage = summarize_stream(chunks, chat=False, include_usage=True)
    assert sorted(choices) == [0, 1]
    assert usage["completion_tokens"] <= 6


def test_completion_stop_string(oai):
    completion = oai.completions.create(model=DEFAULT_MODEL, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stop=[","])
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert "," not in choice.text
    assert choice.text.strip() == "5"


def test_models_list_and_retrieve(oai):
    ids = [model.id for model in oai.models.list()]
    assert ids == [DEFAULT_MODEL, "all-MiniLM-L6-v2"]
    model = oai.models.retrieve(DEFAULT_MODEL)
    assert model.id == DEFAULT_MODEL and model.object == "model"


# ---------------------------------------------------------------------------------------------
# Errors arrive as the SDK's exception classes, with OpenAI's fields
# ---------------------------------------------------------------------------------------------


def test_bad_request_error(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=DEFAULT_MODEL, messages=PARIS, temperature=3, max_tokens=1)
    error = caught.value
    assert error.status_code == 400
    assert error.param == "temperature"
    assert error.type == "invalid_request_error"
    assert "temperature" in error.message

    # A streaming request fails before any chunk: the SDK raises on create(), not mid-iteration.
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=DEFAULT_MODEL, prompt="x", logprobs=6, stream=True)
    assert caught.value.param == "logprobs"

    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=DEFAULT_MODEL, messages=PARIS, max_tokens=100_000)
    assert caught.value.code == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=PARIS,
            max_tokens=1,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        )
    assert caught.value.param == "tool_choice"


def test_not_found_error(oai):
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="no-such-model", messages=PARIS, max_tokens=1)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_authentication_error(strict_server, strict_oai, response_checker):
    wrong = make_openai(strict_server.base_url, response_checker, api_key="wrong-key")
    try:
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.models.list()
        assert caught.value.status_code == 401
    finally:
        wrong.close()
    completion = strict_oai.chat.completions.create(model=STRICT_MODEL_NAMES[1], messages=PARIS, max_tokens=1)
    assert completion.choices[0].message.role == "assistant"


def test_strict_fields_reject_extra_body(strict_oai):
    with pytest.raises(openai.BadRequestError) as caught:
        strict_oai.chat.completions.create(
            model=STRICT_MODEL_NAMES[0], messages=PARIS, max_tokens=1, extra_body={"frobnicate": True}
        )
    assert caught.value.status_code == 400
    assert "Unrecognized request argument supplied: frobnicate" in caught.value.message
