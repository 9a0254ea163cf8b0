"""ChatTemplate renders what transformers' apply_chat_template renders, on real model templates.

The reference side is a real `PreTrainedTokenizerFast` built locally around a tiny word-level
vocabulary that holds the model's special tokens: `apply_chat_template(tokenize=False)` needs
nothing else, so nothing is downloaded. Heron gets OpenAI wire messages (tool-call arguments as JSON
strings, content as text parts); transformers gets the form its docs prescribe (arguments as dicts).
"""

from __future__ import annotations

import copy
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from heron.models.chat_template import ChatTemplate, ChatTemplateError
from heron.models.gguf import GGUFFile

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"

# name -> (fixture file, the special tokens the model's tokenizer_config.json declares)
REAL_TEMPLATES: dict[str, tuple[str, dict[str, str]]] = {
    "qwen2.5": ("qwen2_5_instruct.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3.1": ("llama3_1_instruct.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral": ("mistral_7b_instruct_v0_3.jinja", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "qwen2-vl": ("qwen2_vl_instruct.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
}
STRING_FORMAT = ("smollm2", "qwen2.5", "llama3.1", "mistral")
ALL_TEMPLATES = (*STRING_FORMAT, "qwen2-vl")
TOOL_TEMPLATES = ("qwen2.5", "llama3.1", "mistral")


@pytest.fixture(scope="session")
def smollm2_template(smollm2_gguf_path) -> tuple[str, dict[str, str]]:
    metadata = GGUFFile(smollm2_gguf_path).metadata
    tokens = metadata["tokenizer.ggml.tokens"]
    ids = {
        "bos_token": "tokenizer.ggml.bos_token_id",
        "eos_token": "tokenizer.ggml.eos_token_id",
        "unk_token": "tokenizer.ggml.unknown_token_id",
        "pad_token": "tokenizer.ggml.padding_token_id",
    }
    special = {name: tokens[metadata[key]] for name, key in ids.items() if key in metadata}
    return metadata["tokenizer.chat_template"], special


@pytest.fixture(scope="session")
def templates(smollm2_template) -> dict[str, tuple[str, dict[str, str]]]:
    loaded = {
        name: ((FIXTURES / file).read_text(encoding="utf-8"), special)
        for name, (file, special) in REAL_TEMPLATES.items()
    }
    return {"smollm2": smollm2_template, **loaded}


def hf_tokenizer(special_tokens: dict[str, str]) -> PreTrainedTokenizerFast:
    vocab = {"[ref-unk]": 0, **{tok: i + 1 for i, tok in enumerate(dict.fromkeys(special_tokens.values()))}}
    backend = BackendTokenizer(WordLevel(vocab, unk_token="[ref-unk]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def hf_render(source: str, special_tokens: dict[str, str], messages: list[dict], **kwargs: Any) -> str:
    return hf_tokenizer(special_tokens).apply_chat_template(
        copy.deepcopy(messages), chat_template=source, tokenize=False, **kwargs
    )


def with_dict_arguments(messages: list[dict]) -> list[dict]:
    """The transformers-documented form of OpenAI messages: tool-call arguments as dicts."""
    converted = copy.deepcopy(messages)
    for message in converted:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return converted


# -- conversations -----------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time",
        "parameters": {"type": "object", "properties": {}},
    },
}


def tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


USER_ONLY = [{"role": "user", "content": "What is the capital of France?"}]
MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a prime number above 10."},
]
TEXT_PARTS = [
    {
        "role": "user",
        "content": [{"type": "text", "text": "First paragraph."}, {"type": "text", "text": "Second paragraph."}],
    }
]
TEXT_PARTS_JOINED = [{"role": "user", "content": "First paragraph.\nSecond paragraph."}]
DEVELOPER = [
    {"role": "developer", "content": "Answer in French."},
    {"role": "user", "content": "Good morning"},
]
DEVELOPER_AS_SYSTEM = [
    {"role": "system", "content": "Answer in French."},
    {"role": "user", "content": "Good morning"},
]
PREFILL = [
    {"role": "user", "content": "Complete the sentence about Paris."},
    {"role": "assistant", "content": "The capital of France is"},
]
ONE_TOOL_ROUND = [
    {"role": "system", "content": "You can check the weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [tool_call("call0abcd", "get_weather", '{"city": "Paris", "unit": "celsius"}')],
    },
    {"role": "tool", "tool_call_id": "call0abcd", "content": '{"temperature": 21, "sky": "clear"}'},
]
PARALLEL_TOOL_ROUND = [
    {"role": "user", "content": "Weather and time in Zürich?"},
    {
        "role": "assistant",
        "content": "Let me check both.",
        "tool_calls": [
            tool_call("call1abcd", "get_weather", '{"city": "Zürich"}'),
            tool_call("call2abcd", "get_time", "{}"),
        ],
    },
    {"role": "tool", "tool_call_id": "call1abcd", "content": "12 degrees"},
    {"role": "tool", "tool_call_id": "call2abcd", "content": "14:05"},
]


@dataclass(frozen=True)
class Case:
    id: str
    template: str
    messages: list[dict]
    kwargs: dict[str, Any] = field(default_factory=dict)
    hf_messages: list[dict] | None = None  # what transformers gets, when it differs from the wire form
    expect: tuple[str, ...] = ()  # text the prompt must contain, so that two empty renders cannot agree

    def __repr__(self) -> str:
        return f"{self.template}-{self.id}"


def _cases() -> list[Case]:
    cases: list[Case] = []
    for name in ALL_TEMPLATES:
        cases += [
            Case(
                "single_turn_generation_prompt",
                name,
                USER_ONLY,
                {"add_generation_prompt": True},
                expect=("capital of France",),
            ),
            Case("single_turn_no_generation_prompt", name, USER_ONLY, expect=("capital of France",)),
            Case(
                "multi_turn_with_system",
                name,
                MULTI_TURN,
                {"add_generation_prompt": True},
                expect=("You are terse.", "prime number"),
            ),
            Case(
                "content_as_text_parts",
                name,
                TEXT_PARTS,
                {"add_generation_prompt": True},
                # A template that walks the parts itself gets them; the others get one string.
                hf_messages=TEXT_PARTS if name == "qwen2-vl" else TEXT_PARTS_JOINED,
                expect=("First paragraph.", "Second paragraph."),
            ),
            Case(
                "developer_is_system",
                name,
                DEVELOPER,
                {"add_generation_prompt": True},
                DEVELOPER_AS_SYSTEM,
                ("Answer in French.",),
            ),
            Case(
                "continue_final_message",
                name,
                PREFILL,
                {"continue_final_message": True},
                expect=("The capital of France is",),
            ),
            Case(
                "explicit_null_content_dropped",
                name,
                [*USER_ONLY, {"role": "assistant", "content": "Paris.", "name": None}],
                hf_messages=[*USER_ONLY, {"role": "assistant", "content": "Paris."}],
                expect=("Paris.",),
            ),
        ]
    for name in TOOL_TEMPLATES:
        cases += [
            Case(
                "tools_given",
                name,
                USER_ONLY,
                {"tools": [WEATHER_TOOL, TIME_TOOL], "add_generation_prompt": True},
                expect=("get_weather", "Zürich"),
            ),
            Case(
                "tool_call_and_result",
                name,
                ONE_TOOL_ROUND,
                {"tools": [WEATHER_TOOL], "add_generation_prompt": True},
                expect=("Paris", "21"),
            ),
            Case(
                "tool_call_no_tools_given",
                name,
                ONE_TOOL_ROUND,
                {"add_generation_prompt": True},
                expect=("celsius",),
            ),
        ]
    # Llama 3.1 allows one call per message; the others take parallel calls.
    cases += [
        Case(
            "parallel_tool_calls",
            name,
            PARALLEL_TOOL_ROUND,
            {"tools": [WEATHER_TOOL, TIME_TOOL], "add_generation_prompt": True},
            expect=("get_time", "14:05"),
        )
        for name in ("qwen2.5", "mistral")
    ]
    cases += [
        Case(
            "extra_kwargs_date_and_tools_in_system",
            "llama3.1",
            USER_ONLY,
            {
                "tools": [WEATHER_TOOL],
                "add_generation_prompt": True,
                "date_string": "01 Jan 2025",
                "tools_in_user_message": False,
            },
            expect=("Today Date: 01 Jan 2025", "You have access to the following functions"),
        ),
        Case(
            "extra_kwargs_builtin_tools",
            "llama3.1",
            USER_ONLY,
            {"builtin_tools": ["brave_search", "wolfram_alpha"], "add_generation_prompt": True},
            expect=("Tools: brave_search, wolfram_alpha",),
        ),
        Case(
            "extra_kwargs_add_vision_id",
            "qwen2-vl",
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}},
                        {"type": "text", "text": "What is this?"},
                    ],
                }
            ],
            {"add_vision_id": True, "add_generation_prompt": True},
            expect=("Picture 1: <|vision_start|>", "What is this?"),
        ),
    ]
    return cases


