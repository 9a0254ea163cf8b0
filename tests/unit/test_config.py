"""Config defaults: one step token budget per device for every entry point, and bad limits refused."""

from __future__ import annotations

import argparse

import pytest
import torch

from heron.cli import build_parser
from heron.config import DEFAULT_MAX_NUM_SEQS, SchedulerConfig, default_max_num_batched_tokens
from heron.server.settings import parse_args


@pytest.mark.parametrize(
    ("device", "budget"),
    [("cpu", 256), (torch.device("cpu"), 256), ("cuda", 2048), ("cuda:1", 2048), (torch.device("cuda", 0), 2048)],
)
def test_the_step_budget_default_follows_the_device(device, budget):
    assert default_max_num_batched_tokens(device) == budget
    assert SchedulerConfig.for_device(device) == SchedulerConfig(DEFAULT_MAX_NUM_SEQS, budget)


def test_given_limits_beat_the_device_defaults():
    config = SchedulerConfig.for_device("cuda", max_num_seqs=8, max_num_batched_tokens=100)
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (8, 100)
    # A bare config is the CPU's defaults (what EngineCore takes when given none).
    assert SchedulerConfig() == SchedulerConfig.for_device("cpu")


def test_an_unknown_device_has_no_default():
    with pytest.raises(ValueError, match="no default step token budget for device 'mps'"):
        default_max_num_batched_tokens("mps")


@pytest.mark.parametrize("kwargs", [{"max_num_seqs": 0}, {"max_num_batched_tokens": -5}, {"max_num_seqs": 2.5}])
def test_limits_must_be_positive_integers(kwargs):
    with pytest.raises(ValueError, match="must be a positive integer"):
        SchedulerConfig(**kwargs)


def test_every_entry_point_leaves_the_budget_to_the_device():
    # heron serve and heron generate / chat pass None through; LLM and the registry ask for_device.
    assert parse_args([], environ={}).max_num_batched_tokens is None
    assert parse_args([], environ={}).max_num_seqs == DEFAULT_MAX_NUM_SEQS
    for command in ("generate", "chat"):
        args = build_parser().parse_args([command])
        assert isinstance(args, argparse.Namespace)
        assert args.max_num_batched_tokens is None and args.max_num_seqs == DEFAULT_MAX_NUM_SEQS
