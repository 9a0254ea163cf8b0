"""Reasoning parsers end to end: a tiny random-weight Qwen3 checkpoint (byte-level tokenizer) served
with Qwen3's real chat template, so the `qwen3` parser is picked from the template.

Random weights never write a think block by themselves, so chat requests force one with a
`structured_outputs` regex; the answer must come back split (`reasoning` / `reasoning_content` vs
`content`), the same streamed and collected. A second server forces `deepseek_r1`
(HERON_REASONING_PARSER), whose tagless start makes the whole unconstrained output thinking: that
drives the Responses API's `reasoning` item, streamed and collected. Prompts are checked through
/tokenize + /detokenize: `enable_thinking` reaches the template, and history's `reasoning_content`
is shown by it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from server_helpers import make_client, parse_named_sse, start_server, stop_server, stream_post

pytestmark = pytest.mark.timeout(300)

TEMPLATE = Path(__file__).parent.parent / "fixtures" / "chat_templates" / "qwen3.jinja"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FORCED = r"<think>[a-z ]{1,20}</think>[a-z ]{1,20}"


def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def write_checkpoint(path: Path) -> Path:
    """A Qwen3 of 2 layers with a byte-level BPE vocabulary: the 256 bytes and Qwen's three specials."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {char: i for i, char in enumerate(sorted(_bytes_to_unicode().values(), key=lambda c: ord(c)))}
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "model_max_length": 1024})
    )
    eos = tokenizer.token_to_id("<|im_end|>")
    config = transformers.Qwen3Config(
        vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_id=eos, bos_token_id=None,
        tie_word_embeddings=False,
    )
    import torch

    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-qwen3") / "model")


def _serve(name: str, checkpoint: Path, tmp: Path, env: dict[str, str]):
    args = [str(checkpoint), "--served-model-name", "tiny-qwen3", "--chat-template", str(TEMPLATE),
            "--device", "cpu", "--max-model-len", "1024"]
    return start_server(name, tmp, args, env=env, model="tiny-qwen3", max_model_len=1024)


@pytest.fixture(scope="module")
def qwen3(checkpoint, tmp_path_factory, response_checker):
    server = _serve("qwen3", checkpoint, tmp_path_factory.mktemp("qwen3-srv"), {})
    try:
        with make_client(server.base_url, response_checker) as http:
            yield http
    finally:
        problem = stop_server(server)
    assert problem is None, f"{problem}\n{server.log_tail()}"


@pytest.fixture(scope="module")
def r1(checkpoint, tmp_path_factory, response_checker):
    server = _serve("r1", checkpoint, tmp_path_factory.mktemp("r1-srv"), {"HERON_REASONING_PARSER": "deepseek_r1"})
    try:
        with make_client(server.base_url, response_checker) as http:
            yield http
    finally:
        problem = stop_server(server)
    assert problem is None, f"{problem}\n{server.log_tail()}"


def chat_body(**extra):
    return {
        "model": "tiny-qwen3",
        "messages": [{"role": "user", "content": "Think, then answer."}],
        "max_tokens": 60,
        "temperature": 0,
        "structured_outputs": {"regex": FORCED},
        **extra,
    }


def test_forced_think_block_is_split_the_same_streamed_and_collected(qwen3):
    reply = qwen3.post("/v1/chat/completions", json=chat_body())
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    reasoning, content = message["reasoning"], message["content"]
    assert reasoning and message["reasoning_content"] == reasoning
    assert re.fullmatch(r"[a-z ]{1,20}", reasoning), reasoning
    assert re.fullmatch(r"[a-z ]{0,20}", content) and not content.startswith(" "), content
    assert "<think>" not in content and "</think>" not in content

    _, stream = stream_post(qwen3, "/v1/chat/completions", chat_body(stream=True))
    deltas = [c["choices"][0]["delta"] for c in stream.chunks if c["choices"]]
    streamed_reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    assert streamed_reasoning == "".join(d.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.get("content") or "" for d in deltas) == content
    # All the thinking comes before any of the answer.
    kinds = [("r" if d.get("reasoning") else "c") for d in deltas if d.get("reasoning") or d.get("content")]
    assert kinds == sorted(kinds, reverse=True)


def test_no_think_block_is_all_content(qwen3):
    reply = qwen3.post("/v1/chat/completions", json=chat_body(structured_outputs={"regex": "[a-z]{3,8}"}))
    message = reply.json()["choices"][0]["message"]
    assert "reasoning" not in message or message["reasoning"] is None
    assert re.fullmatch("[a-z]{3,8}", message["content"])


def _rendered(http, **body) -> str:
    tokens = http.post("/tokenize", json={"model": "tiny-qwen3", **body})
    assert tokens.status_code == 200, tokens.text
    text = http.post("/detokenize", json={"model": "tiny-qwen3", "tokens": tokens.json()["tokens"]})
    return text.json()["prompt"]


