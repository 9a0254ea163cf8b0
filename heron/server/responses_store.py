"""Finished /v1/responses kept for `store: true`, `previous_response_id` and the retrieval endpoints.

In: `put(response, input_items, conversation)` with plain JSON-able dicts: the response object as sent
(`ResponseObject.model_dump()`), this request's input items in resource form (`input_items()`), and
the whole conversation the response continues, i.e. its chain's stored conversation + its own input
items + its output items, so that continuing from it takes one lookup. Out: `get(id)` ->
`StoredResponse`, `delete(id)`, and `list_input_items(id, ...)` -> one page of OpenAI's
ResponseItemList. Everything is synchronous, thread-safe and quick; the route calls the SQLite store
through `asyncio.to_thread`.

Two backends behind one interface, picked by `open_response_store(path, ...)`:
`MemoryResponseStore` (lost on restart) and `SQLiteResponseStore` (stdlib sqlite3, one table, the
three parts as JSON text columns; survives a restart; one server process per file).

Bounds, so that storing cannot grow without limit:
- `max_responses`: the number of responses kept; past it the least recently used (put or read) go.
- `max_total_bytes`: the JSON text of all entries together; past it, again the least recently used go.
- `max_response_bytes`: one entry (response + input items + conversation, as UTF-8 JSON). A larger
  one is refused with `ResponseTooLargeError` rather than evicting everything else. Its conversation
  repeats its chain's history, so a chain of n turns costs O(n^2) text in all; the per-entry bound
  caps that, and a conversation near it would not fit any model's context anyway.
Entries are stored as JSON text and parsed on every read, so a caller can never mutate what is stored.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
DEFAULT_MEMORY_TOTAL_BYTES = 256 * 1024 * 1024
DEFAULT_SQLITE_TOTAL_BYTES = 1024 * 1024 * 1024
# OpenAI's bounds for the `limit` query parameter of GET /v1/responses/{id}/input_items.
MAX_PAGE_LIMIT = 100
DEFAULT_PAGE_LIMIT = 20

Order = Literal["asc", "desc"]


class ResponseTooLargeError(ValueError):
    """An entry larger than the store's `max_response_bytes`; nothing was stored."""

    def __init__(self, response_id: str, num_bytes: int, max_bytes: int) -> None:
        super().__init__(f"response {response_id} is {num_bytes} bytes stored; the limit is {max_bytes}")
        self.response_id = response_id
        self.num_bytes = num_bytes
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _page(items: list[dict[str, Any]], after: str | None, limit: int, order: Order) -> dict[str, Any]:
    """One page of OpenAI's ResponseItemList. An `after` id not among the items gives an empty page."""
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        start = next((i + 1 for i, item in enumerate(ordered) if item.get("id") == after), len(ordered))
    data = ordered[start : start + limit]
    return {
        "object": "list",
        "data": data,
        # The spec types both as strings; for an empty page OpenAI sends null.
        "first_id": data[0].get("id") if data else None,
        "last_id": data[-1].get("id") if data else None,
        "has_more": start + limit < len(ordered),
    }


def _check_page(limit: int, order: str) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_PAGE_LIMIT}, got {limit!r}")
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")


class ResponseStore(ABC):
    """The interface both backends implement; see the module docstring for the bounds."""

    def __init__(self, max_responses: int, max_total_bytes: int, max_response_bytes: int) -> None:
        if max_responses < 1:
            raise ValueError(f"max_responses must be at least 1, got {max_responses}")
        if max_total_bytes < 1 or max_response_bytes < 1:
            raise ValueError("byte bounds must be positive")
        self.max_responses = max_responses
        self.max_total_bytes = max_total_bytes
        # One entry never exceeds the total: storing it would evict it at once.
        self.max_response_bytes = min(max_response_bytes, max_total_bytes)
        self._lock = threading.Lock()

    def _encode(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], conversation: list[dict[str, Any]]
    ) -> tuple[str, str, str, str, int]:
        response_id = response.get("id")
        if not isinstance(response_id, str) or not response_id:
            raise ValueError("a stored response needs a string 'id'")
        texts = (_dumps(response), _dumps(input_items), _dumps(conversation))
        num_bytes = sum(len(text.encode("utf-8")) for text in texts)
        if num_bytes > self.max_response_bytes:
            raise ResponseTooLargeError(response_id, num_bytes, self.max_response_bytes)
        return response_id, *texts, num_bytes

    @abstractmethod
    def put(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], conversation: list[dict[str, Any]]
    ) -> None:
        """Store (or replace) `response["id"]`, then evict past the bounds. Raises ResponseTooLargeError."""

    @abstractmethod
    def get(self, response_id: str) -> StoredResponse | None: ...

    @abstractmethod
    def delete(self, response_id: str) -> bool:
        """True if the response was stored (and now is not)."""

    @abstractmethod
    def _input_items(self, response_id: str) -> list[dict[str, Any]] | None: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def list_input_items(
        self, response_id: str, after: str | None = None, limit: int = DEFAULT_PAGE_LIMIT, order: Order = "desc"
    ) -> dict[str, Any] | None:
        """A ResponseItemList page of the response's input items (newest first by default, as OpenAI),
        or None if the response is not stored. Raises ValueError for a bad `limit` or `order`."""
        _check_page(limit, order)
        items = self._input_items(response_id)
        return None if items is None else _page(items, after, limit, order)

    def close(self) -> None:
        """Release the backend's resources; the store must not be used afterwards."""


