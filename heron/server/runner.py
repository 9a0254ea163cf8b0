"""Running the app under uvicorn with a graceful drain: what `heron serve` does after loading models.

On the first SIGTERM (or SIGINT) the app starts draining: /health answers 503, so a load balancer
takes the instance out, and new requests get 503 while those in progress (streams included) run to
the end. When none is left, or `--drain-timeout` has passed, uvicorn is told to exit; requests
still running then are aborted (a stream gets an error event), the engines stop, and the process
exits 0. A second signal exits at
once. Under a plain `uvicorn heron.server.app:app`, uvicorn's own shutdown applies instead.

If an engine dies (a failure no single request explains: the engine thread survives any one
request's error), the server does not linger answering 503: it drains for at most
`ENGINE_DEAD_DRAIN_S` and exits with status 1, so a supervisor (systemd, Kubernetes, Docker's
restart policy) starts a fresh process.

The HTTP protocol is uvicorn's httptools one with a header deadline (heron/server/timeouts.py),
and the keep-alive timeout is `--keep-alive-timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from heron.server.timeouts import header_timeout_protocol

logger = logging.getLogger("heron.server")

# After an engine died: how long requests still running (embeddings on another engine, say) get.
ENGINE_DEAD_DRAIN_S = 5.0
# Exit status when an engine died.
EXIT_ENGINE_DEAD = 1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float):
        super().__init__(config)
        self._app = app
        self._drain = app.state.drain
        self._drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        watchdog = self._loop.create_task(self._watch_engines())
        try:
            await super().serve(sockets)
        finally:
            watchdog.cancel()

    async def _watch_engines(self) -> None:
        while not self.should_exit:
            await asyncio.sleep(0.2)
            registry = self._app.state.registry
            if registry is None or self._drain.draining:
                continue
            dead = [m for m in registry.models if getattr(m.engine, "dead_error", None) is not None]
            if not dead:
                continue
            for model in dead:
                logger.error("the engine of %s died (%r); exiting with status %d after a drain of up to %g s "
                             "so that a supervisor restarts the server", model.name, model.engine.dead_error,
                             EXIT_ENGINE_DEAD, ENGINE_DEAD_DRAIN_S)
            self.exit_code = EXIT_ENGINE_DEAD
            self._drain.draining = True
            deadline = time.monotonic() + min(ENGINE_DEAD_DRAIN_S, self._drain_timeout)
            while self._drain.in_progress > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self.should_exit = True
            return

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's captured signals: it would re-raise them after a clean exit,
        # turning a drained shutdown into death by SIGTERM.
        if self._drain.draining or self._loop is None:
            logger.warning("second signal (%s): exiting now", signal.Signals(sig).name)
            os._exit(1)
        self._drain.draining = True
        logger.info(
            "%s: draining %d request(s) in progress (up to %g s); new requests get 503",
            signal.Signals(sig).name,
            self._drain.in_progress,
            self._drain_timeout,
        )
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._wait_then_exit()))

    async def _wait_then_exit(self) -> None:
        deadline = time.monotonic() + self._drain_timeout
        while self._drain.in_progress > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._drain.in_progress:
            logger.warning("drain deadline passed: aborting %d request(s) still running", self._drain.in_progress)
            # Stopping the engines ends each remaining request with an abort, which its response
            # reports (an error event for a stream) before the connection closes.
            registry = self._app.state.registry
            if registry is not None:
                await registry.shutdown()
            settle = time.monotonic() + 2
            while self._drain.in_progress > 0 and time.monotonic() < settle:
                await asyncio.sleep(0.05)
        else:
            logger.info("drained: every request finished")
        self.should_exit = True


def run(
    app: FastAPI,
    host: str,
    port: int,
    log_level: str,
    drain_timeout: float,
    *,
    keep_alive_timeout: float = 5.0,
    header_timeout: float = 0.0,
) -> int:
    """Serve until shut down; returns the exit status (EXIT_ENGINE_DEAD if an engine died)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=False,
        http=header_timeout_protocol(header_timeout),
        timeout_keep_alive=keep_alive_timeout,
        # The drain already waited; this only bounds closing what is left after its deadline.
        timeout_graceful_shutdown=1,
    )
    server = DrainingServer(config, app, drain_timeout)
    asyncio.run(server.serve())
    return server.exit_code
