"""--distributed-executor-backend ray on a one-node local Ray cluster (started once for the module).

RayHandle (calls in order, errors raised as themselves, timeouts, an actor's death as
WorkerDiedError, also while its peers wait in recv_all), the clear start-up errors (Ray missing, an
unreachable cluster, a placement the cluster cannot hold), tensor parallelism over Ray actors
(greedy tokens equal one process's; a killed rank fails the step instead of hanging), and two
data-parallel replicas as Ray actors behind `heron serve`, one killed with ray.kill while the other
keeps serving.

The objects the basic tests host are stdlib modules (`importlib.import_module("time")`): an actor
can import them, where it could not import this test file.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the Ray backend's tests need Ray: pip install 'heron[ray]'")

from heron.config import CacheConfig  # noqa: E402
from heron.distributed import ray_backend  # noqa: E402
from heron.distributed.procs import RemoteCallError, WorkerDiedError, recv_all  # noqa: E402
from heron.distributed.ray_backend import RayBackendError, RayHandle  # noqa: E402
from heron.engine.core import EngineCore  # noqa: E402
from heron.engine.executor.factory import make_executor  # noqa: E402
from heron.models.loader import load_model  # noqa: E402
from heron.sampling_params import SamplingParams  # noqa: E402

CLUSTER_CPUS = 4
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh local Ray instance (never one already running here), this process its driver;
    its address, for a server process to join."""
    saved = os.environ.pop("RAY_ADDRESS", None)
    context = ray.init(address="local", num_cpus=CLUSTER_CPUS, include_dashboard=False, logging_level="warning",
                       namespace="heron")
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def module_handle(name: str, module: str) -> RayHandle:
    handle = RayHandle(name, importlib.import_module, (module,), num_cpus=0)
    handle.wait_ready(60)
    return handle


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Start-up errors
# ---------------------------------------------------------------------------------------------


def test_without_ray_start_up_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RayBackendError, match=r"needs Ray: pip install 'heron\[ray\]'"):
        ray_backend.require_ray()
    with pytest.raises(ValueError, match="needs Ray"):  # heron serve reports ValueErrors without a traceback
        ray_backend.connect("127.0.0.1:6379")


def test_an_unreachable_cluster_fails_serve_at_once(tiny_checkpoint, tmp_path):
    """ray.init retries an unreachable GCS for minutes; heron probes it first."""
    path = tiny_checkpoint("ray-unreachable", "LlamaForCausalLM")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERON_", "RAY_"))}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "heron.cli", "serve", str(path), "--port", "0", "--distributed-executor-backend",
         "ray", "--ray-address", "127.0.0.1:1"],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stderr
    assert "heron: error: cannot reach the Ray cluster at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_placement_refuses_what_the_cluster_lacks(ray_cluster):
    started = time.monotonic()
    with pytest.raises(RayBackendError, match=r"needs 1 bundle\(s\) of 64 CPU, and no Ray node has 64 CPU: "
                                              r"the cluster has 4 CPU on 1 node\(s\)"):
        ray_backend.reserve([{"CPU": 64}], "engine replica 0")
    with pytest.raises(RayBackendError, match="no Ray node has 1 CPU, 1 GPU"):
        ray_backend.reserve([{"CPU": 1, "GPU": 1}], "engine replica 0")
    with pytest.raises(RayBackendError, match=r"needs 3 bundle\(s\) of 2 CPU \(6 CPU in all\)"):
        ray_backend.reserve([{"CPU": 2}] * 3, "--tensor-parallel-size 3")
    assert time.monotonic() - started < 5  # infeasible: refused without waiting
    group = ray_backend.reserve([{"CPU": 3}], "the first")
    try:
        with pytest.raises(RayBackendError, match=r"the second needs .* not free within 0.5 s: .* 1 CPU free now"):
            ray_backend.reserve([{"CPU": 3}], "the second", timeout=0.5)
    finally:
        ray_backend.release(group)
    wait_until(lambda: ray.available_resources().get("CPU") == CLUSTER_CPUS)


