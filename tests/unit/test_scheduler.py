"""Scheduler unit tests on CPU with no model: a fake runner samples a fixed token each step.

They pin the token-count scheduling model: decodes and prefill chunks share a step under the
token budget, sequence slots cap admission, prefix hits skip computed tokens, and running out of
KV blocks preempts the newest request, which later recomputes and finishes like the others.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from heron.config import SchedulerConfig
from heron.engine.errors import RequestFailedError
from heron.engine.kv_cache import KVCache
from heron.engine.request import Request, RequestStatus
from heron.engine.scheduler import Scheduler
from heron.outputs import FinishReason
from heron.sampling_params import SamplingParams
from heron.engine.messages import ModelRunnerOutput, SchedulerOutput

EOS = 0


def make_request(request_id: str, num_prompt: int, max_tokens: int = 4, first_token: int = 1, **kw) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    prompt = [first_token + i % 50 for i in range(num_prompt)]
    return Request(request_id, prompt, params, eos_token_ids=(EOS,))


def fake_run(scheduler: Scheduler, out: SchedulerOutput, token: int = 7) -> ModelRunnerOutput:
    """Sample `token` for every request whose step reaches the end of its known tokens."""
    result = ModelRunnerOutput()
    for request_id, num_tokens in out.num_scheduled_tokens.items():
        request = scheduler.requests[request_id]
        if request.num_computed_tokens + num_tokens == request.num_tokens:
            result.sampled_token_ids[request_id] = token
    return result


def run_to_end(scheduler: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    steps = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return steps
        out = scheduler.schedule()
        steps.append(out)
        scheduler.update(out, fake_run(scheduler, out))
    raise AssertionError("scheduler did not finish")


def test_prefill_is_chunked_under_the_token_budget():
    kv = KVCache(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), kv, max_model_len=256)
    request = make_request("a", num_prompt=25)
    scheduler.add_request(request)
    chunks = []
    while request.num_output_tokens == 0:
        out = scheduler.schedule()
        chunks.append(out.total_num_scheduled_tokens)
        scheduler.update(out, fake_run(scheduler, out))
    assert chunks == [10, 10, 5]
    assert request.num_computed_tokens == 25


def test_decodes_and_prefill_chunks_share_a_step():
    kv = KVCache(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16), kv, max_model_len=256)
    first = make_request("a", num_prompt=6, max_tokens=10)
    scheduler.add_request(first)
    out = scheduler.schedule()
    scheduler.update(out, fake_run(scheduler, out))
    scheduler.add_request(make_request("b", num_prompt=40))
    out = scheduler.schedule()
    tokens = out.num_scheduled_tokens
    assert tokens == {"a": 1, "b": 15}  # a's decode first, b's chunk fills the rest of the budget


def test_max_num_seqs_caps_running_requests():
    kv = KVCache(num_blocks=256, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=1000), kv, max_model_len=256)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", num_prompt=5))
    out = scheduler.schedule()
    assert len(out.num_scheduled_tokens) == 3
    assert scheduler.num_running == 3 and scheduler.num_waiting == 2
    run_to_end(scheduler)
    assert kv.num_free_blocks == kv.num_blocks


def test_finish_reasons_eos_stop_token_and_length():
    kv = KVCache(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), kv, max_model_len=256)
    by_length = make_request("len", num_prompt=3, max_tokens=2)
    by_eos = make_request("eos", num_prompt=3, max_tokens=5)
    by_stop = make_request("stop", num_prompt=3, max_tokens=5, stop_token_ids=[9])
    ignoring = make_request("ign", num_prompt=3, max_tokens=3, ignore_eos=True)
    for r in (by_length, by_eos, by_stop, ignoring):
        scheduler.add_request(r)
    out = scheduler.schedule()
    result = fake_run(scheduler, out)
    result.sampled_token_ids.update({"eos": EOS, "stop": 9, "ign": EOS})
    scheduler.update(out, result)
    # EOS is the model ending its answer, not a caller-given stop: no stop_reason, as in vLLM.
    assert by_eos.finish_reason == FinishReason.STOP and by_eos.stop_reason is None
    assert by_stop.finish_reason == FinishReason.STOP and by_stop.stop_reason == 9
    assert not ignoring.is_finished
    run_to_end(scheduler)
    assert by_length.finish_reason == FinishReason.LENGTH and by_length.num_output_tokens == 2
    assert ignoring.finish_reason == FinishReason.LENGTH and ignoring.num_output_tokens == 3


def test_min_tokens_defers_eos():
    kv = KVCache(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), kv, max_model_len=256)
    request = make_request("a", num_prompt=3, max_tokens=8, min_tokens=3)
    scheduler.add_request(request)
    for _ in range(3):
        out = scheduler.schedule()
        scheduler.update(out, fake_run(scheduler, out, token=EOS))
    # The first two EOS samples come before min_tokens and do not end the request.
    assert request.finish_reason == FinishReason.STOP
    assert request.num_output_tokens == 3


def test_context_length_ends_a_request():
    kv = KVCache(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), kv, max_model_len=12)
    request = make_request("a", num_prompt=10, max_tokens=100)
    scheduler.add_request(request)
    run_to_end(scheduler)
    assert request.finish_reason == FinishReason.LENGTH
    assert request.num_tokens == 12


def test_prompts_that_cannot_run_are_rejected():
    scheduler = Scheduler(SchedulerConfig(), KVCache(num_blocks=8, block_size=4), max_model_len=16)
    with pytest.raises(ValueError, match="at least one token"):
        scheduler.add_request(make_request("empty", num_prompt=0))
    with pytest.raises(ValueError, match="context length is 16"):
        scheduler.add_request(make_request("long", num_prompt=16))


def test_prefix_hits_skip_computed_tokens():
    kv = KVCache(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=100), kv, max_model_len=256)
    first = make_request("a", num_prompt=18)
    scheduler.add_request(first)
    run_to_end(scheduler)
    second = make_request("b", num_prompt=18)  # same prompt tokens
    scheduler.add_request(second)
    out = scheduler.schedule()
    # 4 full blocks (16 tokens) are reused; only the last 2 prompt tokens are computed.
    assert out.num_scheduled_tokens == {"b": 2}
    assert second.num_cached_tokens == 16
    assert kv.prefix_cache_hits >= 16


def test_preemption_recomputes_the_newest_request_and_everyone_finishes():
    # 10 blocks of 4 tokens: three 10-token prompts fit, but not with 12 decode tokens each.
    kv = KVCache(num_blocks=10, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), kv, max_model_len=64)
    requests = [make_request(f"r{i}", num_prompt=10, max_tokens=12, first_token=100 * (i + 1)) for i in range(3)]
    for r in requests:
        scheduler.add_request(r)
    preempted_ids = set()
    for _ in range(500):
        if not scheduler.has_unfinished():
            break
        out = scheduler.schedule()
        preempted_ids |= {r.request_id for r in scheduler.waiting if r.num_preemptions}
        # The KV cache never holds more than its budget.
        assert kv.num_free_blocks >= 0
        assert sum(len(kv.get_block_ids(r.request_id)) for r in requests) <= kv.num_blocks
        scheduler.update(out, fake_run(scheduler, out))
    assert scheduler.num_preemptions > 0
    assert "r2" in preempted_ids and "r0" not in preempted_ids  # the newest is the victim
    for r in requests:
        assert r.finish_reason == FinishReason.LENGTH
        assert r.output_token_ids == [7] * 12
    assert kv.num_free_blocks == kv.num_blocks


def test_finish_request_frees_blocks_at_once_in_any_state():
    kv = KVCache(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1), kv, max_model_len=256)
    running = make_request("run", num_prompt=9)
    waiting = make_request("wait", num_prompt=9)
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    scheduler.schedule()
    assert running.status == RequestStatus.RUNNING and waiting.status == RequestStatus.WAITING
    scheduler.finish_request(running, FinishReason.ABORT)
    scheduler.finish_request(waiting, FinishReason.ABORT)
    assert not scheduler.has_unfinished()
    assert kv.usage == 0.0


# -- the step messages -------------------------------------------------------------------------


class MirrorWorker:
    """What a worker knows, rebuilt from the messages alone: each request's block table and computed
    count. Checked against the scheduler's own view after every step."""

    def __init__(self):
        self.tables: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def apply(self, out: SchedulerOutput) -> None:
        for request_id in out.finished_request_ids:
            assert request_id in self.tables, f"{request_id} finished without ever being sent"
            del self.tables[request_id], self.computed[request_id]
        for new in out.new_requests:
            assert new.request_id not in self.tables, f"{new.request_id} sent in full twice"
            self.tables[new.request_id] = list(new.block_ids)
            self.computed[new.request_id] = new.num_computed_tokens
        for diff in out.cached_requests:
            if diff.resumed:
                self.tables[diff.request_id] = list(diff.new_block_ids)
            else:
                self.tables[diff.request_id].extend(diff.new_block_ids)
            self.computed[diff.request_id] = diff.num_computed_tokens
        assert set(out.num_scheduled_tokens) <= set(self.tables)


