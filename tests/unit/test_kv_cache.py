"""CPU unit tests for KVCache and PrefixCache: block accounting, prefix reuse, eviction, invariants.

Requests are driven the way the scheduler drives them (prefix lookup, allocate, then advance
`num_computed_tokens`); the randomized test also tracks what each physical block would hold, to
prove a prefix hit never serves KV computed for other tokens.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from heron.engine import kv_cache as kv_cache_module
from heron.engine.kv_cache import KVCache, hash_block
from heron.engine.prefix_cache import PrefixCache
from heron.engine.request import Request

BLOCK_SIZE = 4


def make_request(request_id: str, token_ids: list[int], cache_salt: str | None = None) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(token_ids), cache_salt=cache_salt)


def schedule_new(kv: KVCache, request: Request, num_new_tokens: int | None = None) -> list[int] | None:
    """First scheduling of a request: prefix lookup, then allocation for (a chunk of) the rest."""
    hit_block_ids, num_hit_tokens = kv.get_computed_blocks(request)
    if num_new_tokens is None:
        num_new_tokens = request.num_tokens - num_hit_tokens
    new_block_ids = kv.allocate_slots(request, num_new_tokens, hit_block_ids)
    if new_block_ids is not None:
        request.num_computed_tokens = num_hit_tokens + num_new_tokens
    return new_block_ids


def decode(kv: KVCache, request: Request, token_id: int) -> list[int] | None:
    """One decode step: the sampled token is appended, then its KV slot is allocated and computed."""
    request.append_output_token(token_id)
    new_block_ids = kv.allocate_slots(request, 1)
    if new_block_ids is not None:
        request.num_computed_tokens += 1
    return new_block_ids


def snapshot(kv: KVCache) -> tuple:
    pc = kv.prefix_cache
    return (
        list(kv._free_block_ids),
        list(kv._ref_counts),
        list(pc._evictable_block_ids),
        dict(pc._cached_by_hash),
        {
            request_id: (list(s.block_ids), s.num_registered_blocks, s.last_serial, s.cacheable)
            for request_id, s in kv._requests.items()
        },
        kv.num_free_blocks,
    )


def check_invariants(kv: KVCache, live_requests: list[Request]) -> None:
    pc = kv.prefix_cache
    all_block_ids = set(range(kv.num_blocks))

    free_block_ids = kv._free_block_ids
    assert len(free_block_ids) == len(set(free_block_ids)), "a block is on the free list twice"
    free = set(free_block_ids)
    evictable = set(pc._evictable_block_ids)
    referenced = {b for b in all_block_ids if kv._ref_counts[b] > 0}
    assert all(kv._ref_counts[b] >= 0 for b in all_block_ids)
    # Free, referenced and evictable partition the pool.
    assert not (free & evictable) and not (free & referenced) and not (evictable & referenced)
    assert free | evictable | referenced == all_block_ids

    # Reference counts are exactly the number of live block tables holding each block.
    assert set(kv._requests) == {r.request_id for r in live_requests}
    holders: Counter[int] = Counter()
    for request in live_requests:
        table = kv.get_block_ids(request.request_id)
        assert len(table) == len(set(table)), "a block appears twice in one block table"
        holders.update(table)
    for block_id in all_block_ids:
        assert kv._ref_counts[block_id] == holders[block_id]

    # The cache maps agree; cached blocks are referenced or evictable, never on the free list.
    cached_by_block_id = pc._cached_by_block_id
    assert len(pc._cached_by_hash) == len(cached_by_block_id) == len(pc._cached_by_serial)
    assert evictable <= set(cached_by_block_id)
    assert not (free & set(cached_by_block_id))
    for block_hash, cached in pc._cached_by_hash.items():
        assert cached.block_hash == block_hash
        assert cached_by_block_id[cached.block_id] is cached
        assert pc._cached_by_serial[cached.serial] is cached
        assert len(cached.token_ids) == kv.block_size
        assert cached.block_hash == hash_block(cached.parent_hash, cached.token_ids, cached.cache_salt)
        if cached.parent_serial is None:
            assert cached.parent_hash is None
        else:
            parent = pc._cached_by_serial[cached.parent_serial]  # parents of cached blocks are cached
            assert parent.block_hash == cached.parent_hash
            assert cached.serial in pc._child_serials[cached.parent_serial]
    for parent_serial, child_serials in pc._child_serials.items():
        assert parent_serial in pc._cached_by_serial and child_serials
        for child_serial in child_serials:
            assert pc._cached_by_serial[child_serial].parent_serial == parent_serial

    assert kv.num_free_blocks == len(free) + len(evictable)
    assert kv.usage == pytest.approx(len(referenced) / kv.num_blocks)


# --- allocation and accounting ------------------------------------------------------------------


def test_allocate_and_free_accounting() -> None:
    kv = KVCache(num_blocks=10, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(10)))

    assert schedule_new(kv, request) == [0, 1, 2]
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.num_free_blocks == 7
    assert kv.usage == pytest.approx(0.3)

    # Tokens 11 and 12 fit in block 2; token 13 needs a fourth block.
    assert decode(kv, request, 100) == []
    assert decode(kv, request, 101) == []
    assert decode(kv, request, 102) == [3]
    assert kv.get_block_ids("a") == [0, 1, 2, 3]
    assert kv.num_free_blocks == 6
    check_invariants(kv, [request])

    kv.free(request)
    assert kv.get_block_ids("a") == []
    assert kv.num_free_blocks == 10
    assert kv.usage == 0.0
    # The three full blocks stay cached (evictable); the partial one went back to the free list.
    assert kv.prefix_cache.num_cached_blocks == 3
    assert kv.prefix_cache.num_evictable_blocks == 3
    check_invariants(kv, [])

    kv.free(request)  # freeing twice (e.g. abort after finish) is a no-op
    assert kv.num_free_blocks == 10


def test_get_block_ids_returns_a_copy() -> None:
    kv = KVCache(num_blocks=4, block_size=BLOCK_SIZE)
    request = make_request("a", [1, 2, 3])
    schedule_new(kv, request)
    table = kv.get_block_ids("a")
    table.append(99)
    assert kv.get_block_ids("a") == [0]
    assert kv.get_block_ids("unknown") == []


def test_allocation_is_all_or_nothing() -> None:
    kv = KVCache(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(12)))
    assert schedule_new(kv, a) == [0, 1, 2]

    # A new request needing two blocks when one is left: refused, nothing changed.
    b = make_request("b", [50, 51, 52, 53, 54])
    before = snapshot(kv)
    assert schedule_new(kv, b) is None
    assert snapshot(kv) == before
    assert kv.get_block_ids("b") == []
    check_invariants(kv, [a])

    # A running request growing past the pool: refused, its table unchanged.
    a.num_computed_tokens = 12
    assert kv.allocate_slots(a, 8) is None
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert snapshot(kv) == before
    assert kv.allocate_slots(a, 4) == [3]
    check_invariants(kv, [a])


def test_failed_allocation_does_not_take_prefix_hits() -> None:
    kv = KVCache(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(9)))
    schedule_new(kv, a)
    kv.free(a)  # blocks 0 and 1 cached and evictable, block 2 free
    filler = make_request("filler", [90, 91, 92, 93, 94])
    assert schedule_new(kv, filler) == [2, 3]

    # b hits both cached blocks; reviving them leaves no block for its 8 remaining tokens.
    b = make_request("b", list(range(8)) + [7, 7, 7, 7, 7, 7, 7, 7])
    hit_block_ids, num_hit_tokens = kv.get_computed_blocks(b)
    assert (hit_block_ids, num_hit_tokens) == ([0, 1], 8)
    before = snapshot(kv)
    assert kv.allocate_slots(b, 8, hit_block_ids) is None
    assert snapshot(kv) == before
    assert kv.prefix_cache.is_evictable(0) and kv.prefix_cache.is_evictable(1)
    check_invariants(kv, [filler])


def test_rejects_stale_prefix_hit() -> None:
    kv = KVCache(num_blocks=2, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(5)))
    schedule_new(kv, a)
    kv.free(a)
    b = make_request("b", list(range(5)))
    hit_block_ids, _ = kv.get_computed_blocks(b)
    assert hit_block_ids == [0]
    # Another allocation runs between lookup and allocate and evicts the hit block.
    other = make_request("other", list(range(50, 58)))
    assert schedule_new(kv, other) is not None
    # Block 0 was evicted and now caches "other"'s first block: serving it would be wrong KV.
    assert kv.prefix_cache.is_cached(0)
    before = snapshot(kv)
    with pytest.raises(ValueError, match="no longer holds"):
        kv.allocate_slots(b, 1, hit_block_ids)
    assert snapshot(kv) == before


# --- prefix hits --------------------------------------------------------------------------------


def test_prefix_hit_across_requests() -> None:
    kv = KVCache(num_blocks=16, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(10)))
    assert schedule_new(kv, a) == [0, 1, 2]
    assert kv.prefix_cache_queries == 10 and kv.prefix_cache_hits == 0

    b = make_request("b", list(range(8)) + [70, 71, 72])
    hit_block_ids, num_hit_tokens = kv.get_computed_blocks(b)
    assert hit_block_ids == [0, 1] and num_hit_tokens == 8
    assert kv.prefix_cache_queries == 21 and kv.prefix_cache_hits == 8
    new_block_ids = kv.allocate_slots(b, 3, hit_block_ids)
    assert new_block_ids == [3]
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert kv._ref_counts[0] == kv._ref_counts[1] == 2
    # Lookup takes no references by itself.
    c = make_request("c", list(range(9)))
    assert kv.get_computed_blocks(c) == ([0, 1], 8)
    assert kv._ref_counts[0] == 2
    check_invariants(kv, [a, b])


def test_partial_prefix_match_stops_at_first_differing_block() -> None:
    kv = KVCache(num_blocks=16, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(13)))
    schedule_new(kv, a)
    b = make_request("b", [0, 1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11, 12])
    assert kv.get_computed_blocks(b) == ([0], 4)
    # The same third block after a different second block is not a hit: KV depends on the prefix.
    c = make_request("c", [0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 12])
    assert kv.get_computed_blocks(c) == ([0], 4)


def test_cache_salt_separates_requests() -> None:
    kv = KVCache(num_blocks=16, block_size=BLOCK_SIZE)
    tokens = list(range(9))
    a = make_request("a", tokens, cache_salt="tenant-1")
    schedule_new(kv, a)
    assert kv.get_computed_blocks(make_request("plain", tokens)) == ([], 0)
    assert kv.get_computed_blocks(make_request("other", tokens, cache_salt="tenant-2")) == ([], 0)
    assert kv.get_computed_blocks(make_request("same", tokens, cache_salt="tenant-1")) == ([0, 1], 8)
    # The salt enters every block's hash, not just the first.
    unsalted = make_request("u", tokens)
    kv.get_computed_blocks(unsalted)
    assert all(h1 != h2 for h1, h2 in zip(a.block_hashes, unsalted.block_hashes))


def test_never_hits_the_whole_prompt() -> None:
    kv = KVCache(num_blocks=16, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(8)))
    schedule_new(kv, a)
    assert kv.prefix_cache.num_cached_blocks == 2

    # Same 8 tokens: the last block must be recomputed so its final token yields logits.
    b = make_request("b", list(range(8)))
    assert kv.get_computed_blocks(b) == ([0], 4)
    assert kv.allocate_slots(b, 4, [0]) == [2]
    assert kv.get_computed_blocks(make_request("c", list(range(9)))) == ([0, 1], 8)
    assert kv.get_computed_blocks(make_request("d", [0])) == ([], 0)
    check_invariants(kv, [a, b])


def test_block_hashes_are_extended_incrementally() -> None:
    kv = KVCache(num_blocks=16, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(6)))
    schedule_new(kv, request)
    assert len(request.block_hashes) == 1
    first_hash = request.block_hashes[0]
    for token_id in (6, 7):
        decode(kv, request, token_id)
    assert len(request.block_hashes) == 2
    assert request.block_hashes[0] == first_hash
    assert request.block_hashes[1] == hash_block(first_hash, (4, 5, 6, 7), None)


def test_chunked_prefill_registers_only_computed_blocks() -> None:
    kv = KVCache(num_blocks=16, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(13)))
    assert schedule_new(kv, a, num_new_tokens=5) == [0, 1]
    # Tokens 0..4 have KV after this step: only block 0 is full of computed tokens.
    assert kv.prefix_cache.num_cached_blocks == 1
    assert kv.get_computed_blocks(make_request("b", list(range(13)))) == ([0], 4)
    assert kv.allocate_slots(a, 8) == [2, 3]
    a.num_computed_tokens = 13
    assert kv.prefix_cache.num_cached_blocks == 3
    assert kv.get_computed_blocks(make_request("c", list(range(13)))) == ([0, 1, 2], 12)
    check_invariants(kv, [a])


def test_output_tokens_filling_a_block_make_it_cacheable() -> None:
    kv = KVCache(num_blocks=16, block_size=BLOCK_SIZE)
    request = make_request("a", [1, 2, 3, 4, 5, 6])
    schedule_new(kv, request)
    assert kv.prefix_cache.num_cached_blocks == 1
    decode(kv, request, 7)
    assert kv.prefix_cache.num_cached_blocks == 1  # block 1 holds 3 of 4 tokens
    decode(kv, request, 8)
    assert kv.prefix_cache.num_cached_blocks == 2
    assert kv.prefix_cache.is_cached(1)

    follow_up = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(follow_up) == ([0, 1], 8)
    check_invariants(kv, [request])


# --- sharing, eviction, reset -------------------------------------------------------------------


def test_shared_blocks_are_ref_counted() -> None:
    kv = KVCache(num_blocks=6, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    a, b = make_request("a", prompt), make_request("b", prompt)  # n=2 samples of one prompt
    assert schedule_new(kv, a) == [0, 1, 2]
    assert schedule_new(kv, b) == [3]
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert kv.num_free_blocks == 2

    kv.free(a)
    # Blocks 0 and 1 are still held by b: neither free nor evictable.
    assert kv._ref_counts[0] == kv._ref_counts[1] == 1
    assert not kv.prefix_cache.is_evictable(0) and not kv.prefix_cache.is_evictable(1)
    assert kv.num_free_blocks == 3
    check_invariants(kv, [b])

    # Exhausting the pool never hands out a block that b still references.
    c = make_request("c", list(range(100, 112)))
    new_block_ids = schedule_new(kv, c)
    assert new_block_ids is not None and len(new_block_ids) == 3
    assert not set(new_block_ids) & set(kv.get_block_ids("b"))
    assert kv.num_free_blocks == 0
    assert schedule_new(kv, make_request("d", [1])) is None
    check_invariants(kv, [b, c])

    kv.free(b)
    assert kv.prefix_cache.is_evictable(0) and kv.prefix_cache.is_evictable(1)
    check_invariants(kv, [c])


def test_lru_evicts_oldest_freed_and_tail_blocks_first() -> None:
    kv = KVCache(num_blocks=6, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(9)))  # blocks 0, 1 full (cached) + 2 partial
    d = make_request("d", list(range(20, 29)))  # blocks 3, 4 full (cached) + 5 partial
    schedule_new(kv, a)
    schedule_new(kv, d)
    kv.free(a)
    kv.free(d)
    assert list(kv.prefix_cache._evictable_block_ids) == [1, 0, 4, 3]
    assert kv.num_free_blocks == 6

    # Three blocks: the two truly free partial blocks first, then a's tail block is evicted.
    e = make_request("e", list(range(50, 61)))
    assert schedule_new(kv, e) == [5, 2, 1]
    assert kv.get_computed_blocks(make_request("a2", list(range(9)))) == ([0], 4)
    assert kv.get_computed_blocks(make_request("d2", list(range(20, 29)))) == ([3, 4], 8)
    check_invariants(kv, [e])

    # The next eviction takes a's head block, the oldest; d's blocks survive.
    assert kv.allocate_slots(e, 4) == [0]
    assert not kv.prefix_cache.is_cached(0)
    assert kv.get_computed_blocks(make_request("a3", list(range(9)))) == ([], 0)
    assert kv.get_computed_blocks(make_request("d3", list(range(20, 29)))) == ([3, 4], 8)
    check_invariants(kv, [e])


def test_prefix_hit_refreshes_lru_position() -> None:
    kv = KVCache(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(5)))  # block 0 cached, block 1 partial
    d = make_request("d", list(range(20, 25)))  # block 2 cached, block 3 partial
    schedule_new(kv, a)
    schedule_new(kv, d)
    kv.free(a)
    kv.free(d)
    assert list(kv.prefix_cache._evictable_block_ids) == [0, 2]

    # Reusing a's prefix makes block 0 the most recently freed one.
    a_again = make_request("a_again", list(range(5)))
    assert schedule_new(kv, a_again) == [3]
    kv.free(a_again)
    assert list(kv.prefix_cache._evictable_block_ids) == [2, 0]

    e = make_request("e", list(range(50, 61)))
    assert schedule_new(kv, e) == [3, 1, 2]
    assert kv.get_computed_blocks(make_request("d2", list(range(20, 25)))) == ([], 0)
    assert kv.get_computed_blocks(make_request("a2", list(range(5)))) == ([0], 4)
    check_invariants(kv, [e])


def test_reset_prefix_cache() -> None:
    kv = KVCache(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(9)))
    schedule_new(kv, a)
    assert kv.reset_prefix_cache() is False
    assert kv.prefix_cache.num_cached_blocks == 2

    kv.free(a)
    kv.get_computed_blocks(make_request("probe", list(range(9))))
    queries, hits = kv.prefix_cache_queries, kv.prefix_cache_hits
    assert kv.reset_prefix_cache() is True
    assert kv.prefix_cache.num_cached_blocks == 0
    assert kv.num_free_blocks == 8 and len(kv._free_block_ids) == 8
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    # /metrics counters are cumulative and survive a reset.
    assert kv.prefix_cache_hits == hits and kv.prefix_cache_queries == queries + 9
    check_invariants(kv, [])


def test_prefix_caching_disabled() -> None:
    kv = KVCache(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    assert schedule_new(kv, a) == [0, 1, 2]
    b = make_request("b", list(range(9)))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.prefix_cache_queries == 0 and kv.prefix_cache_hits == 0
    assert kv.prefix_cache.num_cached_blocks == 0
    kv.free(a)
    assert len(kv._free_block_ids) == 8
    check_invariants(kv, [])


# --- duplicates, collisions, orphaned descendants ----------------------------------------------


def test_same_content_computed_twice_keeps_first_block() -> None:
    kv = KVCache(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    a, b = make_request("a", prompt), make_request("b", prompt)
    # Both looked up before either allocated (e.g. admitted together): both miss.
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.allocate_slots(a, 9) == [0, 1, 2]
    assert kv.allocate_slots(b, 9) == [3, 4, 5]
    a.num_computed_tokens = b.num_computed_tokens = 9
    assert kv.prefix_cache.num_cached_blocks == 2
    assert not kv.prefix_cache.is_cached(3) and not kv.prefix_cache.is_cached(4)
    assert kv.get_computed_blocks(make_request("c", prompt)) == ([0, 1], 8)

    # b's next full block chains through a's cached twin of its private duplicate.
    for token_id in (9, 10, 11):
        decode(kv, b, token_id)
    assert kv.prefix_cache.is_cached(5)
    assert kv.get_computed_blocks(make_request("d", prompt + [9, 10, 11, 0])) == ([0, 1, 5], 12)
    check_invariants(kv, [a, b])

    kv.free(b)
    assert 3 in kv._free_block_ids and 4 in kv._free_block_ids  # uncached duplicates are plain free
    assert kv.prefix_cache.is_evictable(5)
    check_invariants(kv, [a])


def test_evicting_a_block_forgets_its_descendants() -> None:
    kv = KVCache(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    a, b = make_request("a", prompt), make_request("b", prompt)
    kv.get_computed_blocks(a)
    kv.get_computed_blocks(b)
    kv.allocate_slots(a, 9)  # 0, 1 cached; 2 partial
    kv.allocate_slots(b, 9)  # 3, 4 private duplicates; 5 partial
    a.num_computed_tokens = b.num_computed_tokens = 9
    for token_id in (9, 10, 11):
        decode(kv, b, token_id)  # block 5 is cached as the child of block 1
    kv.free(a)
    kv.free(b)
    assert list(kv.prefix_cache._evictable_block_ids) == [1, 0, 5]
    assert kv.num_free_blocks == 8

    # Five truly free blocks go first; the sixth evicts block 1, and its child 5 goes with it
    # (a block chained after a forgotten parent could never be found again).
    e = make_request("e", list(range(100, 124)))
    assert schedule_new(kv, e) == [3, 4, 2, 6, 7, 1]
    assert not kv.prefix_cache.is_cached(5) and kv._free_block_ids == [5]
    assert list(kv.prefix_cache._evictable_block_ids) == [0]
    assert kv.num_free_blocks == 2
    assert kv.get_computed_blocks(make_request("f", prompt + [9, 10, 11, 0])) == ([0], 4)
    check_invariants(kv, [e])


def test_referenced_descendant_of_evicted_block_is_uncached_not_freed() -> None:
    kv = KVCache(num_blocks=9, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    a, b = make_request("a", prompt), make_request("b", prompt)
    kv.get_computed_blocks(a)
    kv.get_computed_blocks(b)
    kv.allocate_slots(a, 9)
    kv.allocate_slots(b, 9)
    a.num_computed_tokens = b.num_computed_tokens = 9
    for token_id in (9, 10, 11):
        decode(kv, b, token_id)  # block 5 cached under a's block 1, held by b
    kv.free(a)

    e = make_request("e", list(range(100, 110)))
    g = make_request("g", [1, 2, 3, 4, 5])
    assert schedule_new(kv, e) == [2, 6, 7]
    assert schedule_new(kv, g) == [8, 1]  # evicts block 1
    assert not kv.prefix_cache.is_cached(5)
    assert kv._ref_counts[5] == 1 and kv.get_block_ids("b") == [3, 4, 5]
    check_invariants(kv, [b, e, g])

    # b can no longer chain new blocks to anything findable, so it stops offering them.
    for token_id in (12, 13, 14, 15):
        assert decode(kv, b, token_id) is not None
    assert kv.get_block_ids("b") == [3, 4, 5, 0]  # block 0 evicted for b's fourth block
    assert not any(kv.prefix_cache.is_cached(block_id) for block_id in kv.get_block_ids("b"))
    check_invariants(kv, [b, e, g])
    kv.free(b)
    assert {0, 3, 4, 5} <= set(kv._free_block_ids)
    check_invariants(kv, [e, g])


def test_hash_collision_never_serves_other_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every block hashes alike: lookups must fall back on the stored tokens and lineage.
    monkeypatch.setattr(kv_cache_module, "hash_block", lambda parent_hash, token_ids, cache_salt: 7)
    kv = KVCache(num_blocks=16, block_size=BLOCK_SIZE)
    a = make_request("a", [1, 1, 1, 1, 2, 2, 2, 2, 3])
    schedule_new(kv, a)
    assert kv.prefix_cache.num_cached_blocks == 1  # the second block's hash is taken: not cached
    assert kv.get_computed_blocks(make_request("b", [9, 9, 9, 9, 2, 2, 2, 2, 3])) == ([], 0)
    assert kv.get_computed_blocks(make_request("c", [1, 1, 1, 1, 2, 2, 2, 2, 3])) == ([0], 4)
    assert list(kv.prefix_cache._cached_by_hash) == [7]


def test_prefix_cache_rejects_child_of_a_different_parent_with_the_same_hash() -> None:
    pc = PrefixCache()
    parent = pc.insert(0, block_hash=100, parent_hash=None, token_ids=(1, 2), cache_salt=None, parent_serial=None)
    assert parent is not None
    child = pc.insert(1, block_hash=200, parent_hash=100, token_ids=(3, 4), cache_salt=None, parent_serial=parent.serial)
    assert child is not None
    pc.mark_evictable(0)
    assert pc.evict() == [0]  # the parent goes, and its child cannot outlive it
    assert not pc.is_cached(1)

    # A different first block that collides with the evicted parent's hash, then the child's content:
    # the old child must not be served after it (it was already forgotten above).
    impostor = pc.insert(2, block_hash=100, parent_hash=None, token_ids=(8, 9), cache_salt=None, parent_serial=None)
    assert impostor is not None
    assert pc.lookup(100, (8, 9), None, None) is impostor
    assert pc.lookup(200, (3, 4), None, impostor.serial) is None
    assert pc.lookup(100, (1, 2), None, None) is None  # same hash, other tokens
    assert pc.lookup(100, (8, 9), "salt", None) is None  # same hash, other salt


def test_prefix_cache_lookup_checks_parent_identity() -> None:
    pc = PrefixCache()
    first = pc.insert(0, 100, None, (1, 2), None, None)
    other_first = pc.insert(1, 101, None, (5, 6), None, None)
    assert first is not None and other_first is not None
    child = pc.insert(2, 200, 100, (3, 4), None, first.serial)
    assert child is not None
    assert pc.lookup(200, (3, 4), None, first.serial) is child
    # Equal hash and tokens, but computed after another block: not the same KV.
    assert pc.lookup(200, (3, 4), None, other_first.serial) is None
    assert pc.insert(3, 200, 101, (3, 4), None, other_first.serial) is None  # first block for a hash wins


# --- randomized property test -------------------------------------------------------------------


class _Simulation:
    """A tiny scheduler over a small pool, with a shadow of what every physical block holds."""

    def __init__(self, seed: int, enable_prefix_caching: bool) -> None:
        self.rng = random.Random(seed)
        self.kv = KVCache(num_blocks=16, block_size=BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching)
        # Small vocabulary and shared stems: plenty of equal blocks across requests.
        self.stems = [[self.rng.randrange(4) for _ in range(self.rng.randrange(0, 14))] for _ in range(4)]
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.next_id = 0
        # block id -> (cache salt, every token up to and including the last slot written in it).
        self.written: dict[int, tuple[str | None, tuple[int, ...]]] = {}
        self.num_hit_tokens = 0
        self.num_evictions = 0
        self.num_preemptions = 0
        self.num_refusals = 0

    def arrive(self) -> None:
        rng = self.rng
        tokens = rng.choice(self.stems) + [rng.randrange(4) for _ in range(rng.randrange(1, 10))]
        self.waiting.append(make_request(f"r{self.next_id}", tokens, cache_salt=rng.choice([None, None, "s"])))
        self.next_id += 1

    def write(self, request: Request, start: int, end: int) -> None:
        """What the model runner does: write KV for positions [start, end) into the request's blocks."""
        table = self.kv.get_block_ids(request.request_id)
        for position in range(start, end):
            block_id = table[position // BLOCK_SIZE]
            assert self.kv._ref_counts[block_id] == 1, "writing into a block another request shares"
            self.written[block_id] = (request.cache_salt, tuple(request.all_token_ids[: position + 1]))

    def allocate(self, request: Request, num_new_tokens: int, hit_block_ids: list[int]) -> bool:
        kv = self.kv
        before = snapshot(kv)
        evictable_before = set(kv.prefix_cache._evictable_block_ids)
        free_before = set(kv._free_block_ids)
        num_held = len(kv.get_block_ids(request.request_id))
        num_required_tokens = request.num_computed_tokens + len(hit_block_ids) * BLOCK_SIZE + num_new_tokens
        num_fresh = max(0, -(-num_required_tokens // BLOCK_SIZE) - num_held - len(hit_block_ids))
        num_revived = sum(1 for b in hit_block_ids if kv._ref_counts[b] == 0)

        new_block_ids = kv.allocate_slots(request, num_new_tokens, hit_block_ids)
        if new_block_ids is None:
            assert snapshot(kv) == before
            assert num_fresh > len(free_before) + len(evictable_before) - num_revived, "refused though it fit"
            self.num_refusals += 1
            return False
        assert len(new_block_ids) == num_fresh
        assert set(new_block_ids) <= free_before | (evictable_before - set(hit_block_ids))
        self.num_evictions += len(set(new_block_ids) & evictable_before)
        return True

    def schedule_waiting(self) -> None:
        request = self.rng.choice(self.waiting)
        hit_block_ids, num_hit_tokens = self.kv.get_computed_blocks(request)
        assert num_hit_tokens == len(hit_block_ids) * BLOCK_SIZE < request.num_tokens
        if not self.kv.enable_prefix_caching:
            assert hit_block_ids == []
        for i, block_id in enumerate(hit_block_ids):
            # The real correctness property: the KV found was computed for exactly this prefix.
            assert self.written[block_id] == (request.cache_salt, tuple(request.all_token_ids[: (i + 1) * BLOCK_SIZE]))
        num_new_tokens = self.rng.randint(1, request.num_tokens - num_hit_tokens)
        if self.allocate(request, num_new_tokens, hit_block_ids):
            self.write(request, num_hit_tokens, num_hit_tokens + num_new_tokens)
            request.num_computed_tokens = num_hit_tokens + num_new_tokens
            self.num_hit_tokens += num_hit_tokens
            self.waiting.remove(request)
            self.running.append(request)

    def step_running(self) -> None:
        request = self.rng.choice(self.running)
        num_remaining = request.num_tokens - request.num_computed_tokens
        if num_remaining > 0:
            num_new_tokens = self.rng.randint(1, num_remaining)  # next prefill chunk
        else:
            request.append_output_token(self.rng.randrange(4))
            num_new_tokens = 1
        start = request.num_computed_tokens
        if self.allocate(request, num_new_tokens, []):
            self.write(request, start, start + num_new_tokens)
            request.num_computed_tokens += num_new_tokens
        else:
            # Preempt by recomputation: drop everything, keep the tokens, retry later.
            self.kv.free(request)
            request.num_computed_tokens = 0
            self.running.remove(request)
            self.waiting.append(request)
            self.num_preemptions += 1

    def finish(self) -> None:
        request = self.rng.choice(self.running)
        self.kv.free(request)
        self.running.remove(request)

    def check(self) -> None:
        kv = self.kv
        check_invariants(kv, self.running)
        for block_id, cached in kv.prefix_cache._cached_by_block_id.items():
            salt, prefix = self.written[block_id]
            assert salt == cached.cache_salt
            assert len(prefix) % BLOCK_SIZE == 0 and prefix[-BLOCK_SIZE:] == cached.token_ids
            if cached.parent_serial is None:
                assert len(prefix) == BLOCK_SIZE
            else:
                parent = kv.prefix_cache._cached_by_serial[cached.parent_serial]
                assert self.written[parent.block_id] == (salt, prefix[:-BLOCK_SIZE])
        for request in self.waiting + self.running:
            parent_hash = None
            assert len(request.block_hashes) <= request.num_tokens // BLOCK_SIZE
            for i, block_hash in enumerate(request.block_hashes):
                block = tuple(request.all_token_ids[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
                parent_hash = hash_block(parent_hash, block, request.cache_salt)
                assert block_hash == parent_hash

    def run(self, num_ops: int) -> None:
        rng = self.rng
        for _ in range(num_ops):
            roll = rng.random()
            if roll < 0.2 or not (self.waiting or self.running):
                self.arrive()
            elif roll < 0.45 and self.waiting:
                self.schedule_waiting()
            elif roll < 0.85 and self.running:
                self.step_running()
            elif roll < 0.98 and self.running:
                self.finish()
            elif roll >= 0.98:
                assert self.kv.reset_prefix_cache() is (not self.running)
            self.check()


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_invariants(seed: int, enable_prefix_caching: bool) -> None:
    simulation = _Simulation(seed, enable_prefix_caching)
    simulation.run(800)
    # The run must have exercised the interesting paths, or it proves little.
    assert simulation.num_refusals > 0 and simulation.num_preemptions > 0
    if enable_prefix_caching:
        assert simulation.num_hit_tokens > 0 and simulation.num_evictions > 0
        assert simulation.kv.prefix_cache_hits > 0