# ---------------------------------------------------------------------------------------------
# RayHandle
# ---------------------------------------------------------------------------------------------


def test_calls_answer_in_order_and_errors_cross_as_themselves(ray_cluster):
    clock = module_handle("clock", "time")
    try:
        assert clock.alive and clock.death() is None
        for _ in range(3):  # several in flight: answered in the order sent
            clock.send("sleep", 0.05)
            clock.send("monotonic")
        answers = [clock.recv(10) for _ in range(6)]
        assert answers[0::2] == [None] * 3
        assert answers[1::2] == sorted(answers[1::2])
        with pytest.raises(TypeError):
            clock.call("sleep", "not a number")
        clock.send("sleep", 1.0)
        with pytest.raises(TimeoutError, match="clock did not answer within 0.1 s"):
            clock.recv(0.1)
        assert clock.recv(10) is None  # still outstanding after the timeout; answered later
        with pytest.raises(RuntimeError, match="no call outstanding"):
            clock.recv(1)
        with pytest.raises(AttributeError):
            clock.call("no_such_function")
    finally:
        clock.close()
    assert not clock.alive and clock.death() == "was closed"

    broken = RayHandle("broken", importlib.import_module, ("no_such_module_here",), num_cpus=0)
    try:
        with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):  # the factory's own error
            broken.wait_ready(60)
    finally:
        broken.kill()
    assert ray_backend._portable(RemoteCallError("x")).args == ("x",)


def test_a_dead_actor_is_worker_died_error_never_a_hang(ray_cluster):
    victim, sleeper = module_handle("victim", "time"), module_handle("sleeper", "time")
    try:
        victim.send("monotonic")
        sleeper.send("monotonic")
        assert all(isinstance(t, float) for t in recv_all([victim, sleeper], 10))
        # Both block (as ranks in a collective would); the victim's death ends the wait on both.
        sleeper.send("sleep", 60)
        victim.send("sleep", 60)
        threading.Timer(0.5, ray.kill, [victim.actor]).start()
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"victim died \(pid \d+ on [\d.]+\): .*killed by `ray.kill`"):
            recv_all([sleeper, victim], 30)
        assert time.monotonic() - started < 10
        assert not victim.alive and "ray.kill" in victim.death()
        with pytest.raises(WorkerDiedError, match="victim died"):
            victim.send("getpid")  # known dead: refused at once
        # A process that exits by itself, while nobody waits on it: `alive` notices.
        exiting = module_handle("exiting", "os")
        exiting.send("_exit", 3)
        wait_until(lambda: not exiting.alive)
        with pytest.raises(WorkerDiedError, match="exiting died"):
            exiting.recv(10)
    finally:
        for handle in (victim, sleeper):
            handle.kill()
    assert "ray.kill" in sleeper.death()


# ---------------------------------------------------------------------------------------------
# Tensor parallelism over Ray actors
# ---------------------------------------------------------------------------------------------


def run_engine(core: EngineCore, prompts: list[list[int]], max_tokens: int = 8) -> dict[str, tuple[list[int], list]]:
    for i, prompt in enumerate(prompts):
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1))
    done = {}
    while core.has_unfinished():
        for output in core.step():
            if output.finished:
                done[output.request_id] = (output.outputs[0].token_ids, output.outputs[0].logprobs)
    return done


