"""The /v1/responses store (heron.server.responses_store): both backends through one interface.

Round trips, copies on read, delete, eviction by count (least recently used) and by bytes, the
per-entry bound, ResponseItemList pages (order, cursor, has_more) checked against OpenAI's spec,
SQLite persistence across a reopen, and puts from many threads at once. Pure Python, temp files only.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from openapi_schema import SPEC_PATH, assert_matches, spec_available

from heron.server.responses_store import (
    MemoryResponseStore,
    ResponseStore,
    ResponseTooLargeError,
    SQLiteResponseStore,
    StoredResponse,
    open_response_store,
)

requires_spec = pytest.mark.skipif(not spec_available(), reason=f"OpenAI spec not found at {SPEC_PATH}")


def response(response_id: str, text: str = "Hi!") -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "status": "completed",
        "model": "heron-test",
        "output": [
            {
                "id": f"msg_out_{response_id}",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }
        ],
    }


def user_item(item_id: str, text: str = "Hello") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": text}],
        "status": "completed",
    }


def put(store: ResponseStore, response_id: str, num_items: int = 1, text: str = "Hi!") -> None:
    items = [user_item(f"msg_{response_id}_{i}") for i in range(num_items)]
    resp = response(response_id, text)
    store.put(resp, items, items + resp["output"])


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path):
    """A factory: make_store(max_responses, **bounds) for the backend under test."""
    opened: list[ResponseStore] = []

    def make(max_responses: int = 10, **bounds: int) -> ResponseStore:
        if request.param == "memory":
            store: ResponseStore = MemoryResponseStore(max_responses, **bounds)
        else:
            store = SQLiteResponseStore(tmp_path / "responses.sqlite", max_responses, **bounds)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_put_get_round_trip(make_store) -> None:
    store = make_store()
    items = [user_item("msg_a"), user_item("msg_b", "Ünïcode ✓")]
    conversation = [user_item("msg_old"), *items]
    store.put(response("resp_1"), items, conversation)
    stored = store.get("resp_1")
    assert isinstance(stored, StoredResponse)
    assert stored.response == response("resp_1")
    assert stored.input_items == items
    assert stored.conversation == conversation
    assert store.get("resp_missing") is None
    assert len(store) == 1


def test_reads_are_copies(make_store) -> None:
    store = make_store()
    put(store, "resp_1")
    first = store.get("resp_1")
    first.response["status"] = "tampered"
    first.conversation.clear()
    again = store.get("resp_1")
    assert again.response["status"] == "completed"
    assert len(again.conversation) == 2


def test_put_replaces_same_id(make_store) -> None:
    store = make_store()
    put(store, "resp_1", text="first")
    put(store, "resp_1", text="second")
    assert len(store) == 1
    assert store.get("resp_1").response["output"][0]["content"][0]["text"] == "second"


def test_delete(make_store) -> None:
    store = make_store()
    put(store, "resp_1")
    put(store, "resp_2")
    assert store.delete("resp_1") is True
    assert store.delete("resp_1") is False
    assert store.get("resp_1") is None
    assert store.list_input_items("resp_1") is None
    assert store.get("resp_2") is not None and len(store) == 1


def test_eviction_drops_the_least_recently_used(make_store) -> None:
    store = make_store(max_responses=3)
    for n in (1, 2, 3):
        put(store, f"resp_{n}")
    put(store, "resp_4")
    assert store.get("resp_1") is None  # the oldest went
    assert [store.get(f"resp_{n}") is not None for n in (2, 3, 4)] == [True, True, True]
    # Reading refreshes: resp_2 was read just now, so after two more puts resp_3 and resp_4 go first.
    store.get("resp_2")
    put(store, "resp_5")
    assert store.get("resp_3") is None
    assert {n for n in (2, 4, 5) if store.get(f"resp_{n}") is not None} == {2, 4, 5}
    assert len(store) == 3


def test_eviction_by_total_bytes(make_store) -> None:
    probe = MemoryResponseStore(10)
    put(probe, "resp_0", text="x" * 1000)
    one = probe.num_bytes
    store = make_store(max_responses=100, max_total_bytes=int(one * 2.5))
    for n in range(1, 5):
        put(store, f"resp_{n}", text="x" * 1000)
    # Only two entries of that size fit in 2.5 of them: the newest two.
    assert len(store) == 2
    assert store.get("resp_3") is not None and store.get("resp_4") is not None
    assert store.get("resp_1") is None


def test_too_large_entry_is_refused_and_stores_nothing(make_store) -> None:
    store = make_store(max_response_bytes=4096)
    put(store, "resp_small")
    with pytest.raises(ResponseTooLargeError) as info:
        put(store, "resp_big", text="x" * 10_000)
    assert info.value.response_id == "resp_big" and info.value.num_bytes > 4096
    assert store.get("resp_big") is None
    assert store.get("resp_small") is not None and len(store) == 1


def test_put_needs_an_id(make_store) -> None:
    with pytest.raises(ValueError):
        make_store().put({"object": "response"}, [], [])


def test_bad_bounds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        MemoryResponseStore(0)
    with pytest.raises(ValueError):
        SQLiteResponseStore(tmp_path / "x.sqlite", 0)


# =============================================================================================
# Input item pages
# =============================================================================================


def ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["data"]]


def test_list_input_items_default_is_newest_first(make_store) -> None:
    store = make_store()
    put(store, "resp_1", num_items=5)
    page = store.list_input_items("resp_1")
    assert page["object"] == "list"
    assert ids(page) == [f"msg_resp_1_{i}" for i in (4, 3, 2, 1, 0)]
    assert (page["first_id"], page["last_id"], page["has_more"]) == ("msg_resp_1_4", "msg_resp_1_0", False)


def test_list_input_items_pages_with_a_cursor(make_store) -> None:
    store = make_store()
    put(store, "resp_1", num_items=5)
    first = store.list_input_items("resp_1", limit=2, order="asc")
    assert ids(first) == ["msg_resp_1_0", "msg_resp_1_1"] and first["has_more"] is True
    second = store.list_input_items("resp_1", after=first["last_id"], limit=2, order="asc")
    assert ids(second) == ["msg_resp_1_2", "msg_resp_1_3"] and second["has_more"] is True
    third = store.list_input_items("resp_1", after=second["last_id"], limit=2, order="asc")
    assert ids(third) == ["msg_resp_1_4"] and third["has_more"] is False
    assert (third["first_id"], third["last_id"]) == ("msg_resp_1_4", "msg_resp_1_4")
    # The same walk backwards.
    back = store.list_input_items("resp_1", after="msg_resp_1_3", limit=2, order="desc")
    assert ids(back) == ["msg_resp_1_2", "msg_resp_1_1"] and back["has_more"] is True
    # Exactly filling the page leaves nothing more.
    exact = store.list_input_items("resp_1", limit=5)
    assert len(exact["data"]) == 5 and exact["has_more"] is False


def test_list_input_items_edges(make_store) -> None:
    store = make_store()
    put(store, "resp_1", num_items=2)
    store.put(response("resp_empty"), [], [])
    assert store.list_input_items("resp_missing") is None
    unknown_cursor = store.list_input_items("resp_1", after="msg_nope")
    assert unknown_cursor["data"] == [] and unknown_cursor["has_more"] is False
    empty = store.list_input_items("resp_empty")
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    for bad in ({"limit": 0}, {"limit": 101}, {"limit": True}, {"order": "newest"}):
        with pytest.raises(ValueError):
            store.list_input_items("resp_1", **bad)
    assert len(store.list_input_items("resp_1", limit=100)["data"]) == 2


@requires_spec
def test_page_matches_spec(make_store) -> None:
    store = make_store()
    put(store, "resp_1", num_items=3)
    assert_matches(store.list_input_items("resp_1", limit=2), "ResponseItemList")


# =============================================================================================
# SQLite specifics and choosing a backend
# =============================================================================================


def test_sqlite_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "responses.sqlite"
    store = SQLiteResponseStore(path, max_responses=3)
    for n in (1, 2, 3):
        put(store, f"resp_{n}", num_items=2)
    store.get("resp_1")  # now the most recently used
    store.close()

    reopened = SQLiteResponseStore(path, max_responses=3)
    try:
        assert len(reopened) == 3
        # Recency survived: resp_1 was read after resp_2 was put, so resp_2 is the one to go.
        put(reopened, "resp_4")
        assert reopened.get("resp_2") is None
        assert reopened.get("resp_1") is not None and reopened.get("resp_4") is not None
        assert reopened.get("resp_3").input_items == [user_item("msg_resp_3_0"), user_item("msg_resp_3_1")]
        assert ids(reopened.list_input_items("resp_3", order="asc")) == ["msg_resp_3_0", "msg_resp_3_1"]
    finally:
        reopened.close()


def test_sqlite_reopen_with_a_smaller_bound_evicts_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "responses.sqlite"
    store = SQLiteResponseStore(path, max_responses=5)
    for n in range(1, 6):
        put(store, f"resp_{n}")
    store.close()
    smaller = SQLiteResponseStore(path, max_responses=2)
    try:
        assert len(smaller) == 2
        assert smaller.get("resp_4") is not None and smaller.get("resp_5") is not None
    finally:
        smaller.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "responses.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        SQLiteResponseStore(path, max_responses=5)


def test_concurrent_puts_and_reads(make_store) -> None:
    store = make_store(max_responses=50)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for n in range(40):
                put(store, f"resp_{worker}_{n}")
                assert store.get(f"resp_{worker}_{n}") is not None or len(store) == 50
                store.list_input_items(f"resp_{worker}_{n // 2}")
        except BaseException as exc:  # surfaced below, on the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store) == 50


def test_open_response_store_picks_the_backend(tmp_path: Path) -> None:
    memory = open_response_store(None, 5)
    assert isinstance(memory, MemoryResponseStore) and memory.max_responses == 5
    assert isinstance(open_response_store(":memory:", 5), MemoryResponseStore)
    sqlite_store = open_response_store(str(tmp_path / "r.sqlite"), 7, max_total_bytes=10_000, max_response_bytes=20_000)
    try:
        assert isinstance(sqlite_store, SQLiteResponseStore) and sqlite_store.max_responses == 7
        # One entry never exceeds the total.
        assert (sqlite_store.max_total_bytes, sqlite_store.max_response_bytes) == (10_000, 10_000)
    finally:
        sqlite_store.close()
