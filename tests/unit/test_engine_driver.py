"""EngineDriver with a fake engine: the lifecycle and death handling both async engines rely on."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from heron.engine.driver import ENGINE_SWITCH_INTERVAL_S, EngineDriver, call_in_loop
from heron.engine.errors import EngineDeadError

TIMEOUT_S = 10


class EchoEngine:
    """Settles each command (a future) with its own value; fails the loop on request."""

    def __init__(self, fail_on: object = None):
        self.fail_on = fail_on
        self.go = threading.Event()  # the failing command waits for it, so a test can queue more first
        self.go.set()
        self.failed_with: list[Exception] = []
        self.refused: list[tuple[object, EngineDeadError]] = []
        self.in_flight: list[tuple[asyncio.AbstractEventLoop, asyncio.Future, object]] = []
        self.driver = EngineDriver(
            thread_name="heron-test-engine", engine_name="the test engine", owner="EchoEngine",
            serve=self.serve, fail=self.fail, refuse=self.refuse,
        )

    def serve(self) -> None:
        while True:
            commands, stopping = self.driver.take(block=True)
            for loop, future, value in commands:
                if value == self.fail_on:
                    self.in_flight.append((loop, future, value))
                    self.go.wait(TIMEOUT_S)
                    raise RuntimeError("injected")
                call_in_loop(loop, future.set_result, value)
            if stopping:
                return

    def fail(self, exc: Exception) -> None:
        self.failed_with.append(exc)
        for loop, future, _ in self.in_flight:
            call_in_loop(loop, future.set_exception, EngineDeadError("dead"))

    def refuse(self, command, error: EngineDeadError) -> None:
        self.refused.append((command[2], error))
        call_in_loop(command[0], command[1].set_exception, error)

    async def ask(self, value: object) -> object:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.driver.submit((loop, future, value))
        return await asyncio.wait_for(future, TIMEOUT_S)


def test_lifecycle_start_serve_close():
    engine = EchoEngine()
    driver = engine.driver

    async def main():
        with pytest.raises(RuntimeError, match=r"EchoEngine.start\(\) has not been called"):
            await engine.ask(1)
        driver.start()
        driver.start()  # idempotent
        assert driver.is_running and sys.getswitchinterval() <= ENGINE_SWITCH_INTERVAL_S
        assert await asyncio.gather(*(engine.ask(i) for i in range(5))) == list(range(5))
        driver.close()
        assert not driver.is_running and driver.closed
        driver.post((None, None, "dropped"))  # after shutdown: dropped, never raises
        with pytest.raises(EngineDeadError, match="the test engine has been shut down"):
            await engine.ask(6)
        await driver.join()
        driver.close()  # idempotent
        with pytest.raises(EngineDeadError, match="shut down"):
            driver.start()

    asyncio.run(main())
    assert not any(t.name == "heron-test-engine" and t.is_alive() for t in threading.enumerate())
    assert driver.dead_error is None


def test_a_failing_loop_fails_in_flight_work_and_refuses_what_comes_after():
    engine = EchoEngine(fail_on="boom")
    engine.go.clear()
    driver = engine.driver

    async def main():
        driver.start()
        doomed = asyncio.create_task(engine.ask("boom"))
        while not engine.in_flight:
            await asyncio.sleep(0.001)
        late = asyncio.create_task(engine.ask("late"))  # queued while the loop is still alive
        await asyncio.sleep(0.01)
        engine.go.set()
        results = await asyncio.gather(doomed, late, return_exceptions=True)
        with pytest.raises(EngineDeadError, match="the test engine loop has died") as after:
            await engine.ask("after")
        driver.close()
        await driver.join()
        return results, after.value

    (doomed, late), after = asyncio.run(main())
    assert isinstance(doomed, EngineDeadError)
    assert isinstance(late, EngineDeadError) and isinstance(late.__cause__, RuntimeError)
    assert [value for value, _ in engine.refused] == ["late"]
    assert isinstance(after.__cause__, RuntimeError) and driver.dead_error is after.__cause__
    assert engine.failed_with == [driver.dead_error] and not driver.is_running


def test_call_in_loop_ignores_a_closed_loop():
    loop = asyncio.new_event_loop()
    loop.close()
    call_in_loop(loop, lambda: None)  # the consumer's loop is gone: nothing to do, no error