# =============================================================================================
# In memory
# =============================================================================================


@dataclass(frozen=True)
class _Entry:
    response: str
    input_items: str
    conversation: str
    num_bytes: int


class MemoryResponseStore(ResponseStore):
    """An LRU of entries as JSON text; gone when the process ends."""

    def __init__(
        self,
        max_responses: int,
        max_total_bytes: int = DEFAULT_MEMORY_TOTAL_BYTES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(max_responses, max_total_bytes, max_response_bytes)
        # Least recently used first.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._num_bytes = 0

    def put(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], conversation: list[dict[str, Any]]
    ) -> None:
        response_id, response_text, input_text, conversation_text, num_bytes = self._encode(
            response, input_items, conversation
        )
        entry = _Entry(response_text, input_text, conversation_text, num_bytes)
        with self._lock:
            old = self._entries.pop(response_id, None)
            if old is not None:
                self._num_bytes -= old.num_bytes
            self._entries[response_id] = entry
            self._num_bytes += num_bytes
            while len(self._entries) > self.max_responses or self._num_bytes > self.max_total_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._num_bytes -= evicted.num_bytes

    def _touch(self, response_id: str) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is not None:
                self._entries.move_to_end(response_id)
            return entry

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._touch(response_id)
        if entry is None:
            return None
        return StoredResponse(json.loads(entry.response), json.loads(entry.input_items), json.loads(entry.conversation))

    def _input_items(self, response_id: str) -> list[dict[str, Any]] | None:
        entry = self._touch(response_id)
        return None if entry is None else json.loads(entry.input_items)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            entry = self._entries.pop(response_id, None)
            if entry is not None:
                self._num_bytes -= entry.num_bytes
            return entry is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return self._num_bytes


# =============================================================================================
# SQLite
# =============================================================================================

# Bumped when the table changes; a file written by a newer layout is refused rather than misread.
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    used INTEGER NOT NULL,
    num_bytes INTEGER NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    conversation TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_use ON responses (used);
"""


class SQLiteResponseStore(ResponseStore):
    """One table in one file; `used` orders rows by last put or read, for eviction."""

    def __init__(
        self,
        path: str | Path,
        max_responses: int,
        max_total_bytes: int = DEFAULT_SQLITE_TOTAL_BYTES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(max_responses, max_total_bytes, max_response_bytes)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the route's worker threads, serialised by the lock.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} was written by a newer Heron (response store schema {version}); "
                    f"this one reads schema {_SCHEMA_VERSION}"
                )
            # WAL + NORMAL: a put costs no fsync per write; a crash loses at most the latest puts.
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            self._used = self._conn.execute("SELECT COALESCE(MAX(used), 0) FROM responses").fetchone()[0]
            # The bounds may be smaller than when the file was written.
            with self._lock, self._transaction():
                self._evict()
        except BaseException:
            self._conn.close()
            raise

    def _transaction(self) -> sqlite3.Connection:
        # In autocommit mode (isolation_level=None) `with conn` alone would not open a transaction.
        self._conn.execute("BEGIN")
        return self._conn

    def _next_use(self) -> int:
        self._used += 1
        return self._used

    def _evict(self) -> None:
        count, total = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(num_bytes), 0) FROM responses").fetchone()
        if count <= self.max_responses and total <= self.max_total_bytes:
            return
        doomed = []
        for response_id, num_bytes in self._conn.execute("SELECT id, num_bytes FROM responses ORDER BY used"):
            if count <= self.max_responses and total <= self.max_total_bytes:
                break
            doomed.append((response_id,))
            count -= 1
            total -= num_bytes
        self._conn.executemany("DELETE FROM responses WHERE id = ?", doomed)

    def put(
        self, response: dict[str, Any], input_items: list[dict[str, Any]], conversation: list[dict[str, Any]]
    ) -> None:
        response_id, response_text, input_text, conversation_text, num_bytes = self._encode(
            response, input_items, conversation
        )
        with self._lock, self._transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO responses (id, used, num_bytes, response, input_items, conversation) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (response_id, self._next_use(), num_bytes, response_text, input_text, conversation_text),
            )
            self._evict()

    def _read(self, response_id: str, columns: str) -> tuple[Any, ...] | None:
        with self._lock, self._transaction():
            row = self._conn.execute(f"SELECT {columns} FROM responses WHERE id = ?", (response_id,)).fetchone()
            if row is not None:
                self._conn.execute("UPDATE responses SET used = ? WHERE id = ?", (self._next_use(), response_id))
            return row

    def get(self, response_id: str) -> StoredResponse | None:
        row = self._read(response_id, "response, input_items, conversation")
        if row is None:
            return None
        return StoredResponse(*(json.loads(text) for text in row))

    def _input_items(self, response_id: str) -> list[dict[str, Any]] | None:
        row = self._read(response_id, "input_items")
        return None if row is None else json.loads(row[0])

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_response_store(
    path: str | Path | None,
    max_responses: int,
    *,
    max_total_bytes: int | None = None,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
) -> ResponseStore:
    """SQLite at `path` if one is given, else memory. `max_total_bytes` defaults per backend."""
    if path is None or str(path) in ("", ":memory:"):
        return MemoryResponseStore(max_responses, max_total_bytes or DEFAULT_MEMORY_TOTAL_BYTES, max_response_bytes)
    return SQLiteResponseStore(path, max_responses, max_total_bytes or DEFAULT_SQLITE_TOTAL_BYTES, max_response_bytes)