def test_enable_thinking_reaches_the_template(qwen3):
    messages = [{"role": "user", "content": "hi"}]
    assert _rendered(qwen3, messages=messages).endswith("<|im_start|>assistant\n")
    off = _rendered(qwen3, messages=messages, chat_template_kwargs={"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # The prompt closed the block: the whole output is content, even one that writes the tags.
    reply = qwen3.post("/v1/chat/completions", json=chat_body(chat_template_kwargs={"enable_thinking": False}))
    message = reply.json()["choices"][0]["message"]
    assert message.get("reasoning") is None and message["content"].startswith("<think>")


def test_history_reasoning_is_accepted_and_shown_only_by_the_template(qwen3):
    def turn(**fields):
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", **fields}]

    shown = _rendered(qwen3, messages=turn(reasoning_content="pondering"), add_generation_prompt=False,
                      continue_final_message=True)
    assert "<think>\npondering\n</think>\n\nyo" in shown
    # `reasoning` is accepted too, mirrored under the name the template reads (as transformers does).
    mirrored = _rendered(qwen3, messages=turn(reasoning="pondering"), add_generation_prompt=False, continue_final_message=True)
    assert mirrored == shown
    # Before the last user turn, Qwen3's template leaves the thinking out.
    earlier = _rendered(qwen3, messages=[*turn(reasoning_content="pondering"), {"role": "user", "content": "more"}])
    assert "pondering" not in earlier and "yo" in earlier
    reply = qwen3.post(
        "/v1/chat/completions",
        json={"model": "tiny-qwen3", "max_tokens": 3, "messages": [*turn(reasoning="x", reasoning_content="y"),
                                                                    {"role": "user", "content": "again"}]},
    )
    assert reply.status_code == 200, reply.text


def test_deepseek_r1_from_the_environment_and_the_responses_reasoning_item(r1):
    body = {"model": "tiny-qwen3", "input": "Think.", "max_output_tokens": 12, "temperature": 0}
    collected = r1.post("/v1/responses", json=body)
    assert collected.status_code == 200, collected.text
    output = collected.json()["output"]
    assert [item["type"] for item in output][:1] == ["reasoning"]
    thought = output[0]["content"][0]["text"]
    assert output[0]["content"][0]["type"] == "reasoning_text" and thought

    # The chat answer to the same prompt carries the same thinking.
    chat = r1.post("/v1/chat/completions", json={"model": "tiny-qwen3", "messages": [{"role": "user", "content": "Think."}],
                                                  "max_tokens": 12, "temperature": 0})
    assert chat.json()["choices"][0]["message"]["reasoning"] == thought
    usage = chat.json()["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0

    with r1.stream("POST", "/v1/responses", json={**body, "stream": True}) as response:
        raw = response.read()
    events = parse_named_sse(raw)
    names = [e.name for e in events]
    assert names[:2] == ["response.created", "response.in_progress"]
    added = [e.data for e in events if e.name == "response.output_item.added"]
    assert added[0]["item"]["type"] == "reasoning" and added[0]["output_index"] == 0
    streamed = "".join(e.data["delta"] for e in events if e.name == "response.reasoning_text.delta")
    done = next(e.data for e in events if e.name == "response.reasoning_text.done")
    assert streamed == done["text"] == thought
    final = events[-1].data["response"]
    assert [i["type"] for i in final["output"]] == [i["type"] for i in output]
    assert final["output"][0]["content"] == output[0]["content"]
    item_done = [e.data for e in events if e.name == "response.output_item.done"]
    assert [d["output_index"] for d in item_done] == list(range(len(output)))


WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def test_tool_call_after_the_thinking_is_read_and_one_inside_is_not(qwen3):
    call = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Rome|Paris)"\}\}\n</tool_call>'
    regex = rf"<think>[a-z]{{1,8}} {call}</think>\n\n{call}"
    body = chat_body(tools=[WEATHER], structured_outputs={"regex": regex}, max_tokens=300)
    reply = qwen3.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert "<tool_call>" in choice["message"]["reasoning"]
    calls = choice["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    _, stream = stream_post(qwen3, "/v1/chat/completions", {**body, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in stream.chunks if c["choices"]]
    assert "".join(d.get("reasoning") or "" for d in deltas) == choice["message"]["reasoning"]
    streamed_calls = [t for d in deltas for t in d.get("tool_calls") or [] if t.get("function", {}).get("name")]
    assert len(streamed_calls) == 1


def test_messages_api_returns_the_thinking_as_a_thinking_block(r1):
    # /v1/messages: the same thinking as chat's message.reasoning, as Anthropic's `thinking` block
    # before the text, collected and streamed (thinking_delta, signature_delta) alike.
    import anthropic

    client = anthropic.Anthropic(base_url=str(r1.base_url).rstrip("/"), api_key="unused")
    ask = {"model": "tiny-qwen3", "max_tokens": 12, "messages": [{"role": "user", "content": "Think."}],
           "extra_body": {"temperature": 0}}
    chat = r1.post("/v1/chat/completions", json={"model": "tiny-qwen3", "messages": [{"role": "user", "content": "Think."}],
                                                  "max_tokens": 12, "temperature": 0}).json()
    thought = chat["choices"][0]["message"]["reasoning"]
    assert thought

    message = client.messages.create(**ask)
    assert message.content[0].type == "thinking" and message.content[0].thinking == thought
    assert [block.type for block in message.content[1:]] in ([], ["text"])
    if len(message.content) > 1:
        assert message.content[1].text == chat["choices"][0]["message"]["content"]

    with client.messages.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_message()
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == thought
    assert any(d.type == "signature_delta" for d in deltas)
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in message.content]
    starts = [e.index for e in events if e.type == "content_block_start"]
    assert starts == list(range(len(message.content)))