@pytest.mark.parametrize("case", _cases(), ids=repr)
def test_matches_transformers(case: Case, templates) -> None:
    source, special = templates[case.template]
    messages = copy.deepcopy(case.messages)
    ours = ChatTemplate(source, special_tokens=special).render(messages, **case.kwargs)
    theirs = hf_render(source, special, with_dict_arguments(case.hf_messages or case.messages), **case.kwargs)
    assert ours == theirs
    for text in case.expect:
        assert text in ours
    assert messages == case.messages, "render must not modify the caller's messages"


@pytest.mark.parametrize("name", ALL_TEMPLATES)
def test_continue_final_message_ends_on_the_partial_text(name: str, templates) -> None:
    source, special = templates[name]
    template = ChatTemplate(source, special_tokens=special)
    prompt = template.render(PREFILL, continue_final_message=True)
    finished = template.render(PREFILL)
    assert prompt.endswith("The capital of France is")
    # The open prompt is the finished one minus what closes the assistant turn (an end-of-turn token).
    assert finished.startswith(prompt) and len(finished) > len(prompt)


# -- templates refusing a conversation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "messages", "kwargs", "message"),
    [
        (
            "mistral",
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            {},
            "conversation roles must alternate",
        ),
        (
            "llama3.1",
            [
                *USER_ONLY,
                {
                    "role": "assistant",
                    "tool_calls": [tool_call("a", "get_time", "{}"), tool_call("b", "get_time", "{}")],
                },
            ],
            {},
            "only supports single tool-calls",
        ),
        ("llama3.1", [{"role": "system", "content": "s"}], {"tools": [WEATHER_TOOL]}, "no first user message"),
        (
            "mistral",
            [*USER_ONLY, {"role": "assistant", "tool_calls": [tool_call("short", "get_time", "{}")]}],
            {},
            "length 9",
        ),
    ],
    ids=["mistral-alternation", "llama-parallel-calls", "llama-tools-without-user", "mistral-call-id"],
)
def test_raise_exception_becomes_chat_template_error(name, messages, kwargs, message, templates) -> None:
    source, special = templates[name]
    with pytest.raises(ChatTemplateError, match=message) as raised:
        ChatTemplate(source, special_tokens=special).render(messages, **kwargs)
    assert isinstance(raised.value, ValueError)
    with pytest.raises(jinja2.TemplateError, match=message):
        hf_render(source, special, with_dict_arguments(messages), **kwargs)


