"""Grammar-constrained decoding in the engine, on the bundled SmolLM2-135M (fp32 on CPU).

The output must match its constraint for every form (JSON Schema, json_object, regex, choice,
Lark, GBNF), sampled or greedy, one sample or several, through preemption; and a constrained
request must not change what the unconstrained requests batched with it generate. GrammarCompiler
and GrammarBitmask are checked directly against llguidance's own single-matcher mask.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import torch

from heron.models.chat_template import ChatTemplate
from heron.models.loader import LoadedModel, load_model
from heron.outputs import FinishReason
from heron.sampling_params import SamplingParams, StructuredOutputsParams
from heron.server.registry import serve_generation
from heron.server.settings import ServerSettings
from heron.structured import GrammarCompiler, GrammarError
from heron.structured.bitmask import GrammarBitmask
from heron.worker.sampler import unpack_bitmask
from tests.integration.test_engine import make_core, run

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3},
        "role": {"enum": ["student", "teacher", "engineer"]},
    },
    "required": ["name", "age", "hobbies", "role"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(None, progress=False)


@pytest.fixture(scope="module")
def core(loaded):
    return make_core(loaded, num_blocks=128)


@pytest.fixture(scope="module")
def chat(loaded):
    template = ChatTemplate(loaded.chat_template, special_tokens=loaded.tokenizer.special_tokens)

    def encode(question: str) -> list[int]:
        text = template.render([{"role": "user", "content": question}], add_generation_prompt=True)
        return loaded.tokenizer.encode(text, add_special_tokens=False)

    return encode


def generate(core, requests: dict[str, tuple[list[int], SamplingParams]]):
    outputs = run(core, requests)
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_blocks
    return outputs


def test_json_schema_greedy_and_sampled(core, chat):
    prompt = chat("Describe a student named Alice who is 20 years old, as JSON.")
    spec = StructuredOutputsParams(json=PERSON)
    outputs = generate(
        core,
        {
            "greedy": (prompt, SamplingParams(temperature=0, max_tokens=120, structured_outputs=spec)),
            "sampled": (prompt, SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=120, structured_outputs=spec)),
        },
    )
    completions = [c for out in outputs.values() for c in out.outputs]
    assert len(completions) == 4
    for completion in completions:
        assert completion.finish_reason == FinishReason.STOP, completion.text
        jsonschema.validate(json.loads(completion.text), PERSON)


def test_every_form_matches(core, chat):
    prompt = chat("When did the first person walk on the moon?")
    forms = {
        "regex": StructuredOutputsParams(regex=r"\d{4}-\d{2}-\d{2}"),
        "choice": StructuredOutputsParams(choice=["1969", "1970", "never"]),
        "lark": StructuredOutputsParams(grammar='start: "In " YEAR "."\nYEAR: /[12][0-9]{3}/'),
        "gbnf": StructuredOutputsParams(grammar='root ::= "year " [0-9] [0-9] [0-9] [0-9]'),
    }
    requests = {name: (prompt, SamplingParams(temperature=0, max_tokens=60, structured_outputs=s)) for name, s in forms.items()}
    # Any JSON object: a prompt after which the model closes its object well within the budget.
    requests["json_object"] = (
        chat('Return {"answer": ...} for: what is 2 + 2?'),
        SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json_object=True)),
    )
    outputs = generate(core, requests)
    text = {name: out.outputs[0].text for name, out in outputs.items()}
    assert isinstance(json.loads(text["json_object"]), dict)
    # ASCII digits: Rust's Unicode \d would also take e.g. U+1FBF8.
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text["regex"]), text["regex"]
    assert text["choice"] in {"1969", "1970", "never"}
    assert re.fullmatch(r"In [12][0-9]{3}\.", text["lark"]), text["lark"]
    assert re.fullmatch(r"year [0-9]{4}", text["gbnf"]), text["gbnf"]
    assert all(out.outputs[0].finish_reason == FinishReason.STOP for out in outputs.values())


def test_constrained_request_leaves_its_batch_alone(loaded, chat):
    prompts = [chat(q) for q in ("Name three colours.", "What is 2 + 2?", "Say hello in French.")]
    plain = SamplingParams(temperature=0, max_tokens=24)
    alone = generate(make_core(loaded, num_blocks=64), {f"p{i}": (p, plain) for i, p in enumerate(prompts)})
    mixed = {f"p{i}": (p, plain) for i, p in enumerate(prompts)}
    mixed["constrained"] = (prompts[0], SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(regex="[a-z ]+")))
    together = generate(make_core(loaded, num_blocks=64), mixed)
    for rid in alone:
        assert together[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids
    assert re.fullmatch("[a-z ]+", together["constrained"].outputs[0].text)


def test_preemption_keeps_the_grammar_state(loaded, chat):
    # A KV budget too small for all four at once forces preemption and recompute mid-object.
    prompt = chat("Describe a teacher named Bob who is 41, as JSON.")
    spec = StructuredOutputsParams(json=PERSON)
    requests = {f"r{i}": (prompt, SamplingParams(temperature=0.7, seed=i, max_tokens=90, structured_outputs=spec)) for i in range(4)}
    roomy = generate(make_core(loaded, num_blocks=64, prefix_caching=False), requests)
    tight_core = make_core(loaded, num_blocks=12, prefix_caching=False)
    preempted: list[int] = []
    preempt = tight_core.scheduler._preempt

    def spy(request):
        preempted.append(request.num_output_tokens)
        preempt(request)

    tight_core.scheduler._preempt = spy
    tight = generate(tight_core, requests)
    assert any(n > 1 for n in preempted), preempted  # preempted mid-output, with grammar state
    for rid in requests:
        assert tight[rid].outputs[0].token_ids == roomy[rid].outputs[0].token_ids
        jsonschema.validate(json.loads(tight[rid].outputs[0].text), PERSON)


def test_grammar_end_wins_over_min_tokens(core, chat):
    prompt = chat("Is water wet?")
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=5, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    out = generate(core, {"q": (prompt, params)})["q"].outputs[0]
    assert out.text in {"yes", "no"}
    assert out.finish_reason == FinishReason.STOP


def test_max_tokens_cuts_a_constrained_output(core, chat):
    prompt = chat("Describe a student named Alice who is 20 years old, as JSON.")
    params = SamplingParams(temperature=0, max_tokens=4, structured_outputs=StructuredOutputsParams(json=PERSON))
    out = generate(core, {"q": (prompt, params)})["q"].outputs[0]
    assert out.finish_reason == FinishReason.LENGTH
    assert len(out.token_ids) == 4
    assert out.text.startswith("{")


# -- the compiler and the masks -----------------------------------------------------------


@pytest.fixture(scope="module")
def compiler(loaded) -> GrammarCompiler:
    return GrammarCompiler(loaded.tokenizer, loaded.arch_config.vocab_size, loaded.eos_token_ids)


@pytest.mark.parametrize(
    "spec, message",
    [
        (StructuredOutputsParams(json={"type": "objekt"}), "Invalid type"),
        (StructuredOutputsParams(json={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (StructuredOutputsParams(json="{not json"), "not valid JSON"),
        (StructuredOutputsParams(json="[1, 2]"), "must be a JSON object"),
        (StructuredOutputsParams(regex="(?=a)b"), "look-around"),
        (StructuredOutputsParams(grammar="start: missing_rule"), "missing_rule"),
    ],
)
def test_compiler_refuses_with_a_reason(compiler, spec, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        compiler.compile(spec)


def test_a_served_model_builds_its_grammar_vocabulary_at_start_up(loaded):
    # Built by the first compile instead, it held the GIL ~0.4 s: every stream stalled that long.
    assert not GrammarCompiler(loaded.tokenizer, loaded.arch_config.vocab_size, loaded.eos_token_ids).prepared
    served = serve_generation(loaded, [], ServerSettings())
    try:
        assert served.engine.core.grammar_compiler.prepared
    finally:
        asyncio.run(served.engine.shutdown())


def test_compiler_lenient_json_ignores_unsupported_keywords(compiler):
    compiled = compiler.compile(StructuredOutputsParams(json={"type": "array", "uniqueItems": True}, strict=False))
    assert not compiled.matcher().is_error()


def test_compiler_caches_by_spec(compiler):
    a = compiler.compile(StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "integer"}}}))
    again = compiler.compile(StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "integer"}}}))
    b = compiler.compile(StructuredOutputsParams(json='{"type": "object", "properties": {"x": {"type": "integer"}}}'))
    assert again is a  # an equal schema, another dict
    assert b is not a  # JSON text is keyed as text
    assert a.matcher() is not a.matcher()  # every sequence gets its own state


def test_property_order_is_the_schemas_own_cached_or_not(core, chat):
    # The output writes properties in the schema's order (as OpenAI's structured outputs do), so
    # the cache must not take {beta, alpha} for the {alpha, beta} compiled before it.
    prompt = chat("Give two small numbers as JSON.")

    def schema(order: list[str]) -> dict:
        return {
            "type": "object",
            "properties": {name: {"type": "integer", "minimum": 0, "maximum": 9} for name in order},
            "required": ["alpha", "beta"],
            "additionalProperties": False,
        }

    for order in (["alpha", "beta"], ["beta", "alpha"]):
        params = SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(json=schema(order)))
        text = generate(core, {"r": (prompt, params)})["r"].outputs[0].text
        assert list(json.loads(text)) == order, text


def test_bitmask_matches_llguidance_per_token(loaded, compiler):
    tokenizer = loaded.tokenizer
    compiled = compiler.compile(StructuredOutputsParams(json=PERSON))
    walk = tokenizer.encode('{"name": "Zoë", "age": 7, "hobbies": ["chess"], "role": "student"}', add_special_tokens=False)
    masks = GrammarBitmask(compiler.vocab_size)
    batch = [compiled.matcher(), compiled.matcher()]
    for token in walk:
        rows = unpack_bitmask(masks.wait(masks.start(batch)), compiler.vocab_size)
        reference = torch.frombuffer(bytearray(batch[0].compute_bitmask()), dtype=torch.uint8)
        want = ((reference.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).bool().flatten()[: compiler.vocab_size]
        assert torch.equal(rows[0], want) and torch.equal(rows[1], want)
        assert rows[0][token], tokenizer.decode([token])
        for matcher in batch:
            assert matcher.consume_token(token)
    final = unpack_bitmask(masks.wait(masks.start(batch)), compiler.vocab_size)[0]
    assert final.nonzero().flatten().tolist() == list(loaded.eos_token_ids)
    masks.close()