def test_messages_give_the_worker_exactly_the_schedulers_tables_through_preemption():
    kv = KVCache(num_blocks=10, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), kv, max_model_len=64)
    requests = [make_request(f"r{i}", num_prompt=10, max_tokens=12, first_token=100 * (i + 1)) for i in range(3)]
    for r in requests:
        scheduler.add_request(r)
    worker = MirrorWorker()
    resumed = 0
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        worker.apply(out)
        resumed += sum(d.resumed for d in out.cached_requests)
        for request_id in out.num_scheduled_tokens:
            request = scheduler.requests[request_id]
            assert worker.tables[request_id] == kv.get_block_ids(request_id)
            assert worker.computed[request_id] == request.num_computed_tokens
        scheduler.update(out, fake_run(scheduler, out))
    assert scheduler.num_preemptions > 0 and resumed == scheduler.num_preemptions
    # The last step's finishes travel with the next step that runs: then the worker holds only it.
    assert set(worker.tables) == {"r2"}
    scheduler.add_request(make_request("late", num_prompt=3, max_tokens=1))
    out = scheduler.schedule()
    worker.apply(out)
    assert out.finished_request_ids == ["r2"] and set(worker.tables) == {"late"}


def test_a_request_crosses_in_full_once_then_as_diffs():
    kv = KVCache(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=6), kv, max_model_len=256)
    request = make_request("a", num_prompt=10, max_tokens=3)
    request.seed = 5  # the core sets a child's seed from its params
    scheduler.add_request(request)
    first = scheduler.schedule()
    assert [n.request_id for n in first.new_requests] == ["a"] and not first.cached_requests
    new = first.new_requests[0]
    assert new.block_ids == [0, 1] and new.num_computed_tokens == 0 and new.seed == 5
    scheduler.update(first, fake_run(scheduler, first))
    second = scheduler.schedule()
    assert not second.new_requests
    assert [(d.request_id, d.new_block_ids, d.num_computed_tokens, d.resumed) for d in second.cached_requests] == [
        ("a", [2], 6, False)
    ]
    scheduler.update(second, fake_run(scheduler, second))
    third = scheduler.schedule()
    assert third.cached_requests[0].new_block_ids == []  # the decode fits in block 2