@pytest.mark.parametrize(
    ("source", "messages", "kwargs", "message"),
    [
        (
            "{{ messages[0].content }}",
            PREFILL,
            {"continue_final_message": True, "add_generation_prompt": True},
            "cannot both be set",
        ),
        ("{{ messages[0].content }}", [], {}, "empty conversation"),
        (
            "{% for m in messages[:-1] %}{{ m.content }}{% endfor %}",
            PREFILL,
            {"continue_final_message": True},
            "does not reproduce",
        ),
        (
            "{% for m in messages %}{{ m.content }}{% endfor %}",
            [*USER_ONLY, {"role": "assistant", "content": None}],
            {"continue_final_message": True},
            'no "content"',
        ),
        (
            "{% for m in messages %}{{ m.role }}{% endfor %}",
            PREFILL,
            {"continue_final_message": True},
            "never reads message content",
        ),
        ("{{ ''.__class__.__mro__ }}", USER_ONLY, {}, "SecurityError: access to attribute '__class__'"),
        ("{% set ns = namespace(_hidden=1) %}{{ ns }}", USER_ONLY, {}, "may not store"),
        ("{% set ns = namespace(a=1) %}{% set ns._b = 2 %}", USER_ONLY, {}, "may not store"),
        ("{{ messages[0].content + 1 }}", USER_ONLY, {}, "TypeError"),
        ("{{ missing.attribute }}", USER_ONLY, {}, "UndefinedError"),
        ("{{ raise_exception('custom refusal: ' + messages[0].role) }}", USER_ONLY, {}, "^custom refusal: user$"),
        (
            "{% for m in messages %}{{ m.content }}{% endfor %}",
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
            {},
            "'image_url' is not supported",
        ),
    ],
    ids=[
        "continue-and-generation-prompt",
        "empty-conversation",
        "template-drops-final-message",
        "final-message-without-content",
        "template-never-reads-content",
        "sandbox-dunder",
        "namespace-underscore-init",
        "namespace-underscore-set",
        "python-type-error",
        "undefined",
        "raise-exception-message-verbatim",
        "non-text-part-for-string-template",
    ],
)
def test_errors_are_chat_template_errors(source, messages, kwargs, message) -> None:
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate(source).render(messages, **kwargs)


