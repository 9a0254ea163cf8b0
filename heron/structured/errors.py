"""The typed errors of grammar compilation, and which HTTP status each one means.

GrammarError and its subclasses are the client's fault (400: the spec is invalid, too large or too
slow to compile). GrammarUnavailable and its subclasses are the server's state (503: the compile
pool is full or shutting down; the same request may succeed later).
"""

from __future__ import annotations


class GrammarError(ValueError):
    """The structured-output spec cannot be compiled; the message is fit to show a user."""


class GrammarLimitError(GrammarError):
    """The spec exceeds a configured limit; the message names the limit and the flag that raises it."""


class GrammarTimeoutError(GrammarError):
    """The compile did not finish within the compile timeout."""


class GrammarUnavailable(RuntimeError):
    """No compile can be done for this request now; retrying later may work (503)."""


class GrammarBusyError(GrammarUnavailable):
    """Too many compiles are waiting for a worker."""


class GrammarPoolClosed(GrammarUnavailable):
    """The compile pool is shutting down."""