def test_tensor_parallel_ranks_as_ray_actors_match_one_process(ray_cluster, tiny_checkpoint):
    path = str(tiny_checkpoint("ray-tp", "LlamaForCausalLM", seed=5))
    prompts = [[101, 2000 + i, 3000 + 7 * i, 4000] for i in range(3)] + [list(range(200, 260))]
    cache = CacheConfig(kv_cache_memory_bytes=1 << 24)
    reference = run_engine(EngineCore(load_model(path, dtype="float32", progress=False), cache), prompts)
    description = load_model(path, dtype="float32", progress=False, with_weights=False)
    executor = make_executor(description, 2, "ray")
    assert type(executor).__name__ == "RayExecutor"
    assert [type(h) for h in executor.handles] == [RayHandle, RayHandle]
    assert all(f"on {ray.util.get_node_ip_address()}" in h.name for h in executor.handles)
    assert executor.backend == "gloo" and executor.threads == CLUSTER_CPUS // 2
    # One node: the ranks' collectives go through shared memory, whose file is unlinked once mapped.
    assert executor.shared_memory.startswith("/dev/shm/") and not os.path.exists(executor.shared_memory)
    core = EngineCore(description, cache, executor=executor)
    try:
        ours = run_engine(core, prompts)
        assert ours.keys() == reference.keys()
        for request_id, (tokens, logprobs) in reference.items():
            assert ours[request_id][0] == tokens
            for mine, theirs in zip(ours[request_id][1], logprobs, strict=True):
                assert abs(mine.logprob - theirs.logprob) < LOGIT_ATOL
        # A rank killed mid-generation: the step fails with its death, rank 0 is killed with it.
        core.add_request("long", [101, 2000, 3000], SamplingParams(max_tokens=200, ignore_eos=True))
        core.step()
        ray.kill(executor.handles[1].actor)
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"tensor-parallel rank 1 \(Ray actor.*died"):
            while core.has_unfinished():
                core.step()
        assert time.monotonic() - started < 30
        wait_until(lambda: not any(h.alive for h in executor.handles))
    finally:
        core.shutdown()
    # Its placement group went with it.
    wait_until(lambda: ray.available_resources().get("CPU") == CLUSTER_CPUS)


# ---------------------------------------------------------------------------------------------
# Data-parallel replicas as Ray actors behind `heron serve`
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def ray_dp_server(ray_cluster, tiny_checkpoint, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
    from server_helpers import start_server, stop_server

    path = tiny_checkpoint("ray-dp", "LlamaForCausalLM")
    server = start_server(
        "ray-dp", tmp_path,
        [str(path), "--served-model-name", "tiny", "--dtype", "float32", "--data-parallel-size", "2",
         "--data-parallel-policy", "round_robin", "--kv-cache-memory", str(1 << 23),
         "--distributed-executor-backend", "ray", "--ray-address", ray_cluster],
        {}, model="tiny",
    )
    yield server
    stop_server(server)
    # The server's actors and placement groups go with it.
    wait_until(lambda: ray.available_resources().get("CPU") == CLUSTER_CPUS, timeout=30)


def _replica_actor(index: int):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"engine replica {index} [")]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="heron")


def test_replicas_as_ray_actors_route_stream_and_survive_a_death(ray_dp_server):
    base = ray_dp_server.base_url
    health = httpx.get(f"{base}/health", timeout=10).json()
    assert [(r["index"], r["status"]) for r in health["replicas"]] == [(0, "ok"), (1, "ok")]
    # Each replica's engine core is an actor, and so is the rank under it (the cluster is full).
    assert ray.available_resources().get("CPU", 0) == 0
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 6, "temperature": 0}
    texts = []
    for _ in range(2):  # round robin: one each; greedy, so both say the same
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["text"])
    assert texts[0] == texts[1]
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert len(chunks) >= 6 and "".join(c["choices"][0]["text"] for c in chunks) == texts[0]
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    routed = [line for line in metrics.splitlines() if line.startswith("heron:data_parallel_routed_requests_total")]
    assert sorted(float(line.rsplit(" ", 1)[1]) for line in routed) == [1.0, 2.0], routed

    ray.kill(_replica_actor(0))
    deadline = time.monotonic() + 15
    while not (health := httpx.get(f"{base}/health", timeout=10).json())["dead_replicas"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    assert health["status"] == "ok" and health["dead_replicas"] == [0]
    assert "ray.kill" in health["replicas"][0]["error"]
    for _ in range(2):  # all to the live replica now
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == texts[0]