def test_syntax_error_raises_at_construction() -> None:
    with pytest.raises(ChatTemplateError, match=r"does not compile \(line 2\)"):
        ChatTemplate("{% for m in messages %}\n{{ m.content }\n{% endfor %}")


# -- what the sandbox gives templates -----------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "messages", "kwargs", "expected"),
    [
        (
            "{{ messages[0].content | tojson }}|{{ tools | tojson(indent=2) }}"
            "|{{ tools | tojson(separators=(',', ':')) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}",
            [{"role": "user", "content": "héllo <b> & 'q'"}],
            {"tools": [{"name": "f", "x": [1, 2]}]},
            "\"héllo <b> & 'q'\""
            '|[\n  {\n    "name": "f",\n    "x": [\n      1,\n      2\n    ]\n  }\n]'
            '|[{"name":"f","x":[1,2]}]|{"a": 2, "b": 1}',
        ),
        (
            "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
            "{% if loop.index > 3 %}{% break %}{% endif %}[{{ m.content }}]{% endfor %}",
            MULTI_TURN,
            {},
            "[Hi there][Hello! How can I help?]",
        ),
        (
            "{% for m in messages %}\n    {% if m.role == 'user' %}\n        U: {{ m.content }}\n"
            "    {% endif %}\n{% endfor %}",
            MULTI_TURN,
            {},
            "        U: Hi there\n        U: Name a prime number above 10.\n",
        ),
        (
            "{% for m in messages %}{% if m.role == 'assistant' %}"
            "{% generation %}<a>{{ m.content }}</a>{% endgeneration %}"
            "{% else %}{{ m.content }}{% endif %}{% endfor %}",
            MULTI_TURN[1:3],
            {},
            "Hi there<a>Hello! How can I help?</a>",
        ),
        (
            "{% for d in documents %}{{ d.title }}: {{ d.text }}\n{% endfor %}{{ messages[-1].content }}",
            USER_ONLY,
            {"documents": [{"title": "Doc A", "text": "alpha"}, {"title": "Doc B", "text": "beta"}]},
            "Doc A: alpha\nDoc B: beta\nWhat is the capital of France?",
        ),
        (
            "{{ bos_token }}|{{ eos_token }}|{{ flavour }}",
            USER_ONLY,
            {"eos_token": "<override>", "flavour": "mint"},
            "<s>|<override>|mint",
        ),
        (
            "{{ messages[0].reasoning_content }}|{{ messages[0].thinking }}|{{ messages[0].reasoning }}",
            [{"role": "assistant", "content": "4", "reasoning": "2+2"}],
            {},
            "2+2|2+2|2+2",
        ),
        ("{% set d = dict(a=1) %}{{ d.a }}{{ dict.fromkeys(['x']) | tojson }}", USER_ONLY, {}, '1{"x": null}'),
    ],
    ids=[
        "tojson",
        "loop-controls",
        "trim-and-lstrip-blocks",
        "generation-block",
        "documents",
        "special-tokens-and-kwargs",
        "reasoning-aliases",
        "dict-global",
    ],
)
def test_template_environment_matches_transformers(source, messages, kwargs, expected) -> None:
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    ours = ChatTemplate(source, special_tokens=special).render(messages, **kwargs)
    assert ours == expected
    assert ours == hf_render(source, special, messages, **kwargs)


