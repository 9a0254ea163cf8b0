"""vLLM's and llama.cpp's extensions to /v1/completions and /v1/chat/completions, over raw HTTP,
shaped as vLLM (vllm/entrypoints/openai/{completion,chat_completion}/protocol.py) and llama.cpp's
server send them:

- `prompt_logprobs: k`: one entry per prompt token, the first null, each other a map
  {token id (as a string): {"logprob", "rank", "decoded_token"}} holding the top k and the actual
  prompt token. On chat it is a top-level field; on completions vLLM puts it on each choice.
- `return_token_ids: true`: the generated ids on each choice (`token_ids`), and the prompt's ids
  (`prompt_token_ids`: top-level on chat, on each choice on completions, as in vLLM).
- `truncate_prompt_tokens: k` with `truncation_side` "left" (keep the last k, the default) or
  "right" (keep the first k).
- `stream_options.continuous_usage_stats`: with include_usage, every chunk carries the usage so far.
- llama.cpp's top-level `json_schema` and `grammar` (GBNF) constrain the output.

Each accepted field must also stay out of the X-Heron-Ignored-Fields header. Every body and chunk is
checked against OpenAI's spec by the client's transport (vLLM's extra fields are additions the
spec's schemas allow). Generation is greedy and a few tokens long.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import jsonschema
import pytest
from server_helpers import CHAT_PATH, COMPLETIONS_PATH, DEFAULT_MODEL, assert_error, stream_post

pytestmark = pytest.mark.timeout(120)

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
# 70 tokens; greedy decoding continues the count from wherever the prompt is cut.
COUNTING = ", ".join(str(i) for i in range(1, 21)) + ","


def chat_body(messages: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": messages or MESSAGES, "max_tokens": 4, "temperature": 0, **fields}


def completion_body(prompt: Any = PROMPT, **fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, **fields}


def ignored_fields(response: httpx.Response) -> set[str]:
    header = response.headers.get("x-heron-ignored-fields", "")
    return {name.strip() for name in header.split(",") if name.strip()}


def post_ok(http: httpx.Client, path: str, request: dict[str, Any], *extensions: str) -> dict[str, Any]:
    """POST, expect 200 JSON, and that the server took (did not ignore) the named extension fields."""
    response = http.post(path, json=request)
    assert response.status_code == 200, f"{response.status_code}: {response.text[:1000]}"
    assert response.headers["content-type"].startswith("application/json")
    named = ignored_fields(response)
    for name in extensions:
        assert not any(field == name or field.startswith(f"{name}.") for field in named), (
            f"{name} was ignored (X-Heron-Ignored-Fields: {sorted(named)})"
        )
    return response.json()


def tokenize(http: httpx.Client, **request: Any) -> list[int]:
    response = http.post("/tokenize", json={"model": DEFAULT_MODEL, **request})
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def detokenize(http: httpx.Client, tokens: list[int]) -> str:
    response = http.post("/detokenize", json={"model": DEFAULT_MODEL, "tokens": tokens})
    assert response.status_code == 200, response.text
    return response.json()["prompt"]


# =============================================================================================
# prompt_logprobs
# =============================================================================================


def assert_prompt_logprobs(entries: Any, prompt_ids: list[int], k: int, http: httpx.Client, *, decoded: bool = True) -> None:
    """vLLM's shape: a list over the prompt; null first; then {id: {logprob, rank, decoded_token}}.

    With `decoded`, each prompt token's decoded_token is checked against /detokenize of it alone
    (for plain-text prompts: special tokens and partial characters may be spelled differently).
    """
    assert isinstance(entries, list), entries
    assert len(entries) == len(prompt_ids), (len(entries), len(prompt_ids))
    assert entries[0] is None, entries[0]
    for position, (entry, actual) in enumerate(zip(entries[1:], prompt_ids[1:]), start=1):
        assert isinstance(entry, dict), (position, entry)
        assert str(actual) in entry, f"position {position}: the prompt token {actual} is missing from {entry}"
        # The top k, plus the actual token when it is not among them.
        assert k <= len(entry) <= k + 1, (position, entry)
        for token_id, info in entry.items():
            assert token_id.isdigit(), token_id
            assert set(info) >= {"logprob", "rank", "decoded_token"}, info
            assert isinstance(info["logprob"], float) and info["logprob"] <= 0 and math.isfinite(info["logprob"]), info
            assert isinstance(info["rank"], int) and info["rank"] >= 1, info
            assert isinstance(info["decoded_token"], str), info
        ranked = sorted(entry.values(), key=lambda info: info["rank"])
        top = [info for info in ranked if info["rank"] <= k]
        assert [info["rank"] for info in top] == list(range(1, k + 1)), (position, entry)
        assert [info["logprob"] for info in top] == sorted((info["logprob"] for info in top), reverse=True), entry
        mine = entry[str(actual)]
        # The actual token's rank counts the tokens more likely than it.
        assert mine["rank"] >= 1
        if mine["rank"] > k:
            assert mine["logprob"] <= top[-1]["logprob"], entry
        if decoded:
            assert mine["decoded_token"] == detokenize(http, [actual]), (position, mine)


def test_completion_prompt_logprobs(http):
    prompt_ids = tokenize(http, prompt=PROMPT)
    body = post_ok(http, COMPLETIONS_PATH, completion_body(prompt_logprobs=2), "prompt_logprobs")
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    (choice,) = body["choices"]
    assert_prompt_logprobs(choice["prompt_logprobs"], prompt_ids, 2, http)


def test_completion_prompt_logprobs_agree_with_echo_logprobs(http):
    # echo + logprobs scores the prompt tokens too (token_logprobs): the same numbers.
    request = completion_body(prompt_logprobs=1, echo=True, logprobs=1, max_tokens=1)
    (choice,) = post_ok(http, COMPLETIONS_PATH, request, "prompt_logprobs")["choices"]
    prompt_ids = tokenize(http, prompt=PROMPT)
    scored = choice["logprobs"]["token_logprobs"][: len(prompt_ids)]
    assert scored[0] is None
    for position, (entry, actual) in enumerate(zip(choice["prompt_logprobs"][1:], prompt_ids[1:]), start=1):
        assert entry[str(actual)]["logprob"] == pytest.approx(scored[position], abs=0.05), position


def test_completion_without_prompt_logprobs_has_none(http):
    (choice,) = post_ok(http, COMPLETIONS_PATH, completion_body())["choices"]
    assert choice.get("prompt_logprobs") is None


def test_chat_prompt_logprobs(http):
    prompt_ids = tokenize(http, messages=MESSAGES)
    body = post_ok(http, CHAT_PATH, chat_body(prompt_logprobs=3), "prompt_logprobs")
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert_prompt_logprobs(body["prompt_logprobs"], prompt_ids, 3, http, decoded=False)
    assert post_ok(http, CHAT_PATH, chat_body()).get("prompt_logprobs") is None


def test_prompt_logprobs_zero_gives_only_the_prompt_tokens(http):
    prompt_ids = tokenize(http, prompt=PROMPT)
    (choice,) = post_ok(http, COMPLETIONS_PATH, completion_body(prompt_logprobs=0), "prompt_logprobs")["choices"]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt_ids)
    assert [list(entry) for entry in entries[1:]] == [[str(token)] for token in prompt_ids[1:]]


@pytest.mark.parametrize("path", [COMPLETIONS_PATH, CHAT_PATH], ids=["completions", "chat"])
@pytest.mark.parametrize("value", [-1, -2, 21, "2"], ids=["minus_1", "minus_2", "21", "string"])
def test_bad_prompt_logprobs_is_400(http, path, value):
    request = (completion_body if path == COMPLETIONS_PATH else chat_body)(prompt_logprobs=value)
    assert_error(http.post(path, json=request), 400, param="prompt_logprobs")


@pytest.mark.parametrize("path", [COMPLETIONS_PATH, CHAT_PATH], ids=["completions", "chat"])
def test_prompt_logprobs_with_stream_is_400(http, path):
    # vLLM: "`prompt_logprobs` are not available when `stream=True`."
    request = (completion_body if path == COMPLETIONS_PATH else chat_body)(prompt_logprobs=1, stream=True)
    assert_error(http.post(path, json=request), 400, param="prompt_logprobs")


# =============================================================================================
# return_token_ids
# =============================================================================================


def test_chat_return_token_ids(http):
    request = chat_body([{"role": "user", "content": "Write a short poem about the sea."}], max_tokens=6, return_token_ids=True)
    body = post_ok(http, CHAT_PATH, request, "return_token_ids")
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    assert body["prompt_token_ids"] == tokenize(http, messages=request["messages"])
    token_ids = choice["token_ids"]
    assert isinstance(token_ids, list) and all(isinstance(t, int) for t in token_ids)
    assert len(token_ids) == body["usage"]["completion_tokens"] == 6
    assert detokenize(http, token_ids) == choice["message"]["content"]


def test_completion_return_token_ids(http):
    body = post_ok(http, COMPLETIONS_PATH, completion_body(max_tokens=4, return_token_ids=True), "return_token_ids")
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"  # (so no end-of-text token among the ids)
    # vLLM puts the prompt's ids on the choice, beside the generated ones.
    assert choice["prompt_token_ids"] == tokenize(http, prompt=PROMPT)
    assert len(choice["token_ids"]) == body["usage"]["completion_tokens"] == 4
    assert detokenize(http, choice["token_ids"]) == choice["text"]


def test_completion_return_token_ids_per_prompt(http):
    prompts = [PROMPT, "Once upon a time"]
    body = post_ok(http, COMPLETIONS_PATH, completion_body(prompts, max_tokens=3, return_token_ids=True), "return_token_ids")
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["prompt_token_ids"] for c in choices] == [tokenize(http, prompt=p) for p in prompts]
    for choice in choices:
        assert choice["finish_reason"] == "length"
        assert len(choice["token_ids"]) == 3
        assert detokenize(http, choice["token_ids"]) == choice["text"]


def test_no_token_ids_unless_asked(http):
    chat = post_ok(http, CHAT_PATH, chat_body())
    assert chat.get("prompt_token_ids") is None and chat["choices"][0].get("token_ids") is None
    completion = post_ok(http, COMPLETIONS_PATH, completion_body())
    choice = completion["choices"][0]
    assert choice.get("prompt_token_ids") is None and choice.get("token_ids") is None


# =============================================================================================
# truncate_prompt_tokens / truncation_side
# =============================================================================================


@pytest.fixture(scope="module")
def counting_ids(http) -> list[int]:
    ids = tokenize(http, prompt=COUNTING)
    assert len(ids) > 40
    return ids


def _greedy_text(http: httpx.Client, prompt: Any, **fields: Any) -> dict[str, Any]:
    return post_ok(http, COMPLETIONS_PATH, completion_body(prompt, max_tokens=3, ignore_eos=True, **fields), *fields)


def test_truncate_prompt_tokens_keeps_the_last_tokens(http, counting_ids):
    body = _greedy_text(http, COUNTING, truncate_prompt_tokens=8)
    assert body["usage"]["prompt_tokens"] == 8
    reference = _greedy_text(http, counting_ids[-8:])
    assert body["choices"][0]["text"] == reference["choices"][0]["text"]


def test_truncation_side_left_and_right(http, counting_ids):
    left = _greedy_text(http, COUNTING, truncate_prompt_tokens=8, truncation_side="left")
    right = _greedy_text(http, COUNTING, truncate_prompt_tokens=8, truncation_side="right")
    assert left["usage"]["prompt_tokens"] == right["usage"]["prompt_tokens"] == 8
    # "left" cuts from the left (keeps the last 8), "right" from the right (keeps the first 8).
    assert left["choices"][0]["text"] == _greedy_text(http, counting_ids[-8:])["choices"][0]["text"]
    assert right["choices"][0]["text"] == _greedy_text(http, counting_ids[:8])["choices"][0]["text"]
    assert left["choices"][0]["text"] != right["choices"][0]["text"]


def test_truncate_prompt_tokens_on_a_token_prompt(http, counting_ids):
    body = _greedy_text(http, counting_ids, truncate_prompt_tokens=10)
    assert body["usage"]["prompt_tokens"] == 10
    assert body["choices"][0]["text"] == _greedy_text(http, counting_ids[-10:])["choices"][0]["text"]


def test_truncate_prompt_tokens_longer_than_the_prompt_keeps_it_whole(http):
    prompt_ids = tokenize(http, prompt=PROMPT)
    body = _greedy_text(http, PROMPT, truncate_prompt_tokens=len(prompt_ids) + 50)
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)


def test_truncation_side_must_be_left_or_right(http):
    assert_error(
        http.post(COMPLETIONS_PATH, json=completion_body(truncate_prompt_tokens=4, truncation_side="middle")),
        400, param="truncation_side",
    )


# =============================================================================================
# stream_options.continuous_usage_stats
# =============================================================================================


@pytest.mark.parametrize("path", [CHAT_PATH, COMPLETIONS_PATH], ids=["chat", "completions"])
def test_continuous_usage_stats(http, path):
    make = chat_body if path == CHAT_PATH else completion_body
    request = make(
        max_tokens=5, ignore_eos=True, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}
    )
    response, sse = stream_post(http, path, request)
    assert "stream_options.continuous_usage_stats" not in ignored_fields(response)
    assert sse.done
    chunks = sse.chunks
    assert all(isinstance(chunk.get("usage"), dict) for chunk in chunks), [c.get("usage") for c in chunks]
    usages = [chunk["usage"] for chunk in chunks]
    prompt_tokens = usages[-1]["prompt_tokens"]
    assert prompt_tokens > 0
    for usage in usages:
        assert usage["prompt_tokens"] == prompt_tokens
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    counts = [usage["completion_tokens"] for usage in usages]
    assert counts == sorted(counts), counts  # never shrinks...
    assert counts[-1] == 5 and counts[0] < counts[-1], counts  # ...and grows to the total
    # The last chunk is still the usage-only one of include_usage.
    assert chunks[-1]["choices"] == []
    # Each chunk that carries a new token counts it.
    texts = [c for c in chunks if c["choices"] and ((c["choices"][0].get("delta") or {}).get("content") or c["choices"][0].get("text"))]
    assert len({c["usage"]["completion_tokens"] for c in texts}) == len(texts), counts


def test_include_usage_alone_keeps_usage_null_until_the_end(http):
    request = chat_body(max_tokens=3, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": False})
    _, sse = stream_post(http, CHAT_PATH, request)
    assert all(chunk.get("usage") is None for chunk in sse.chunks[:-1])
    assert sse.chunks[-1]["usage"]["completion_tokens"] <= 3


# =============================================================================================
# llama.cpp: top-level json_schema and grammar
# =============================================================================================

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_chat_json_schema(http):
    request = chat_body([{"role": "user", "content": "Describe a person named Alice who is 30 years old."}],
                        max_tokens=40, json_schema=PERSON_SCHEMA)
    (choice,) = post_ok(http, CHAT_PATH, request, "json_schema")["choices"]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON_SCHEMA)


def test_completion_json_schema(http):
    request = completion_body("Alice is 30 years old. As JSON:", max_tokens=40, json_schema=PERSON_SCHEMA)
    (choice,) = post_ok(http, COMPLETIONS_PATH, request, "json_schema")["choices"]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["text"]), PERSON_SCHEMA)


YES_NO = 'root ::= "yes" | "no"'
# Two rules, a rule reference and a character class: more of GBNF than one alternation.
MAYBE = 'root ::= word "."\nword ::= "maybe" | "perhaps" | [0-9]'


@pytest.mark.parametrize(
    ("grammar", "allowed"),
    [(YES_NO, {"yes", "no"}), (MAYBE, {"maybe.", "perhaps.", *(f"{d}." for d in range(10))})],
    ids=["yes_no", "two_rules"],
)
def test_chat_grammar(http, grammar, allowed):
    request = chat_body([{"role": "user", "content": "Is the sky green? Answer yes or no."}], max_tokens=8, grammar=grammar)
    (choice,) = post_ok(http, CHAT_PATH, request, "grammar")["choices"]
    assert choice["message"]["content"] in allowed, choice
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("grammar", "allowed"),
    [(YES_NO, {"yes", "no"}), (MAYBE, {"maybe.", "perhaps.", *(f"{d}." for d in range(10))})],
    ids=["yes_no", "two_rules"],
)
def test_completion_grammar(http, grammar, allowed):
    request = completion_body("Question: Is the sky blue? Answer:", max_tokens=8, grammar=grammar)
    (choice,) = post_ok(http, COMPLETIONS_PATH, request, "grammar")["choices"]
    assert choice["text"] in allowed, choice
    assert choice["finish_reason"] == "stop"


def test_grammar_applies_to_a_stream(http):
    request = chat_body([{"role": "user", "content": "Is the sky green? Answer yes or no."}], max_tokens=8, grammar=YES_NO, stream=True)
    response, sse = stream_post(http, CHAT_PATH, request)
    assert "grammar" not in ignored_fields(response)
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in sse.chunks if c["choices"])
    assert text in {"yes", "no"}, text


@pytest.mark.parametrize("path", [CHAT_PATH, COMPLETIONS_PATH], ids=["chat", "completions"])
@pytest.mark.parametrize(
    "grammar", ["root ::= undefined_rule", 'root ::= ("yes"', "this is not a grammar"], ids=["undefined_rule", "unclosed", "garbage"]
)
def test_invalid_grammar_is_400(http, path, grammar):
    request = (chat_body if path == CHAT_PATH else completion_body)(grammar=grammar)
    error = assert_error(http.post(path, json=request), 400)
    assert error["param"] in (None, "grammar"), error


@pytest.mark.parametrize("path", [CHAT_PATH, COMPLETIONS_PATH], ids=["chat", "completions"])
def test_invalid_json_schema_is_400(http, path):
    request = (chat_body if path == CHAT_PATH else completion_body)(json_schema={"type": "objekt"})
    error = assert_error(http.post(path, json=request), 400)
    assert error["param"] is None or error["param"].startswith("json_schema"), error
