"""The worker driven from step messages alone, on a fake model whose answer depends on every cached token.

The fake model's "attention" writes each new token id into its layer's KV cache at the slot the
step gives it and reads every sequence's context back through its block table; its next-token
logits pick (sum of the sequence's tokens) mod vocab. So a worker that applied a message wrong (a
lost block diff, a stale table after preemption, a wrong computed count, a prefix hit read from the
wrong blocks) produces other tokens than the pure-Python reference. The scheduler and KV cache are
the real ones; nothing but messages crosses to the runner.
"""

from __future__ import annotations

import pytest
import torch

from heron.config import SchedulerConfig
from heron.engine.errors import RequestFailedError
from heron.engine.kv_cache import KVCache
from heron.engine.messages import GrammarOutput
from heron.engine.request import Request
from heron.engine.scheduler import Scheduler
from heron.outputs import FinishReason
from heron.sampling_params import SamplingParams
from heron.worker.forward_batch import ForwardBatch
from heron.worker.model_runner import ModelRunner

VOCAB = 97
BLOCK_SIZE = 4
POISON = 96  # a prompt holding this token makes the fake model fail on it


class SumModel(torch.nn.Module):
    """Next token = sum of all tokens of the sequence so far, mod VOCAB, read from the KV cache."""

    def __init__(self, fail_on_poison: bool = False):
        super().__init__()
        self.fail_on_poison = fail_on_poison

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        k_cache, _ = batch.kv_caches[0]
        k_cache[batch.slot_mapping, 0, 0] = batch.input_ids.to(k_cache.dtype)
        hidden = []
        bs = batch.block_size
        for query_len, context_len, table in zip(batch.query_lens, batch.context_lens, batch.block_tables):
            for p in range(context_len, context_len + query_len):
                slots = torch.tensor([table[q // bs] * bs + q % bs for q in range(p + 1)])
                tokens = k_cache[slots, 0, 0]
                if self.fail_on_poison and bool((tokens == POISON).any()):
                    raise RuntimeError("injected model failure")
                hidden.append(tokens.sum())
        assert sum(batch.query_lens) == batch.input_ids.shape[0]
        assert len(batch.query_lens) >= batch.num_decodes
        return torch.stack(hidden).unsqueeze(1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        target = hidden[:, 0].round().long() % VOCAB
        return torch.nn.functional.one_hot(target, VOCAB).float() * 50.0


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(sum(tokens) % VOCAB)
    return tokens[len(prompt) :]


def make_runner(model: torch.nn.Module, num_blocks: int) -> ModelRunner:
    return ModelRunner(model, 1, 1, 1, num_blocks, BLOCK_SIZE, torch.float64, torch.device("cpu"), (), VOCAB)


def run(scheduler: Scheduler, runner: ModelRunner, grammar=None) -> dict[str, RequestFailedError]:
    failed = {}
    for _ in range(2000):
        if not scheduler.has_unfinished():
            return failed
        out = scheduler.schedule()
        runner.execute_model(out)
        result = runner.sample_tokens(grammar(out) if grammar else None)
        for request_id, error in result.failed.items():
            failed[request_id] = error
            scheduler.finish_request(scheduler.requests[request_id], FinishReason.ABORT)
        scheduler.update(out, result)
    raise AssertionError("did not finish")


def request(request_id: str, prompt: list[int], max_tokens: int, **kw) -> Request:
    return Request(request_id, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw))


def test_outputs_match_the_reference_through_chunking_prefix_hits_and_preemption():
    # 12 blocks of 4 tokens for 5 requests of up to 30 tokens each: chunked prefills, shared
    # prefixes (the prefix cache hands later requests blocks written by earlier ones) and preemptions.
    kv = KVCache(num_blocks=12, block_size=BLOCK_SIZE)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=10), kv, max_model_len=64)
    runner = make_runner(SumModel(), kv.num_blocks)
    shared = [5, 9, 11, 3, 8, 1, 4, 7]
    prompts = {
        "a": shared + [2, 6],
        "b": shared + [10, 12, 13],
        "c": [20 + i for i in range(13)],
        "d": shared + [2, 6],
        "e": [1, 2],
    }
    requests = {rid: request(rid, p, max_tokens=14) for rid, p in prompts.items()}
    for r in requests.values():
        scheduler.add_request(r)
    assert run(scheduler, runner) == {}
    assert scheduler.num_preemptions > 0 and kv.prefix_cache_hits > 0
    for rid, r in requests.items():
        assert r.output_token_ids == reference(prompts[rid], 14), rid
    # The worker dropped every finished request's state by the end (the last ones with the next step).
    scheduler.add_request(request("z", [3], max_tokens=1))
    run(scheduler, runner)
    assert set(runner.input_batch.states) <= {"z"}


def test_a_request_that_breaks_the_forward_pass_fails_alone():
    kv = KVCache(num_blocks=64, block_size=BLOCK_SIZE)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, max_model_len=64)
    runner = make_runner(SumModel(fail_on_poison=True), kv.num_blocks)
    good = request("good", [4, 5, 6], max_tokens=6)
    bad = request("bad", [1, POISON, 2], max_tokens=6)
    scheduler.add_request(good)
    scheduler.add_request(bad)
    failed = run(scheduler, runner)
    assert set(failed) == {"bad"} and failed["bad"].status == 500 and "RuntimeError" in failed["bad"].message
    assert good.output_token_ids == reference([4, 5, 6], 6)
    assert bad.output_token_ids == []


def test_grammar_masks_arrive_as_a_packed_bitmask():
    """Only token 3 allowed for "masked": the mask beats the fake model's certain answer."""
    kv = KVCache(num_blocks=64, block_size=BLOCK_SIZE)
    scheduler = Scheduler(SchedulerConfig(), kv, max_model_len=64)
    runner = make_runner(SumModel(), kv.num_blocks)
    masked, free = request("masked", [4, 5], max_tokens=3), request("free", [4, 5], max_tokens=3)
    scheduler.add_request(masked)
    scheduler.add_request(free)
    words = (VOCAB + 31) // 32
    only_three = torch.zeros(1, words, dtype=torch.int32)
    only_three[0, 0] = 1 << 3

    def grammar(out):
        return GrammarOutput(["masked"], only_three) if "masked" in out.num_scheduled_tokens else None

    assert run(scheduler, runner, grammar) == {}
    assert masked.output_token_ids == [3, 3, 3]
    assert free.output_token_ids == reference([4, 5], 3)


def test_a_mask_allowing_nothing_fails_its_request_closed():
    kv = KVCache(num_blocks=64, block_size=BLOCK_SIZE)
    scheduler = Scheduler(SchedulerConfig(), kv, max_model_len=64)
    runner = make_runner(SumModel(), kv.num_blocks)
    scheduler.add_request(request("masked", [4, 5], max_tokens=3))
    scheduler.add_request(free := request("free", [7], max_tokens=3))
    nothing = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    failed = run(scheduler, runner, lambda out: GrammarOutput(["masked"], nothing) if "masked" in out.num_scheduled_tokens else None)
    assert set(failed) == {"masked"} and failed["masked"].code == "grammar_failed"
    assert free.output_token_ids == reference([7], 3)


def test_sample_tokens_needs_a_step():
    runner = make_runner(SumModel(), 4)
    with pytest.raises(RuntimeError, match="execute_model"):
        runner.sample_tokens(None)