def test_strftime_now() -> None:
    before = datetime.date.today().isoformat()
    rendered = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}").render(USER_ONLY)
    assert rendered in {before, datetime.date.today().isoformat()}


def test_developer_role_kept_when_the_template_knows_it() -> None:
    source = (
        "{% for m in messages %}{% if m.role in ['system', 'developer'] %}<{{ m.role }}>{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    assert ChatTemplate(source).render(DEVELOPER) == "<developer>Answer in French.Good morning"
    assert (
        ChatTemplate(source.replace(", 'developer'", "")).render(DEVELOPER)
        == "<system>Answer in French.Good morning"
    )


# -- template facts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "supports_tools", "content_format"),
    [
        ("smollm2", False, "string"),
        ("qwen2.5", True, "string"),
        ("llama3.1", True, "string"),
        ("mistral", True, "string"),
        ("qwen2-vl", False, "openai"),
    ],
)
def test_real_template_facts(name, supports_tools, content_format, templates) -> None:
    template = ChatTemplate(templates[name][0])
    assert template.supports_tools is supports_tools
    assert template.content_format == content_format


SYSTEM_AND_PARTS = [{"role": "system", "content": "S"}, *TEXT_PARTS]
PARTS = "First paragraph.Second paragraph."


@pytest.mark.parametrize(
    ("source", "content_format", "expected"),
    [
        (
            "{% for message in messages %}{% for part in message['content'] %}{{ part.text }}{% endfor %}"
            "{% endfor %}",
            "openai",
            PARTS,
        ),
        (
            "{% set loop_messages = messages[1:] %}"
            "{% for m in loop_messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}",
            "openai",
            PARTS,
        ),
        (
            "{% for m in messages %}{% set c = m.content %}{% for p in c %}{{ p.text }}{% endfor %}{% endfor %}",
            "openai",
            PARTS,
        ),
        ("{% for p in messages[-1].content %}{{ p.text }}{% endfor %}", "openai", PARTS),
        (
            "{% for m in messages | selectattr('role', 'equalto', 'user') %}"
            "{% for p in m['content'] | selectattr('type', 'equalto', 'text') %}{{ p.text }}{% endfor %}"
            "{% endfor %}",
            "openai",
            PARTS,
        ),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", "string", "SFirst paragraph.\nSecond paragraph."),
        (
            "{% for m in messages %}{% for c in m.tool_calls %}{{ c.id }}{% endfor %}{{ m.content }}{% endfor %}",
            "string",
            "SFirst paragraph.\nSecond paragraph.",
        ),
        ("{% for m in messages %}{% for ch in m.role %}{{ ch }}{% endfor %}{% endfor %}", "string", "systemuser"),
    ],
    ids=[
        "direct",
        "sliced-alias",
        "content-alias",
        "indexed-message",
        "filtered",
        "plain",
        "tool-calls-loop",
        "other-field-loop",
    ],
)
def test_content_format_detection(source, content_format, expected) -> None:
    template = ChatTemplate(source)
    assert template.content_format == content_format
    rendered = template.render(SYSTEM_AND_PARTS)
    assert rendered == expected
    reference = SYSTEM_AND_PARTS if content_format == "openai" else [SYSTEM_AND_PARTS[0], *TEXT_PARTS_JOINED]
    assert rendered == hf_render(source, {}, reference)


def test_supports_tools_follows_the_tools_variable() -> None:
    assert ChatTemplate("{% if tools %}{{ tools | length }}{% endif %}").supports_tools
    assert not ChatTemplate("{% set tools = [] %}{{ tools }}").supports_tools


