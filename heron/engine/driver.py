"""EngineDriver: the one thread an engine runs on, the queue that feeds it, and how it ends.

Shared by AsyncEngine (generation) and AsyncEmbeddingEngine, whose engines are not thread-safe
and must never run on the event loop. What flows in: commands from event loops, `submit()`ted
(refused with EngineDeadError once the engine is shut down or dead, RuntimeError before `start()`)
or `post()`ed (best effort, such as aborts: dropped after shutdown, when the thread ends every
request itself). The engine's `serve` loop runs on the thread and reads them with `take()`: what
has arrived, in order, and whether shutdown was asked for, at which point `serve` ends its
requests and returns. What flows out is the engine's business; `call_in_loop()` hands a result to
the event loop a request came from, from the engine thread.

Death: an exception out of `serve` is a failure no single request explains. The driver marks the
engine dead (`dead_error`), calls the engine's `fail` so that every request in flight gets an
EngineDeadError instead of hanging, then hands whatever still comes in to `refuse`, until shutdown.

`start()` also shortens the process's GIL switch interval (`shorten_switch_interval`): the one place
that changes it, for every engine thread alike.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from heron.engine.errors import EngineDeadError

logger = logging.getLogger(__name__)

# The longest the engine thread waits for the GIL once it wants it back (seconds).
ENGINE_SWITCH_INTERVAL_S = 0.0005

Command = TypeVar("Command")


def shorten_switch_interval() -> None:
    """Lower the process's GIL switch interval to ENGINE_SWITCH_INTERVAL_S (never raise it).

    An engine thread gives the GIL up around every kernel and tensor op and must get it back fast;
    with Python's default of 5 ms, an event loop busy in Python (parsing, tokenizing, writing JSON)
    held it that long each time, and a step of a few hundred ops waited seconds in all. Process-wide
    by nature, so it happens here, when an engine thread starts, and nowhere else.
    """
    sys.setswitchinterval(min(sys.getswitchinterval(), ENGINE_SWITCH_INTERVAL_S))


def call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    """From the engine thread: run `fn(*args)` on `loop`, unless that loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # that event loop is closed: its consumers are gone and nobody reads this


class _Shutdown:
    """Queue item: the last one ever put; the engine ends what is in flight and `serve` returns."""


_SHUTDOWN = _Shutdown()


class EngineDriver(Generic[Command]):
    def __init__(
        self,
        *,
        thread_name: str,
        engine_name: str,
        owner: str,
        serve: Callable[[], None],
        fail: Callable[[Exception], None],
        refuse: Callable[[Command, EngineDeadError], None],
    ):
        """serve: the engine's loop (reads `take()`, returns at shutdown); fail: end every request
        in flight after `serve` raised; refuse: turn away a command that came in after that.
        engine_name ("the engine") and owner (the class users call start() on) word the errors."""
        self.thread_name = thread_name
        self._engine_name = engine_name
        self._owner = owner
        self._serve = serve
        self._fail = fail
        self._refuse = refuse
        self._commands: queue.SimpleQueue[Command | _Shutdown] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Guards the lifecycle flags together with enqueueing, so no command can slip in behind
        # the shutdown item (it would never be read, and its caller would wait forever).
        self._lock = threading.Lock()
        self._closed = False
        self._dead_error: Exception | None = None

    # ----------------------------------------------------------------- lifecycle (event loop side)

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise EngineDeadError(f"{self._engine_name} has been shut down")
            if self._thread is not None:
                return
            shorten_switch_interval()
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Refuse new commands and tell the thread to stop after the step it is in (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._thread is not None:
                    self._commands.put(_SHUTDOWN)

    async def join(self) -> None:
        """Wait for the thread to end (after `close()`) without blocking the event loop."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, thread.join)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def is_running(self) -> bool:
        """Started, not shut down and not dead: serving."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._closed and self._dead_error is None

    @property
    def dead_error(self) -> Exception | None:
        """The exception that killed the engine loop, if it died."""
        return self._dead_error

    def submit(self, command: Command) -> None:
        """Queue a command the caller then waits on; raises instead where nobody would read it."""
        with self._lock:
            if self._dead_error is not None:
                raise EngineDeadError(f"{self._engine_name} loop has died") from self._dead_error
            if self._closed:
                raise EngineDeadError(f"{self._engine_name} has been shut down")
            if self._thread is None:
                raise RuntimeError(f"{self._owner}.start() has not been called")
            self._commands.put(command)

    def post(self, command: Command) -> None:
        """Queue a command nobody waits on; dropped after shutdown. Never raises, never awaits, so it
        can run while a generator is being closed."""
        with self._lock:
            if not self._closed:
                self._commands.put(command)

    # ----------------------------------------------------------------- engine thread

    def take(self, block: bool) -> tuple[list[Command], bool]:
        """The commands that have arrived, in order (waiting for the first when `block`: an idle
        engine sleeps here instead of spinning), and whether shutdown was asked for after them."""
        items = [self._commands.get()] if block else []
        while True:
            try:
                items.append(self._commands.get_nowait())
            except queue.Empty:
                break
        if items and items[-1] is _SHUTDOWN:  # nothing is ever put behind it
            return items[:-1], True  # type: ignore[return-value]
        return items, False  # type: ignore[return-value]

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # a bug in the engine: fail every request rather than hang them
            logger.exception("%s loop failed; failing all in-flight requests", self._engine_name)
            with self._lock:
                self._dead_error = exc
            try:
                self._fail(exc)
            except Exception:
                logger.exception("%s could not fail its in-flight requests", self._engine_name)
            self._serve_dead(exc)

    def _serve_dead(self, cause: Exception) -> None:
        """After a failure: turn away what raced past the dead check, until shutdown."""
        while True:
            commands, stopping = self.take(block=True)
            for command in commands:
                error = EngineDeadError(f"{self._engine_name} loop has died")
                error.__cause__ = cause
                self._refuse(command, error)
            if stopping:
                return
