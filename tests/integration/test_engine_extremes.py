"""Property: no SamplingParams, however extreme, hurts the engine or the requests beside it.

Hypothesis draws every field from values at and past the edges of what the engine holds (int32 and
int64 limits, NaN, infinities, huge logit_bias dicts, token ids past the vocabulary). Each example
must be refused with a ValueError (by SamplingParams or EngineCore.add_request) or run to
completion without error, while a fixed greedy bystander in the same steps keeps its reference
tokens and the engine never raises. Lengths are kept at four tokens or fewer so that fifty examples
take well under a minute on two cores.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from heron.engine.core import EngineCore
from heron.models.loader import load_model
from heron.outputs import RequestOutput
from heron.sampling_params import MAX_INT32, MAX_N, MAX_SEED, MIN_SEED, SamplingParams
from tests.integration.test_engine import make_core

VOCAB = 49152  # the bundled model's; checked against the loaded model below
BYSTANDER = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

EDGE_INTS = [MIN_SEED - 1, MIN_SEED, -(2**31), -2, -1, 0, 1, 2, 3, 4, MAX_INT32, MAX_INT32 + 1, MAX_SEED, MAX_SEED + 1, 2**64, 10**30]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1e-5, 0.3, 1.0, 1.5, 2.0, 100.0, 1e38, 3.4e38, 1e39, 1e308, -1.0, -1e308]
TOKEN_IDS = st.one_of(st.sampled_from([-1, 0, VOCAB - 1, VOCAB, VOCAB + 1, MAX_INT32, MAX_INT32 + 1, 2**63]), st.integers(0, VOCAB - 1))

edge_ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-5, 5))
edge_floats = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=True, allow_infinity=True))
token_ids_in_vocab = st.one_of(st.sampled_from([0, VOCAB - 1]), st.integers(0, VOCAB - 1))
# A big dict of in-range ids, the kind a client builds to ban a whole class of tokens.
big_bias = st.integers(0, VOCAB - 2000).map(lambda start: {t: -100.0 for t in range(start, start + 2000)})

# Values at the edges of what is valid, so that most examples reach the engine; counts that make it
# run (n, max_tokens) stay tiny.
VALID = {
    "n": st.sampled_from([1, 2, 3]),
    "temperature": st.sampled_from([0.0, 5e-324, 1e-5, 0.3, 1.0, 2.0, 100.0, 3.4e38]),
    "top_p": st.sampled_from([5e-324, 1e-5, 0.3, 1.0]),
    "top_k": st.sampled_from([-1, 0, 1, 2, VOCAB - 1, VOCAB, VOCAB + 1, MAX_INT32]),
    "min_p": st.sampled_from([0.0, 5e-324, 0.3, 1.0]),
    "presence_penalty": st.sampled_from([-2.0, -0.0, 1.5, 2.0]),
    "frequency_penalty": st.sampled_from([-2.0, 0.0, 1.5, 2.0]),
    "repetition_penalty": st.sampled_from([1e-4, 0.5, 1.0, 1.5, 1e4]),
    "logit_bias": st.one_of(
        st.none(), st.dictionaries(token_ids_in_vocab, st.sampled_from([-100.0, -1e-30, 0.0, 100.0]), max_size=4), big_bias
    ),
    "seed": st.sampled_from([None, MIN_SEED, -1, 0, MAX_SEED]),
    "max_tokens": st.sampled_from([1, 2, 4]),
    "min_tokens": st.sampled_from([0, 1, 4]),
    "stop": st.lists(st.sampled_from([".", " the", "\n", "\x00", "\ufffd"]), max_size=3),
    "stop_token_ids": st.lists(token_ids_in_vocab, max_size=3),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "logprobs": st.sampled_from([None, 0, 1, 20]),
    "prompt_logprobs": st.sampled_from([None, 0, 5, 20]),
}
# Anything of the field's type, mostly past its bounds (counts that would run long stay refused).
WILD = {
    **{f: edge_floats for f in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")},
    "n": st.sampled_from([-(2**63), -1, 0, MAX_N + 1, MAX_INT32 + 1, 2**63]),
    "top_k": edge_ints,
    "logit_bias": st.dictionaries(TOKEN_IDS, edge_floats, min_size=1, max_size=4),
    "seed": edge_ints,
    "max_tokens": st.sampled_from([-(2**63), -1, 0, MAX_INT32 + 1, 2**63]),
    "min_tokens": st.sampled_from([-(2**63), -1, 5, MAX_INT32, MAX_INT32 + 1, 2**63]),
    "stop": st.lists(st.text(max_size=3), max_size=3),
    "stop_token_ids": st.lists(TOKEN_IDS, min_size=1, max_size=3),
    "logprobs": st.sampled_from([-1, 21, 2**63]),
    "prompt_logprobs": st.sampled_from([-1, 21, 2**63]),
}


# Examples that always run, whatever hypothesis draws: ids just past the vocabulary (refused by
# add_request, which alone knows it), and the int64 seed edges with n > 1 and an unclamped top_k.
BASE = dict(
    n=1, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
    repetition_penalty=1.0, logit_bias=None, seed=None, max_tokens=2, min_tokens=0, stop=[], stop_token_ids=[],
    ignore_eos=False, include_stop_str_in_output=False, skip_special_tokens=True, logprobs=None, prompt_logprobs=None,
)
EXAMPLES = [
    {**BASE, "stop_token_ids": [VOCAB]},
    {**BASE, "logit_bias": {VOCAB + 1: 1.0}},
    {**BASE, "n": 3, "temperature": 1.0, "seed": MAX_SEED, "top_k": MAX_INT32},
    {**BASE, "n": 3, "temperature": 1.0, "seed": MIN_SEED, "top_p": 5e-324, "min_p": 1.0},
]


@st.composite
def sampling_fields(draw) -> dict:
    """Every field at a valid edge, except up to two drawn from anywhere."""
    wild = draw(st.sets(st.sampled_from(sorted(WILD)), max_size=2))
    return {name: draw(WILD[name] if name in wild else valid) for name, valid in VALID.items()}


@pytest.fixture(scope="module")
def core() -> EngineCore:
    loaded = load_model(None, dtype="float32", progress=False)
    assert loaded.arch_config.vocab_size == VOCAB
    return make_core(loaded, num_blocks=64)


@pytest.fixture(scope="module")
def prompt(core) -> list[int]:
    return core.tokenizer.encode("The capital of France is", add_special_tokens=True)


def step_until_idle(core: EngineCore) -> dict[str, RequestOutput]:
    finished: dict[str, RequestOutput] = {}
    for _ in range(100):
        if not core.has_unfinished():
            return finished
        for output in core.step():  # raising here is the engine dying: the property fails
            if output.finished:
                finished[output.request_id] = output
    pytest.fail("the engine did not go idle within 100 steps")


@pytest.fixture(scope="module")
def reference(core, prompt) -> list[int]:
    core.add_request("reference", prompt, BYSTANDER)
    return step_until_idle(core)["reference"].outputs[0].token_ids


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=sampling_fields())
@example(fields=EXAMPLES[0])
@example(fields=EXAMPLES[1])
@example(fields=EXAMPLES[2])
@example(fields=EXAMPLES[3])
def test_any_sampling_params_are_refused_or_run_beside_an_unharmed_bystander(core, prompt, reference, fields):
    try:
        params = SamplingParams(**fields)
    except ValueError:
        event("refused by SamplingParams")
        return
    core.add_request("bystander", prompt, BYSTANDER)
    try:
        core.add_request("example", prompt, params)
        expected = {"bystander", "example"}
    except ValueError:
        event("refused by add_request")
        expected = {"bystander"}
    finished = step_until_idle(core)
    assert set(finished) == expected
    assert finished["bystander"].error is None
    assert finished["bystander"].outputs[0].token_ids == reference
    if "example" in finished:
        event("ran")
        example = finished["example"]
        assert example.error is None, f"valid params failed in the engine: {example.error!r}"
        assert len(example.outputs) == params.n
        assert all(1 <= len(c.token_ids) <= params.max_tokens for c in example.outputs)
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_blocks