def test_a_finished_id_reused_at_once_is_dropped_before_it_is_added_again():
    kv = KVCache(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), kv, max_model_len=256)
    a = make_request("a", num_prompt=5)
    scheduler.add_request(a)
    out = scheduler.schedule()
    scheduler.finish_request(a, FinishReason.ABORT)
    scheduler.add_request(make_request("a", num_prompt=7))
    out = scheduler.schedule()
    assert out.finished_request_ids == ["a"] and [n.request_id for n in out.new_requests] == ["a"]
    assert len(out.new_requests[0].prompt_token_ids) == 7
    # A request the workers never saw needs no finish message.
    never_run = make_request("never", num_prompt=5)
    scheduler.add_request(never_run)
    scheduler.finish_request(never_run, FinishReason.ABORT)
    scheduler.add_request(make_request("b", num_prompt=3))
    assert "never" not in scheduler.schedule().finished_request_ids


def test_step_messages_pickle():
    kv = KVCache(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(), kv, max_model_len=256)
    scheduler.add_request(make_request("a", num_prompt=5, seed=3, stop=["x"]))
    out = scheduler.schedule()
    assert pickle.loads(pickle.dumps(out)) == out
    result = ModelRunnerOutput(sampled_token_ids={"a": 4}, failed={"a": RequestFailedError("no", status=400, code="bad", param="p")})
    back = pickle.loads(pickle.dumps(result))
    assert back.sampled_token_ids == {"a": 4}
    assert (back.failed["a"].message, back.failed["a"].status, back.failed["a"].code, back.failed["a"].param) == ("no", 400, "bad", "p")


def test_the_scheduler_and_kv_cache_import_no_torch():
    code = (
        "import sys; import heron.engine.scheduler, heron.engine.kv_cache, heron.engine.messages, "
        "heron.engine.request; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
