"""SamplingParams validation: every number the engine turns into a tensor, a generator seed or a
loop bound is refused with a ValueError (the server's 400) unless it is finite and in range."""

from __future__ import annotations

import math

import pytest
import torch

from heron.sampling_params import MAX_INT32, MAX_N, MAX_SEED, MIN_SEED, SamplingParams

NAN, INF = math.nan, math.inf

REFUSED = [
    # (field values, words the message must contain)
    (dict(temperature=NAN), "temperature"),
    (dict(temperature=INF), "temperature"),
    (dict(temperature=-INF), "temperature"),
    (dict(temperature=1e39), "temperature"),  # finite in Python, inf in float32
    (dict(temperature=10**400), "temperature"),  # no float holds it
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=NAN), "top_p"),
    (dict(top_p=INF), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(min_p=NAN), "min_p"),
    (dict(min_p=-INF), "min_p"),
    (dict(presence_penalty=NAN), "presence_penalty"),
    (dict(presence_penalty=INF), "presence_penalty"),
    (dict(frequency_penalty=NAN), "frequency_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(repetition_penalty=NAN), "repetition_penalty"),
    (dict(repetition_penalty=INF), "repetition_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=1.01e4), "repetition_penalty"),
    (dict(repetition_penalty=5e-324), "repetition_penalty"),  # 0 in float32: a division by zero
    (dict(repetition_penalty=9e-5), "repetition_penalty"),
    (dict(top_k=2**63), "top_k"),
    (dict(top_k=10**30), "top_k"),
    (dict(top_k=MAX_INT32 + 1), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=-(2**63)), "top_k"),
    (dict(n=0), "n must"),
    (dict(n=MAX_N + 1), "n must"),
    (dict(n=2**63), "n must"),
    (dict(seed=MAX_SEED + 1), "seed"),
    (dict(seed=MIN_SEED - 1), "seed"),
    (dict(seed=10**30), "seed"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2**63), "max_tokens"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=2**63, max_tokens=None), "min_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=2**63), "prompt_logprobs"),
    (dict(logit_bias={2**63: 1.0}), "logit_bias keys"),
    (dict(logit_bias={MAX_INT32 + 1: 1.0}), "logit_bias keys"),
    (dict(logit_bias={-1: 1.0}), "logit_bias keys"),
    (dict(logit_bias={"5": 1.0}), "logit_bias keys"),
    (dict(logit_bias={5: NAN}), "logit_bias values"),
    (dict(logit_bias={5: INF}), "logit_bias values"),
    (dict(logit_bias={5: -101.0}), "logit_bias values"),
    (dict(logit_bias={5: 10**30}), "logit_bias values"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[2**63]), "stop_token_ids"),
    (dict(stop_token_ids=[1, 10**30]), "stop_token_ids"),
]


@pytest.mark.parametrize("fields, words", REFUSED, ids=[repr(f) for f, _ in REFUSED])
def test_out_of_range_values_are_refused_with_a_message_naming_the_field(fields, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**fields)


ACCEPTED = [
    dict(top_k=-1),
    dict(top_k=MAX_INT32),  # larger than any vocabulary: the sampler clamps it
    dict(temperature=0.0),
    dict(temperature=1e30),
    dict(n=MAX_N),
    dict(seed=MIN_SEED),
    dict(seed=MAX_SEED, n=4),
    dict(max_tokens=MAX_INT32, min_tokens=MAX_INT32),
    dict(max_tokens=None),
    dict(repetition_penalty=1e4),
    dict(repetition_penalty=1e-4),
    dict(logit_bias={0: -100.0, MAX_INT32: 100.0}),
    dict(stop_token_ids=[0, MAX_INT32]),
    dict(logprobs=0, prompt_logprobs=20),
]


@pytest.mark.parametrize("fields", ACCEPTED, ids=repr)
def test_values_at_the_edges_are_accepted(fields):
    SamplingParams(**fields)


def test_a_huge_integer_is_described_not_spelled_out():
    with pytest.raises(ValueError) as info:
        SamplingParams(top_k=10**4000)
    assert len(str(info.value)) < 200 and "bits" in str(info.value)


@pytest.mark.parametrize("seed", [MIN_SEED, -1, 0, MAX_SEED])
def test_every_child_seed_of_a_valid_seed_seeds_a_torch_generator(seed):
    params = SamplingParams(seed=seed, n=MAX_N)
    seeds = [params.child_seed(i) for i in range(params.n)]
    assert len(set(seeds)) == MAX_N  # the samples draw from different streams
    for child in (seeds[0], seeds[-1]):
        torch.Generator().manual_seed(child)  # raises RuntimeError when out of its range


def test_unseeded_samples_have_no_seed():
    assert SamplingParams(n=3).child_seed(2) is None
