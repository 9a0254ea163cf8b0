"""Remote objects in worker processes: build one from a factory, call its methods, notice its death.

Tensor-parallel workers and data-parallel replicas are both "an object living elsewhere whose
methods the engine calls in order". A `RemoteHandle` is that object seen from here: `send(method,
*args)` queues a call, `recv()` returns the oldest outstanding call's result (or raises what it
raised there), `call()` is both. Calls are answered in the order sent, so a caller may keep several
in flight (the tensor-parallel executor starts every rank's forward before it waits for any).

`ProcessHandle` runs the object in a `spawn`ed process behind a pipe (fork would copy the parent's
threads and torch state). heron.distributed.ray_backend has the same interface over a Ray actor.

Death is never a hang: every wait also watches the process, and a process that exits (killed, out of
memory, a crash in native code) raises WorkerDiedError naming it and its exit code. `wait_any` does
the same across several handles, so a dead peer is noticed while its siblings block in a collective.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait

logger = logging.getLogger(__name__)

# How long a handle waits, after asking its process to stop, before it kills it (seconds).
STOP_TIMEOUT_S = 10.0


class WorkerDiedError(RuntimeError):
    """A worker process (or actor) is gone: its calls can never be answered."""


class RemoteCallError(RuntimeError):
    """A call raised in the worker with an exception that could not cross back as itself."""


class RemoteHandle:
    """The interface both backends give: ordered calls to one remote object."""

    name: str

    def send(self, method: str, *args: object) -> None:
        raise NotImplementedError

    def recv(self, timeout: float | None = None) -> object:
        raise NotImplementedError

    def call(self, method: str, *args: object, timeout: float | None = None) -> object:
        self.send(method, *args)
        return self.recv(timeout)

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def death(self) -> str | None:
        """Why the worker is gone ("exited with code -9"), or None while it lives."""
        raise NotImplementedError

    def kill(self) -> None:
        """Stop the worker now, without asking."""

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Ask the worker to stop (its object's `close()` runs, if it has one), then kill it if it lingers."""


def _serve(conn: Connection, factory: Callable[..., object], args: tuple, env: dict[str, str]) -> None:
    """The worker process's main: build the object, answer "ready", then serve calls until "close"."""
    # Ctrl-C reaches the whole process group; the parent decides when its workers stop (a
    # KeyboardInterrupt mid-step would otherwise come back as that step's answer).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(env)
    try:
        obj = factory(*args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails its start-up
        _reply(conn, False, exc)
        return
    _reply(conn, True, None)
    while True:
        try:
            method, call_args = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone: nobody will read an answer
        if method == "__close__":
            close = getattr(obj, "close", None)
            try:
                if close is not None:
                    close()
            finally:
                _reply(conn, True, None)
            return
        try:
            result = getattr(obj, method)(*call_args)
        except BaseException as exc:  # noqa: BLE001 - the caller decides what a failed call means
            _reply(conn, False, exc)
            continue
        _reply(conn, True, result)


def _reply(conn: Connection, ok: bool, value: object) -> None:
    if not ok:
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - an exception type that does not pickle: send its text
            value = RemoteCallError("".join(traceback.format_exception(value)))
    try:
        conn.send((ok, value))
    except (BrokenPipeError, OSError):
        pass


class ProcessHandle(RemoteHandle):
    def __init__(
        self,
        name: str,
        factory: Callable[..., object],
        args: tuple = (),
        env: dict[str, str] | None = None,
    ):
        """Start a process that builds `factory(*args)` (both must pickle: a module-level callable).
        `env`: variables set in the process before it builds the object (thread counts, say).
        Its first answer says the object is built: read it with `wait_ready()` (or `recv_all`)."""
        self.name = name
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, factory, args, dict(env or {})), name=name, daemon=True)
        self._process.start()
        child.close()
        self._pending = 1  # the "ready" answer comes first: wait_ready() or recv_all() reads it
        self._ready = False

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def sentinel(self) -> int:
        return self._process.sentinel

    @property
    def connection(self) -> Connection:
        return self._conn

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the object is built; raises what its factory raised, or WorkerDiedError."""
        if not self._ready:
            self.recv(timeout)

    def send(self, method: str, *args: object) -> None:
        try:
            self._conn.send((method, args))
        except (BrokenPipeError, OSError) as exc:
            raise WorkerDiedError(f"{self.name} {self.death() or 'closed its pipe'}") from exc
        self._pending += 1

    def recv(self, timeout: float | None = None) -> object:
        if self._pending <= 0:
            raise RuntimeError(f"recv() on {self.name} with no call outstanding")
        ready = wait([self._conn, self._process.sentinel], timeout)
        if not ready:
            raise TimeoutError(f"{self.name} did not answer within {timeout} s")
        if self._conn not in ready or not self._conn.poll():
            self._process.join(1.0)
            raise WorkerDiedError(f"{self.name} {self.death() or 'stopped answering'}")
        try:
            ok, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._process.join(1.0)
            raise WorkerDiedError(f"{self.name} {self.death() or 'closed its pipe'}") from exc
        self._pending -= 1
        self._ready = True
        if not ok:
            raise value
        return value

    def _raise_death(self) -> None:
        """The process has exited: raise what it said last if that was an error (a factory that
        failed answers, then exits), else WorkerDiedError. Its pipe polls readable at EOF too, so
        readability says nothing about an answer."""
        self._process.join(1.0)
        if self._pending > 0 and self._conn.poll():
            try:
                self.recv(0)
            except WorkerDiedError:
                pass
        raise WorkerDiedError(f"{self.name} {self.death() or 'stopped answering'}")

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def death(self) -> str | None:
        code = self._process.exitcode
        if code is None:
            return None
        return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(STOP_TIMEOUT_S)

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("__close__", ()))
                if self._conn.poll(timeout):
                    self._conn.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
            self._process.join(timeout)
        if self._process.is_alive():
            logger.warning("%s did not stop within %g s; killing it", self.name, timeout)
            self.kill()
        self._conn.close()


def recv_all(handles: Sequence[RemoteHandle], timeout: float | None = None) -> list[object]:
    """Each handle's oldest outstanding result, in order. While waiting on one, the others are
    watched too: a rank that died makes its peers block in a collective forever, so its death must
    be what ends the wait. Raises WorkerDiedError for the first dead one (or what a call raised)."""
    processes = [h for h in handles if isinstance(h, ProcessHandle)]
    if len(processes) == len(handles):
        sentinels = {h.sentinel: h for h in processes}
        for handle in processes:
            while not handle.connection.poll():
                ready = wait([handle.connection, *sentinels], timeout)
                if not ready:
                    raise TimeoutError(f"{handle.name} did not answer within {timeout} s")
                for item in ready:
                    if item in sentinels:
                        sentinels[item]._raise_death()
    else:
        # Ray actors (heron.distributed.ray_backend, imported wherever a RayHandle exists): ray.wait
        # over every actor's oldest call, so that a dead actor's failed call ends the wait.
        ray_backend = sys.modules.get("heron.distributed.ray_backend")
        if ray_backend is not None and all(isinstance(h, ray_backend.RayHandle) for h in handles):
            ray_backend.wait_answered(handles, timeout)
    return [handle.recv(timeout) for handle in handles]
