"""--distributed-executor-backend ray: tensor-parallel ranks and data-parallel replicas as Ray actors.

Ray is optional (pip install 'heron[ray]'); nothing here imports it until the backend is asked for,
and then `require_ray()` fails start-up with the install hint instead of an ImportError.

Joining: `connect(address)` joins the cluster at --ray-address (host:port of the head's GCS, as
`ray start --head --port=6379` prints), else $RAY_ADDRESS, else the cluster `ray start` left on this
machine, else a Ray instance started for this process. It never hangs on a wrong address: a
concrete address is probed with a TCP connect first (ray.init itself retries an unreachable GCS
for minutes), and an unreachable one fails at once, naming it. Inside an actor it is a no-op.

Actors: `RayHandle` is heron.distributed.procs' RemoteHandle over one actor of the generic `_Host`
class, which builds any object from a factory and runs its methods: `send` submits
`_Host.call(method, args)` and queues its ObjectRef, `recv` is ray.get of the oldest (a sync
single-threaded actor runs one caller's calls in the order sent, so answers come back in order). A
dead actor (ray.kill, its process killed, its node lost) makes every outstanding ref fail with
RayActorError, which becomes WorkerDiedError naming the handle; `recv_all` waits with ray.wait over
every handle's oldest ref, so a dead rank ends the wait of its peers, stuck in a collective.

Placement: every replica gets one placement group of `tensor_parallel_size` bundles, one per rank
({"CPU": c}, plus {"GPU": 1} on CUDA), strategy PACK: Ray puts the bundles on as few nodes as it can
(all on one when one has room: the ranks' all-reduces then stay on that node) but may still spread
them, where STRICT_PACK would refuse a group no single node can hold. A group that spans nodes is
logged (its all-reduces cross the network). A group the cluster cannot hold fails at once (no node
or not enough in all), or after PLACEMENT_TIMEOUT_S when the resources exist but are taken, with
what was asked and what the cluster has. A replica's engine core is an actor asking for no CPU,
placed in its group's bundle 0, and its RayExecutor puts its ranks in the same group.

Rendezvous: rank 0's actor reports its node's IP (ray.util.get_node_ip_address()) and a free port
there; every rank's TPWorker gets init_method tcp://IP:PORT and meets the others over
torch.distributed (gloo, or NCCL on GPUs). Each rank pins gloo to the network interface that
carries its node's IP (GLOO_SOCKET_IFNAME, unless set), as gloo would otherwise use whatever the
host name resolves to (often 127.0.1.1, unreachable from other nodes). When every rank of a CPU
group landed on one node, they also get a /dev/shm path there for shared-memory collectives
(heron.distributed.shm_comm), as the mp executor's ranks do.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from heron.distributed.procs import STOP_TIMEOUT_S, RemoteCallError, RemoteHandle, WorkerDiedError

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = "--distributed-executor-backend ray needs Ray: pip install 'heron[ray]'"
# How long connect() waits for a TCP connection to the cluster's GCS before it gives up.
CONNECT_TIMEOUT_S = float(os.environ.get("HERON_RAY_CONNECT_TIMEOUT_S", "10"))
# How long a placement group whose resources exist but are in use may wait for them.
PLACEMENT_TIMEOUT_S = float(os.environ.get("HERON_RAY_PLACEMENT_TIMEOUT_S", "60"))
# RayHandle.alive asks the cluster at most this often (seconds) whether an idle actor still lives.
ALIVE_CHECK_INTERVAL_S = 0.5
PLACEMENT_STRATEGY = "PACK"


class RayBackendError(ValueError):
    """The Ray backend cannot start: Ray is missing, the cluster is unreachable, or too small.
    A ValueError, so that `heron serve` reports it as a start-up error (no traceback)."""


def require_ray():
    """The ray module, or RayBackendError with the install hint."""
    try:
        import ray
    except ImportError as exc:
        raise RayBackendError(RAY_INSTALL_HINT) from exc
    return ray


# ---------------------------------------------------------------------------------------------
# Joining the cluster
# ---------------------------------------------------------------------------------------------

_connect_lock = threading.Lock()


def _bootstrap_address(address: str | None) -> str | None:
    """host:port of the GCS that ray.init(address) would dial, or None when it would start a local
    instance (or find none: then ray.init fails at once by itself)."""
    if address is not None and address.startswith("ray://"):
        return address.removeprefix("ray://").split("/")[0]
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address)
    except ConnectionError:
        return None  # "auto" with no cluster here: ray.init says so without waiting
    except Exception as exc:  # noqa: BLE001 - a private API: without it, probe the address as given
        logger.debug("could not resolve the Ray address %r: %s", address, exc)
        return address if address not in (None, "auto", "local") else None


def _probe(bootstrap: str, address: str | None) -> None:
    host, _, port = bootstrap.rpartition(":")
    named = address or bootstrap
    if not host or not port.isdigit():
        raise RayBackendError(f"--ray-address {named!r} is not HOST:PORT (the head's GCS, e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayBackendError(
            f"cannot reach the Ray cluster at {named} ({host}:{port}: {exc.strerror or exc}); start its head "
            f"with `ray start --head --port={port}` there, open the port, or fix --ray-address / $RAY_ADDRESS"
        ) from None


def connect(address: str | None = None):
    """Join the Ray cluster (once per process; a no-op inside an actor) and return the ray module.

    address: HOST:PORT of the head's GCS, "auto" (the cluster `ray start` left on this machine),
    "local" (a new instance for this process), or None: $RAY_ADDRESS, else the cluster on this
    machine, else a new local instance. Raises RayBackendError when it cannot be reached (within
    CONNECT_TIMEOUT_S) or joined."""
    ray = require_ray()
    with _connect_lock:
        if ray.is_initialized():
            return ray
        target = address or os.environ.get("RAY_ADDRESS") or None
        bootstrap = _bootstrap_address(target)
        if bootstrap is not None:
            _probe(bootstrap, target)
        kwargs: dict[str, Any] = dict(
            address=target,
            namespace="heron",
            # The actors' stdout and stderr (their tracebacks, a rank's warnings) reach this
            # process's log, prefixed with the actor; HERON_RAY_LOG_TO_DRIVER=0 keeps them on the nodes.
            log_to_driver=os.environ.get("HERON_RAY_LOG_TO_DRIVER", "1") != "0",
            logging_level=logging.WARNING,
        )
        if bootstrap is None:
            kwargs["include_dashboard"] = False  # a local instance for this process only
        started = time.monotonic()
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = target or "a local Ray instance"
            raise RayBackendError(f"cannot join the Ray cluster at {where}: {exc}") from exc
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        logger.info(
            "joined the Ray cluster at %s in %.1f s: %d node(s), %s",
            bootstrap or "a local instance", time.monotonic() - started, len(nodes), _describe(resources),
        )
        return ray


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------


def _describe(resources: dict[str, float]) -> str:
    # CPU, GPU and custom resources; not a node's own marker, memory, or placement groups' shares.
    hidden = re.compile(r"^node:|memory$|_group_|^bundle_group|__")
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not hidden.search(k)}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "no CPU or GPU"


def cluster_gpus() -> float:
    return require_ray().cluster_resources().get("GPU", 0.0)


def cpus_per_worker(tensor_parallel_size: int, data_parallel_size: int = 1) -> int:
    """CPUs each rank asks for: $HERON_RAY_CPUS_PER_WORKER, else the cluster's CPUs shared by every
    rank of every replica (as --distributed-executor-backend mp shares one machine's), but no more
    than a node's share for one replica's ranks."""
    if os.environ.get("HERON_RAY_CPUS_PER_WORKER"):
        return max(1, int(os.environ["HERON_RAY_CPUS_PER_WORKER"]))
    ray = require_ray()
    total = ray.cluster_resources().get("CPU", 1.0)
    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=total)
    share = total // max(1, tensor_parallel_size * data_parallel_size)
    return int(max(1, min(share, largest // max(1, tensor_parallel_size))))


def worker_bundle(cpus: int, gpu: bool) -> dict[str, float]:
    bundle = {"CPU": float(cpus)}
    if gpu:
        bundle["GPU"] = 1.0
    return bundle


def reserve(bundles: list[dict[str, float]], what: str, timeout: float | None = None):
    """A placement group of `bundles` (PACK), ready; RayBackendError when the cluster cannot hold it."""
    ray = require_ray()
    from ray.util.placement_group import placement_group, remove_placement_group

    timeout = PLACEMENT_TIMEOUT_S if timeout is None else timeout
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    asked = f"{len(bundles)} bundle(s) of {_describe(bundles[0])}" if bundles else "nothing"
    has = f"the cluster has {_describe(total)} on {len(nodes)} node(s)"
    hint = ("add nodes, free resources, or ask for less (--tensor-parallel-size, --data-parallel-size, "
            "HERON_RAY_CPUS_PER_WORKER)")
    for bundle in bundles:
        if not any(all(n["Resources"].get(k, 0.0) >= v for k, v in bundle.items()) for n in nodes):
            raise RayBackendError(f"{what} needs {asked}, and no Ray node has {_describe(bundle)}: {has}; {hint}")
    for key in {k for b in bundles for k in b}:
        needed = sum(b.get(key, 0.0) for b in bundles)
        if needed > total.get(key, 0.0):
            raise RayBackendError(f"{what} needs {asked} ({needed:g} {key} in all): {has}; {hint}")
    group = placement_group(bundles, strategy=PLACEMENT_STRATEGY)
    ready, _ = ray.wait([group.ready()], timeout=timeout)
    if not ready:
        remove_placement_group(group)
        free = _describe(ray.available_resources())
        raise RayBackendError(f"{what} needs {asked}, not free within {timeout:g} s: {has}, {free} free now; {hint}")
    return group


def release(group) -> None:
    """Remove a placement group (best effort: the cluster may be gone already)."""
    try:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(group)
    except Exception as exc:  # noqa: BLE001
        logger.debug("removing placement group failed: %s", exc)


# ---------------------------------------------------------------------------------------------
# The actor and its handle
# ---------------------------------------------------------------------------------------------


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it pickles (it then crosses back as itself), else RemoteCallError with its traceback."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001
        return RemoteCallError("".join(traceback.format_exception(exc)))
    return exc


def _interface_for(ip: str) -> str | None:
    """The name of the network interface carrying IPv4 address `ip` (Linux), or None."""
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue
                if socket.inet_ntoa(packed[20:24]) == ip:
                    return name
    except Exception:  # noqa: BLE001 - not Linux, or no such interface: leave gloo to its default
        return None
    return None


class _Host:
    """The object every heron actor is: it builds one object from a factory and runs its methods.
    Each call answers (ok, value): a call that raised answers (False, the exception), so that it
    crosses back as itself and the handle raises it (as ProcessHandle does)."""

    def __init__(self, name: str):
        self.name = name
        self.obj: object = None

    def node_address(self) -> tuple[str, int, int, str, bool]:
        """This node's IP, a port free on it now (for a rendezvous), this process's pid, the node's
        Ray id, and whether it can run shared-memory collectives (shm_comm.available())."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        node_id = ray.get_runtime_context().get_node_id()
        from heron.distributed import shm_comm

        return ray.util.get_node_ip_address(), port, os.getpid(), node_id, shm_comm.available()

    def build(self, factory: Callable[..., object], args: tuple, env: dict[str, str], pin_gloo: bool):
        os.environ.update(env)
        if pin_gloo and "GLOO_SOCKET_IFNAME" not in os.environ:
            import ray

            name = _interface_for(ray.util.get_node_ip_address())
            if name is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = name
        try:
            self.obj = factory(*args)
        except BaseException as exc:  # noqa: BLE001 - the caller's start-up fails with it
            return False, _portable(exc)
        return True, None

    def call(self, method: str, args: tuple):
        try:
            return True, getattr(self.obj, method)(*args)
        except BaseException as exc:  # noqa: BLE001 - the caller decides what a failed call means
            return False, _portable(exc)

    def close(self) -> None:
        close = getattr(self.obj, "close", None)
        if close is not None:
            close()


_host_class_cache = None


def _host_class():
    global _host_class_cache
    if _host_class_cache is None:
        ray = require_ray()
        # No restarts: a restarted actor would have lost its object (its shard, its KV cache).
        _host_class_cache = ray.remote(max_restarts=0, max_task_retries=0)(_Host)
    return _host_class_cache


def _death_reason(exc: BaseException) -> str:
    """"died (pid 123 on 10.0.0.2): The actor is dead because it was killed by `ray.kill`." from an
    actor error's text."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    pid = re.search(r"\bpid: (\d+)", text)
    ip = re.search(r"\bip: ([\w.:\-]+)", text)
    where = ""
    if pid or ip:
        where = " (" + " on ".join(p for p in (f"pid {pid.group(1)}" if pid else "", ip.group(1) if ip else "") if p) + ")"
    reason = _short(lines[-1]) if lines else type(exc).__name__
    return f"died{where}: {reason}"


def _short(reason: str) -> str:
    """Ray's death text without its boilerplate: the first sentence, and the worker's exit type."""
    first = re.split(r"(?<=\.) ", reason, maxsplit=1)[0]
    exit_type = re.search(r"Worker exit type: (\w+)", reason)
    return f"{first} (exit type {exit_type.group(1)})" if exit_type and exit_type.group(1) not in first else first


class RayHandle(RemoteHandle):
    """A RemoteHandle over one Ray actor hosting `factory(*args)`."""

    def __init__(
        self,
        name: str,
        factory: Callable[..., object] | None = None,
        args: tuple = (),
        env: dict[str, str] | None = None,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        placement: tuple[Any, int] | None = None,
        on_release: Callable[[], None] | None = None,
        pin_gloo: bool = False,
    ):
        """Start an actor (in bundle `placement[1]` of placement group `placement[0]`, if given) and,
        with a factory, have it build `factory(*args)` (both must pickle; the factory by reference, so
        importable on every node). Without one, `start()` it later. Its first answer says the object
        is built: read it with `wait_ready()` (or `recv_all`). `on_release` runs once, at close or kill
        (removing the placement group the handle owns, say)."""
        ray = require_ray()
        self.name = name
        # A unique name, so that the dashboard and `ray list actors` say what each actor is (and a
        # test or an operator can find one with ray.get_actor(name, namespace)).
        self.actor_name = f"{name} [{uuid.uuid4().hex[:8]}]"
        options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, name=self.actor_name, namespace="heron")
        if placement is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group, index = placement
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
        self._actor = _host_class().options(**options).remote(name)
        self._ray = ray
        self._fifo: deque = deque()
        self._settled: dict = {}  # ref -> (ok, value), read ahead by recv_all
        self._death: str | None = None
        self._checked = 0.0
        self._ready = False
        self._on_release = on_release
        self._pin_gloo = pin_gloo
        self.node_ip: str | None = None  # these four once node_address() has answered
        self.node_id: str | None = None
        self.node_has_shm = False
        self.pid: int | None = None
        if factory is not None:
            self.start(factory, args, env)

    @property
    def actor(self):
        return self._actor

    def start(self, factory: Callable[..., object], args: tuple = (), env: dict[str, str] | None = None) -> None:
        """Have the actor build `factory(*args)`; `env` is set in its process first."""
        self._submit(self._actor.build.remote(factory, args, dict(env or {}), self._pin_gloo))

    def node_address(self, timeout: float | None = None) -> tuple[str, int]:
        """The actor's node IP and a port free there (waits for the actor to start)."""
        if self._death is not None:
            raise WorkerDiedError(f"{self.name} {self._death}")
        ip, port, pid, node_id, has_shm = self._get(self._actor.node_address.remote(), timeout)
        self.node_ip, self.pid, self.node_id, self.node_has_shm = ip, pid, node_id, has_shm
        return ip, port

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the object is built; raises what its factory raised, or WorkerDiedError."""
        if not self._ready:
            self.recv(timeout)

    def send(self, method: str, *args: object) -> None:
        if self._death is not None:
            raise WorkerDiedError(f"{self.name} {self._death}")
        self._submit(self._actor.call.remote(method, args))

    def _submit(self, ref) -> None:
        self._fifo.append(ref)

    def _get(self, ref, timeout: float | None):
        ray = self._ray
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{self.name} did not answer within {timeout} s") from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorPlacementGroupRemoved,
                ray.exceptions.ActorUnschedulableError) as exc:
            if self._death is None:
                self._death = _death_reason(exc)
            self._fifo.clear()
            self._settled.clear()
            raise WorkerDiedError(f"{self.name} {self._death}") from None
        except ray.exceptions.RayTaskError as exc:  # _Host itself failed (it answers errors as values)
            raise RemoteCallError(str(exc)) from None

    @property
    def oldest(self):
        """The ObjectRef of the oldest outstanding call (None when none is)."""
        return self._fifo[0] if self._fifo else None

    def settle_oldest(self) -> None:
        """Fetch the oldest call's answer now (it is ready): recv() then returns it. Raises
        WorkerDiedError if the answer is the actor's death."""
        ref = self._fifo[0]
        if ref not in self._settled:
            self._settled[ref] = self._get(ref, 0)

    def recv(self, timeout: float | None = None) -> object:
        if not self._fifo:
            raise RuntimeError(f"recv() on {self.name} with no call outstanding")
        ref = self._fifo[0]
        outcome = self._settled.pop(ref) if ref in self._settled else self._get(ref, timeout)
        self._fifo.popleft()
        self._ready = True
        ok, value = outcome
        if not ok:
            raise value
        return value

    @property
    def alive(self) -> bool:
        return self.death() is None

    def death(self) -> str | None:
        """Why the actor is gone, or None while it lives (asks the cluster at most every
        ALIVE_CHECK_INTERVAL_S, so that an idle actor's death is noticed too)."""
        if self._death is None and time.monotonic() - self._checked >= ALIVE_CHECK_INTERVAL_S:
            self._checked = time.monotonic()
            self._death = _actor_state_death(self._actor)
        return self._death

    def kill(self) -> None:
        if self._death is None:
            self._death = "was killed (ray.kill)"
        try:
            self._ray.kill(self._actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already gone, or the cluster is
            logger.debug("ray.kill(%s) failed: %s", self.name, exc)
        self._release()

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if self._death is None:
            try:
                self._ray.get(self._actor.close.remote(), timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - closing anyway
                if not isinstance(exc, self._ray.exceptions.RayActorError):
                    logger.warning("%s did not close cleanly (%s); killing it", self.name, exc)
            self._death = "was closed"
        try:
            self._ray.kill(self._actor, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        self._release()

    def _release(self) -> None:
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()


def _actor_state_death(actor) -> str | None:
    """The cluster's word on an actor: None while it lives (or when the cluster cannot say)."""
    try:
        from ray._private.state import actors

        info = actors(actor_id=actor._actor_id.hex())
    except Exception as exc:  # noqa: BLE001 - a private API, or the cluster is gone: the next call will say
        logger.debug("actor state unavailable: %s", exc)
        return None
    if not info or info.get("State") != "DEAD":
        return None
    cause = info.get("DeathCause")
    message = ""
    try:
        context = cause.actor_died_error_context
        message = context.error_message
        where = f" (pid {context.pid} on {context.node_ip_address})" if context.pid else ""
    except Exception:  # noqa: BLE001
        where = ""
    return f"died{where}: {_short(message) if message else 'its actor is dead'}"


def wait_answered(handles: Sequence[RayHandle], timeout: float | None = None) -> None:
    """Wait until every handle's oldest call has an answer, watching all at once: the first actor
    found dead raises WorkerDiedError (its peers may be blocked in a collective with it forever)."""
    ray = require_ray()
    pending = {h.oldest: h for h in handles if h.oldest is not None}
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
        if not ready:
            first = next(iter(pending.values()))
            raise TimeoutError(f"{first.name} did not answer within {timeout} s")
        for ref in ready:
            pending.pop(ref).settle_oldest()


# ---------------------------------------------------------------------------------------------
# Executors and replicas
# ---------------------------------------------------------------------------------------------


def _define_executor():
    """RayExecutor, defined on first use: its base class imports torch and the model code, which an
    actor hosting anything else (an engine replica's core, a test's object) need not wait for."""
    from heron.distributed.tp_worker import TPWorker
    from heron.engine.executor.multiproc import MultiprocExecutor

    class RayExecutor(MultiprocExecutor):
        """MultiprocExecutor whose ranks are Ray actors in one placement group: the group of the
        replica actor it runs in (start_ray_replica), or one it reserves itself (and removes at
        shutdown). Steps, collection and death handling are MultiprocExecutor's."""

        def __init__(self, loaded, tensor_parallel_size: int, ray_address: str | None = None):
            self.ray_address = ray_address
            self._own_group = None
            super().__init__(loaded, tensor_parallel_size)

        def _placement(self):
            ray = connect(self.ray_address)
            group = ray.util.get_current_placement_group()
            if group is not None and group.bundle_count == self.size:
                return group  # the replica's own, made for its ranks (start_ray_replica)
            gpu = self.loaded.device.type == "cuda"
            bundle = worker_bundle(cpus_per_worker(self.size), gpu)
            self._own_group = reserve([bundle] * self.size, f"--tensor-parallel-size {self.size}")
            return self._own_group

        def _start_workers(self) -> list[RemoteHandle]:
            group = self._placement()
            specs = group.bundle_specs
            gpu = specs[0].get("GPU", 0) > 0
            # Ray gives each GPU actor its own GPU as CUDA_VISIBLE_DEVICES: cuda:0 inside it.
            device = "cuda:0" if gpu else "cpu"
            self.backend = "nccl" if gpu else "gloo"
            self.threads = max(1, int(specs[0].get("CPU", 1)))
            handles: list[RayHandle] = []
            try:
                for rank in range(self.size):
                    handles.append(RayHandle(
                        f"tensor-parallel rank {rank}", num_cpus=specs[rank].get("CPU", 1), num_gpus=specs[rank].get("GPU", 0),
                        placement=(group, rank), pin_gloo=True,
                    ))
                # Every rank's node (to name it, and for the log); rank 0's port is the rendezvous.
                ip, port = [handle.node_address(timeout=PLACEMENT_TIMEOUT_S) for handle in handles][0]
                init_method = f"tcp://{ip}:{port}"
                nodes = sorted({h.node_ip for h in handles})
                if len({h.node_id for h in handles}) > 1:
                    logger.warning("tensor-parallel ranks span %d nodes (%s): every layer's all-reduce crosses the network",
                                   len(nodes), ", ".join(nodes))
                    shared_memory = None
                else:
                    # All on one node: CPU collectives through shared memory there, as the mp executor's.
                    from heron.distributed.shm_comm import shm_path

                    shared_memory = shm_path() if not gpu and self.size > 1 and handles[0].node_has_shm else None
                for rank, handle in enumerate(handles):
                    handle.name = f"tensor-parallel rank {rank} (Ray actor, pid {handle.pid} on {handle.node_ip})"
                    handle.start(TPWorker, self.worker_args(rank, init_method, device, shared_memory))
            except BaseException:
                for handle in handles:
                    handle.kill()
                self._release_group()
                raise
            logger.info("tensor parallel over Ray: rendezvous at %s, ranks on %s%s", init_method, ", ".join(nodes),
                        ", collectives through shared memory" if shared_memory else "")
            self.shared_memory = shared_memory
            return handles

        def _release_group(self) -> None:
            group, self._own_group = self._own_group, None
            if group is not None:
                release(group)

        def _kill_all(self) -> None:
            super()._kill_all()
            self._release_group()

        def shutdown(self) -> None:
            super().shutdown()
            self._release_group()

    return RayExecutor


def __getattr__(name: str):
    if name == "RayExecutor":  # from heron.distributed.ray_backend import RayExecutor
        cls = globals()["RayExecutor"] = _define_executor()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _wants_gpu(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    return device == "auto" and cluster_gpus() > 0


def start_ray_replica(index: int, model_source: str, settings) -> RemoteHandle:
    """Start data-parallel replica `index` as a Ray actor: a placement group of one bundle per
    tensor-parallel rank, the replica's engine core (asking for no CPU) in bundle 0, its ranks (its
    RayExecutor's actors) in the bundles. Wait for it with `wait_ready()`."""
    from heron.distributed.replica import EngineReplica

    connect(settings.ray_address)
    tp, dp = settings.tensor_parallel_size, settings.data_parallel_size
    bundle = worker_bundle(cpus_per_worker(tp, dp), _wants_gpu(settings.device))
    group = reserve([bundle] * tp, f"engine replica {index} (--tensor-parallel-size {tp})")
    try:
        return RayHandle(
            f"engine replica {index}", EngineReplica, (index, model_source, settings),
            num_cpus=0, placement=(group, 0), on_release=lambda: release(group),
        )
    except BaseException:
        release(group)
        raise
