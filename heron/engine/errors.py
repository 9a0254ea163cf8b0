"""The errors the engine raises: about one request, or about the engine itself.

RequestFailedError ends one request while every other request carries on: the core puts it on
that request's final RequestOutput (`error`), and AsyncEngine.generate raises it from the
request's iterator. `status` says whose fault it was (400: the request's own parameters, 500: the
engine failed on it), `code` is a short machine-readable reason for the HTTP layer's error JSON.
EngineDeadError is the other kind: the whole engine is gone (its loop failed, or it was shut down),
raised by the async engines (heron.engine.driver) to every request in flight and every one after.
"""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine loop failed (or was shut down); it serves no more requests."""


class RequestFailedError(Exception):
    """One request could not be completed; the engine and the other requests are unaffected."""

    def __init__(self, message: str, *, status: int = 500, code: str = "internal_error", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param  # the request field at fault, when one is

    def __repr__(self) -> str:
        return f"RequestFailedError({self.message!r}, status={self.status}, code={self.code!r})"

    def __reduce__(self):
        # Exceptions pickle as cls(*args), which would drop the keyword-only fields; a worker in
        # another process reports failures through pickled messages.
        return _rebuild, (self.message, self.status, self.code, self.param)


def _rebuild(message: str, status: int, code: str, param: str | None) -> RequestFailedError:
    return RequestFailedError(message, status=status, code=code, param=param)


def as_request_error(exc: Exception) -> RequestFailedError:
    """What a request's own failure tells its caller: a RequestFailedError as raised, else a 500 that
    names the exception type (the traceback goes to the log, not to the client)."""
    if isinstance(exc, RequestFailedError):
        return exc
    return RequestFailedError(f"the engine failed on this request ({type(exc).__name__})")


def grammar_failed(detail: str) -> RequestFailedError:
    """A request's output constraint broke while decoding: end it rather than decode unconstrained."""
    return RequestFailedError(
        f"the output constraint (structured outputs) failed while decoding: {detail}", status=500, code="grammar_failed"
    )