# -- tool-call arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "rendered_arguments"),
    [
        ('{"city": "Zürich", "days": 3}', '"arguments": {"city": "Zürich", "days": 3}'),
        ({"city": "Zürich", "days": 3}, '"arguments": {"city": "Zürich", "days": 3}'),
        ("", '"arguments": {}'),
        (None, '"arguments": {}'),
        ("not json {", '"arguments": "not json {"'),
        ("[1, 2]", '"arguments": "[1, 2]"'),
    ],
    ids=["json-string", "dict", "empty-string", "null", "invalid-json-kept", "non-object-kept"],
)
def test_tool_call_arguments(arguments, rendered_arguments, templates) -> None:
    source, special = templates["qwen2.5"]
    messages = [
        *USER_ONLY,
        {
            "role": "assistant",
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}],
        },
    ]
    ours = ChatTemplate(source, special_tokens=special).render(messages)
    assert rendered_arguments in ours
    reference = copy.deepcopy(messages)
    if isinstance(arguments, str) and arguments.startswith("{"):
        reference[1]["tool_calls"][0]["function"]["arguments"] = json.loads(arguments)
    elif arguments in ("", None):
        reference[1]["tool_calls"][0]["function"]["arguments"] = {}
    assert ours == hf_render(source, special, reference)


def test_empty_tool_calls_render_as_a_plain_message(templates) -> None:
    source, special = templates["llama3.1"]
    template = ChatTemplate(source, special_tokens=special)
    with_empty = [*USER_ONLY, {"role": "assistant", "content": "Paris.", "tool_calls": []}]
    plain = [*USER_ONLY, {"role": "assistant", "content": "Paris."}]
    assert template.render(with_empty) == template.render(plain) == hf_render(source, special, plain)


# -- override files and compile-once -----------------------------------------------------------

OVERRIDE = (
    "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.mark.parametrize(
    ("filename", "text"),
    [
        ("override.jinja", OVERRIDE),
        ("chat_template.json", json.dumps({"chat_template": OVERRIDE, "bos_token": "<s>"})),
        (
            "tokenizer_config.json",
            json.dumps(
                {
                    "chat_template": [
                        {"name": "tool_use", "template": "x"},
                        {"name": "default", "template": OVERRIDE},
                    ]
                }
            ),
        ),
        ("override.txt", json.dumps({"chat_template": OVERRIDE})),
    ],
    ids=["jinja", "json-string", "json-named-list", "json-without-suffix"],
)
def test_from_file(tmp_path, filename, text) -> None:
    path = tmp_path / filename
    path.write_text(text, encoding="utf-8")
    template = ChatTemplate.from_file(path, special_tokens={"bos_token": "<s>"})
    assert template.source == OVERRIDE
    rendered = template.render(MULTI_TURN[:2], add_generation_prompt=True)
    assert rendered == "<s><system>You are terse.\n<user>Hi there\n<assistant>"
    assert rendered == hf_render(OVERRIDE, {"bos_token": "<s>"}, MULTI_TURN[:2], add_generation_prompt=True)


@pytest.mark.parametrize(
    ("filename", "text", "message"),
    [
        ("missing.jinja", None, "cannot read"),
        ("bad.json", "{not json", "not valid JSON"),
        ("config.json", json.dumps({"bos_token": "<s>"}), 'no "chat_template"'),
        (
            "config.json",
            json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}),
            'none is named "default"',
        ),
        ("broken.jinja", "{% if %}", "does not compile"),
    ],
    ids=["missing", "invalid-json", "no-key", "no-default", "syntax-error"],
)
def test_from_file_errors(tmp_path, filename, text, message) -> None:
    path = tmp_path / filename
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate.from_file(path)


def test_render_does_not_recompile(monkeypatch, templates) -> None:
    source, special = templates["qwen2.5"]
    template = ChatTemplate(source, special_tokens=special)
    first = template.render(ONE_TOOL_ROUND, tools=[WEATHER_TOOL], add_generation_prompt=True)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a template was compiled on the render path")

    for method in ("parse", "compile", "from_string", "_parse"):
        monkeypatch.setattr(ImmutableSandboxedEnvironment, method, refuse)
    assert template.render(ONE_TOOL_ROUND, tools=[WEATHER_TOOL], add_generation_prompt=True) == first
    assert "<tool_call>" in first
