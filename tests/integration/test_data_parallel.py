"""--data-parallel-size: two engine replicas (processes) behind one DataParallelEngine, on a tiny
random-weight Llama, and the same through `heron serve`.

Greedy outputs equal one engine's, streams stream, the router's policies spread requests as they
say, aborts reach the right replica, structured outputs cross the process boundary (the matcher
does not: the replica recompiles the spec), and a killed replica fails only its own requests while
the other keeps serving, until the last one dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from heron.distributed.dp_engine import DataParallelEngine
from heron.distributed.router import Router
from heron.engine.async_engine import AsyncEngine
from heron.engine.errors import EngineDeadError
from heron.models.loader import load_model
from heron.outputs import FinishReason
from heron.sampling_params import SamplingParams, StructuredOutputsParams
from heron.server.registry import build_core
from heron.server.settings import ServerSettings

TIMEOUT_S = 60
KV_BYTES = 1 << 23
PREFIX = [2000 + i for i in range(40)]  # 2 full blocks of 16, shared by the "users" below


def user_prompt(i: int) -> list[int]:
    return PREFIX + [3000 + 7 * i + j for j in range(5)]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    """A tiny random Llama with the bundled SmolLM2's byte-level BPE vocabulary (llguidance, and so
    structured outputs, cannot use the MiniLM WordPiece tokenizer of the usual tiny checkpoints)."""
    tokenizer = load_model(None, progress=False, with_weights=False).tokenizer
    path = tiny_checkpoint("dp", "LlamaForCausalLM", vocab_size=49152, bos_token_id=1, eos_token_id=2)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # MiniLM's, beside its vocabulary
        (path / name).unlink(missing_ok=True)
    (path / "tokenizer.json").write_text(tokenizer.backend.to_str())
    return path


def dp_settings(model_dir: Path, **overrides) -> ServerSettings:
    return ServerSettings(model=str(model_dir), data_parallel_size=2, kv_cache_memory=KV_BYTES, **overrides)


def launch(model_dir: Path, **overrides) -> DataParallelEngine:
    settings = dp_settings(model_dir, **overrides)
    engine = DataParallelEngine.launch(load_model(str(model_dir), progress=False, with_weights=False), settings)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = launch(model_dir)
    yield engine
    asyncio.run(engine.shutdown())
    assert all(not core.handle.alive for core in engine.cores)


def run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, TIMEOUT_S)

    return asyncio.run(bounded())


async def collect(engine, tokens, params, request_id, salt=None):
    outputs = [o async for o in engine.generate(tokens, params, request_id, cache_salt=salt)]
    return outputs


def test_greedy_outputs_match_one_engine_and_stream(engine, model_dir):
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, n=2, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True),
    ]
    prompts = [user_prompt(i) for i in range(3)] + [[101, 500 + i, 600, 700] for i in range(3)]
    cases = [(p, params[i % len(params)]) for i, p in enumerate(prompts)]

    # One at a time: the float path's results depend on the batch a request shares (matmul shapes),
    # and two replicas batch differently from one engine. Concurrency is checked below.
    async def many(target, tag):
        return [await collect(target, p, sp, f"{tag}-{i}") for i, (p, sp) in enumerate(cases)]

    dp_runs = run(many(engine, "dp"))
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(engine.cores[0].info.torch_threads)  # the replicas' reduction order
    loaded = load_model(str(model_dir), progress=False)
    core = build_core(loaded, ServerSettings(model=str(model_dir), kv_cache_memory=KV_BYTES))

    async def single():
        async with AsyncEngine(core) as one:
            return await many(one, "one")

    try:
        one_runs = run(single())
    finally:
        torch.set_num_threads(threads)
        core.shutdown()
    for (_, sp), dp, one in zip(cases, dp_runs, one_runs):
        final, reference = dp[-1], one[-1]
        assert final.finished
        assert [c.token_ids for c in final.outputs] == [c.token_ids for c in reference.outputs]
        assert [c.text for c in final.outputs] == [c.text for c in reference.outputs]
        if sp.logprobs:
            got = [lp.token_id for lp in final.outputs[0].logprobs]
            assert got == final.outputs[0].token_ids
            for a, b in zip(final.outputs[0].logprobs, reference.outputs[0].logprobs):
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        # Streamed: one delta per step, adding up to the final tokens.
        assert len(dp) > 1
        for index, completion in enumerate(final.outputs):
            deltas = [t for o in dp for c in o.outputs if c.index == index for t in c.delta_token_ids]
            assert deltas == completion.token_ids
        assert final.metrics is not None and final.metrics.first_token_time >= final.metrics.arrival_time
    # Both replicas served, and nothing is left in flight.
    assert all(r.routed > 0 for r in engine.replica_stats)
    assert engine.router.loads == [0, 0]
    assert engine.stats.num_requests == 0


def test_concurrent_streams(engine):
    engine.router = Router("least_loaded", 2, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def many():
        return await asyncio.gather(*(collect(engine, user_prompt(i), params, f"c-{i}") for i in range(8)))

    for outputs in run(many()):
        final = outputs[-1]
        assert final.finished and len(final.outputs[0].token_ids) == 10
        assert [t for o in outputs for t in o.outputs[0].delta_token_ids] == final.outputs[0].token_ids
        assert len(outputs) >= 10  # a delta per step
    assert engine.router.routed == [4, 4]
    assert engine.stats.num_generation_tokens >= 80


def test_prefix_aware_keeps_a_prefix_on_one_replica(engine):
    engine.router = Router("prefix_aware", 2, block_size=engine.cores[0].runtime.block_size, load_bound=4)
    before = [r.stats.num_prefix_cache_hits for r in engine.replica_stats]
    params = SamplingParams(temperature=0, max_tokens=2)

    async def users():
        for i in range(6):  # one after another: each finds the prefix where the first one left it
            await collect(engine, user_prompt(100 + i), params, f"pa-{i}", salt="s1")

    run(users())
    routed = engine.router.routed
    assert sorted(routed) == [0, 6]
    owner = routed.index(6)
    assert engine.router.affinity_routed[owner] == 5
    hits = engine.replica_stats[owner].stats.num_prefix_cache_hits - before[owner]
    assert hits >= 5 * 32  # 2 blocks of 16 tokens, for every user after the first


def test_round_robin_and_least_loaded_spread(engine):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for policy in ("round_robin", "least_loaded"):
        engine.router = Router(policy, 2, block_size=16)

        async def users():
            await asyncio.gather(*(collect(engine, user_prompt(i), params, f"{policy}-{i}") for i in range(6)))

        run(users())
        assert engine.router.routed == [3, 3], policy
        assert engine.router.affinity_routed == [0, 0]


def test_abort_and_early_exit_reach_the_replica(engine):
    engine.router = Router("round_robin", 2, block_size=16)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def scenario():
        # An explicit abort by id ends that request's stream with ABORT.
        outputs = []
        stream = engine.generate(user_prompt(1), long, "abort-me")
        async for output in stream:
            outputs.append(output)
            if len(outputs) == 2:
                await engine.abort("abort-me")
        assert outputs[-1].finished
        assert outputs[-1].outputs[0].finish_reason is FinishReason.ABORT
        assert len(outputs[-1].outputs[0].token_ids) < 200
        # A consumer that leaves early aborts too.
        stream = engine.generate(user_prompt(2), long, "leave-me")
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.sleep(0.3)

    run(scenario())
    assert engine.router.loads == [0, 0]
    for replica in engine.replica_stats:
        assert replica.stats.num_running == 0 and replica.stats.num_requests == 0
        assert replica.stats.num_free_kv_blocks == replica.stats.num_kv_blocks
    assert engine._where == {}


def test_structured_outputs_and_bad_requests(engine):
    spec = StructuredOutputsParams(choice=["alpha", "beta"])
    params = SamplingParams(temperature=0, max_tokens=8, structured_outputs=spec)

    async def scenario():
        texts = []
        for i in range(2):  # round robin from the test before: both replicas compile it
            outputs = await collect(engine, [101, 2054, 2003], params, f"so-{i}")
            texts.append(outputs[-1].outputs[0].text)
        with pytest.raises(ValueError, match="prompt token ids"):
            await collect(engine, [10**6], SamplingParams(max_tokens=2), "bad")
        return texts

    engine.router = Router("round_robin", 2, block_size=16)
    texts = run(scenario())
    assert all(t in ("alpha", "beta") for t in texts), texts
    assert engine.router.loads == [0, 0]


def test_killed_replica_fails_its_requests_and_the_other_serves(model_dir):
    engine = launch(model_dir, data_parallel_policy="round_robin")
    try:
        long = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
        short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

        async def scenario():
            started = asyncio.Event()

            async def on(request_id):
                count = 0
                async for output in engine.generate(user_prompt(3), long, request_id):
                    count += 1
                    if count == 3:
                        started.set()
                return output

            first, second = (asyncio.create_task(on(f"k-{i}")) for i in range(2))
            await started.wait()
            victim = engine._where["k-0"]
            engine.cores[victim].kill()
            results = await asyncio.gather(first, second, return_exceptions=True)
            return victim, results

        victim, results = run(scenario())
        assert isinstance(results[0], EngineDeadError), results[0]
        assert results[1].finished and len(results[1].outputs[0].token_ids) == 150
        assert engine.is_running and engine.dead_error is None
        statuses = engine.replica_stats
        assert not statuses[victim].alive and statuses[victim].death
        assert statuses[1 - victim].alive
        before = list(engine.router.routed)

        async def after():
            return [await collect(engine, user_prompt(i), short, f"after-{i}") for i in range(3)]

        for outputs in run(after()):
            assert len(outputs[-1].outputs[0].token_ids) == 4
        assert engine.router.routed[victim] == before[victim]  # routed around the dead one
        # The last replica goes: now the engine is dead.
        engine.cores[1 - victim].kill()
        deadline = time.monotonic() + 10
        while engine.dead_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert isinstance(engine.dead_error, EngineDeadError)
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            run(collect(engine, user_prompt(0), short, "too-late"))
    finally:
        asyncio.run(engine.shutdown())


# ---------------------------------------------------------------------------------------------
# Through `heron serve --data-parallel-size 2`
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _replica_pids(server_pid: int) -> list[int]:
    children = psutil.Process(server_pid).children()
    return sorted(c.pid for c in children if "spawn_main" in " ".join(c.cmdline()))


def test_server_health_metrics_and_a_dead_replica(model_dir, tmp_path):
    port = _free_port()
    heron = Path(sys.executable).with_name("heron")
    command = [str(heron)] if heron.exists() else [sys.executable, "-m", "heron.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERON_")}
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(
        [*command, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--data-parallel-size", "2",
         "--kv-cache-memory", str(KV_BYTES), "--data-parallel-policy", "round_robin"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not healthy"
            time.sleep(0.2)
        health = httpx.get(f"{base}/health").json()
        assert [(r["index"], r["status"]) for r in health["replicas"]] == [(0, "ok"), (1, "ok")]
        assert health["dead_replicas"] == []
        body = {"model": model_dir.name, "prompt": "hello world", "max_tokens": 4, "temperature": 0}
        for _ in range(2):
            response = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
            assert response.status_code == 200, response.text
        metrics = httpx.get(f"{base}/metrics").text
        assert 'heron:num_requests_running{engine="0"' in metrics or 'engine="0",model_name' in metrics
        routed = [line for line in metrics.splitlines() if line.startswith("heron:data_parallel_routed_requests_total")]
        assert len(routed) == 2 and all(line.endswith(" 1.0") for line in routed), routed
        assert "heron:engine_replica_up" in metrics

        pids = _replica_pids(process.pid)
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            health = httpx.get(f"{base}/health").json()
            if health["dead_replicas"]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert health["status"] == "ok" and len(health["dead_replicas"]) == 1
        dead = health["replicas"][health["dead_replicas"][0]]
        assert dead["status"] == "dead" and "signal 9" in dead["error"]
        for _ in range(2):  # every request now goes to the live replica
            assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 200
        assert "heron:engine_replica_up" in httpx.get(f"{base}/metrics").text

        os.kill(pids[1], signal.SIGKILL)  # the last one: the server exits non-zero for a supervisor
        assert process.wait(timeout=20) == 1
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


def test_what_crosses_the_process_boundary_pickles():
    import pickle

    from heron.distributed.replica import ReplicaSnapshot
    from heron.engine.core import CoreCounters
    from heron.engine.errors import RequestFailedError
    from heron.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
    from heron.structured import GrammarError

    error = RequestFailedError("boom", status=400, code="bad_thing", param="x")
    output = RequestOutput(
        "r", [1, 2], [CompletionOutput(0, "hi", [5], [TokenLogprob(5, -0.1, 1, [(5, -0.1)])], FinishReason.ABORT)],
        finished=True, metrics=RequestMetrics(1.0, 2.0, 3.0, 4.0), error=error,
    )
    back = pickle.loads(pickle.dumps(output))
    assert back == output or back.outputs == output.outputs
    assert (back.error.status, back.error.code, back.error.param) == (400, "bad_thing", "x")
    assert isinstance(pickle.loads(pickle.dumps(GrammarError("no"))), ValueError)
    snapshot = ReplicaSnapshot(True, CoreCounters(num_running=1, num_waiting=2))
    assert pickle.loads(pickle.dumps(snapshot)) == snapshot
    params = SamplingParams(max_tokens=3, structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    assert pickle.loads(pickle.dumps(params)).structured_outputs == params.structured_outputs
