"""The data-parallel router (heron.distributed.router): policies, the load bound, salts, dead
replicas and the bounded prefix map, on plain token lists (no engine)."""

from __future__ import annotations

import pytest

from heron.distributed.router import NoLiveReplicaError, Router, block_hashes
from heron.engine.errors import EngineDeadError

BLOCK = 4


def prompt(prefix: int, tail: int, prefix_blocks: int = 3, tail_len: int = 3) -> list[int]:
    """`prefix_blocks` full blocks shared by every prompt of `prefix`, then a distinct tail."""
    return [1000 * prefix + i for i in range(prefix_blocks * BLOCK)] + [50_000 + 10 * tail + i for i in range(tail_len)]


def route(router: Router, tokens: list[int], salt: str | None = None) -> int:
    index = router.choose(tokens, salt)
    router.started(index)
    return index


def test_block_hashes_chain_over_full_blocks_and_salt():
    tokens = list(range(10))
    hashes = block_hashes(tokens, BLOCK)
    assert len(hashes) == 2  # the 2 leftover tokens are no block
    assert block_hashes(tokens[:8], BLOCK) == hashes
    # Block 1's hash depends on block 0: the same block after another prefix is another hash.
    other = block_hashes([99, *tokens[1:]], BLOCK)
    assert other[0] != hashes[0] and other[1] != hashes[1]
    assert block_hashes(tokens, BLOCK, "salt") != hashes
    assert block_hashes(tokens[:3], BLOCK) == []


def test_round_robin_cycles_and_skips_dead():
    router = Router("round_robin", 3, block_size=BLOCK)
    assert [route(router, prompt(0, i)) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    router.mark_dead(1)
    assert [route(router, prompt(0, i)) for i in range(4)] == [0, 2, 0, 2]
    assert router.routed == [4, 2, 4]
    assert router.affinity_routed == [0, 0, 0]


def test_least_loaded_follows_in_flight_counts():
    router = Router("least_loaded", 3, block_size=BLOCK)
    # Idle pool: ties rotate, so the first three go to distinct replicas.
    assert sorted(route(router, prompt(0, i)) for i in range(3)) == [0, 1, 2]
    router.finished(1)
    assert route(router, prompt(0, 9)) == 1  # the only one with load 0
    router.finished(2)
    router.finished(2)  # never below zero
    assert router.loads == [1, 1, 0]
    assert route(router, prompt(0, 10)) == 2


def test_prefix_aware_returns_a_prefix_to_its_replica():
    router = Router("prefix_aware", 2, block_size=BLOCK, load_bound=4)
    first = {p: route(router, prompt(p, 0)) for p in range(2)}
    assert first[0] != first[1]  # no match yet: least loaded, spread
    for p in range(2):
        router.finished(first[p])
    for tail in range(1, 4):
        for p in range(2):
            index = route(router, prompt(p, tail))
            assert index == first[p], f"prefix {p} left its replica"
            router.finished(index)
    assert sum(router.affinity_routed) == 6
    assert router.routed == [4, 4]


def _split_prefix(router: Router) -> tuple[list[int], list[int]]:
    """Replica 0 serves a 4-block prefix, then (0 being over the bound) replica 1 serves a prompt
    sharing only its first block: block 0 now maps to 1, blocks 1-3 to 0. Loads end [2, 1, 0]."""
    long = prompt(7, 0, prefix_blocks=4)
    assert route(router, long) == 0
    router.started(0)  # busy: 2 > least (0) + bound (1)
    assert route(router, long[:BLOCK] + [1, 2, 3]) == 1
    return long, long[: 4 * BLOCK] + [4, 5, 6]


def test_prefix_aware_prefers_the_longest_match():
    router = Router("prefix_aware", 3, block_size=BLOCK, load_bound=1)
    _, query = _split_prefix(router)
    router.finished(0)
    router.finished(0)  # loads [0, 1, 0]: both holders within the bound
    assert route(router, query) == 0  # 4 blocks on replica 0 beat 1 block on replica 1


def test_a_shorter_match_within_the_bound_beats_no_match():
    router = Router("prefix_aware", 3, block_size=BLOCK, load_bound=1)
    _, query = _split_prefix(router)
    # Replica 0 (4 blocks) is over the bound; replica 1 (1 block, load 1 <= 0 + 1) is not: it wins
    # over the least loaded replica 2, which holds nothing.
    assert route(router, query) == 1
    assert router.affinity_routed == [0, 1, 0]


def test_load_bound_spreads_a_hot_prefix():
    router = Router("prefix_aware", 2, block_size=BLOCK, load_bound=2)
    chosen = [route(router, prompt(0, i)) for i in range(8)]  # none finishes: loads only grow
    # Affinity holds while load(owner) <= least + 2: 0,0,0 (loads 1,2,3 vs 0), then replica 1.
    assert chosen[:4] == [0, 0, 0, 1]
    # Both now hold the prefix; the loads stay within the bound of each other throughout.
    loads = router.loads
    assert sum(loads) == 8 and abs(loads[0] - loads[1]) <= 2
    assert router.affinity_routed[0] >= 2 and router.affinity_routed[1] >= 1


def test_load_bound_zero_is_least_loaded_with_affinity_ties():
    router = Router("prefix_aware", 2, block_size=BLOCK, load_bound=0)
    assert route(router, prompt(0, 0)) == 0
    assert route(router, prompt(0, 1)) == 1  # replica 0 is one over the least: bound broken
    router.finished(0)
    router.finished(1)
    a = route(router, prompt(0, 2))
    router.finished(a)
    assert route(router, prompt(0, 3)) == a  # equal loads: affinity decides


def test_salt_separates_affinity():
    router = Router("prefix_aware", 2, block_size=BLOCK, load_bound=4)
    tokens = prompt(3, 0)
    first = route(router, tokens, "tenant-a")
    router.finished(first)
    # The same tokens under another salt share no cache blocks: no affinity, least loaded (a tie,
    # which rotates to the other replica).
    other = route(router, tokens, "tenant-b")
    assert other != first
    assert router.affinity_routed == [0, 0]
    router.finished(other)
    assert route(router, prompt(3, 1), "tenant-a") == first
    assert router.affinity_routed[first] == 1


def test_dead_replica_is_never_chosen_and_all_dead_raises():
    for policy in ("prefix_aware", "least_loaded", "round_robin"):
        router = Router(policy, 3, block_size=BLOCK)
        owner = route(router, prompt(5, 0))
        router.finished(owner)
        router.mark_dead(owner)
        picks = {route(router, prompt(5, i)) for i in range(1, 10)}
        assert owner not in picks, policy
        for index in range(3):
            router.mark_dead(index)
        with pytest.raises(NoLiveReplicaError, match="all 3 engine replicas are dead"):
            router.choose(prompt(5, 0))
        assert issubclass(NoLiveReplicaError, EngineDeadError)


def test_prefix_map_is_bounded_lru():
    router = Router("prefix_aware", 2, block_size=BLOCK, load_bound=100, max_tracked=6)
    first = route(router, prompt(1, 0))  # 3 blocks
    router.finished(first)
    route_two = route(router, prompt(2, 0))  # 3 more: 6 tracked
    router.finished(route_two)
    assert router.num_tracked == 6
    other = route(router, prompt(3, 0))  # evicts prefix 1's blocks (the oldest)
    router.finished(other)
    assert router.num_tracked == 6
    before = list(router.affinity_routed)
    route(router, prompt(1, 1))
    assert router.affinity_routed == before  # prefix 1 is forgotten: no affinity route
    # Prefix 3 (recent) is still known.
    router2_before = list(router.affinity_routed)
    route(router, prompt(3, 1))
    assert sum(router.affinity_routed) == sum(router2_before) + 1


def test_lru_evicts_a_prefix_tail_before_its_head():
    router = Router("prefix_aware", 2, block_size=BLOCK, load_bound=100, max_tracked=4)
    owner = route(router, prompt(1, 0, prefix_blocks=3))
    router.finished(owner)
    # 2 new blocks push out 1 of prefix 1's: its deepest, so its head still routes.
    filler = route(router, prompt(2, 0, prefix_blocks=2))
    router.finished(filler)
    assert router.num_tracked == 4
    assert route(router, prompt(1, 5, prefix_blocks=1)) == owner
    assert router.affinity_routed[owner] == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown data-parallel policy"):
        Router("random", 2)
    with pytest.raises(ValueError):
        Router("round_robin", 0)
    with pytest.raises(ValueError):
        Router("prefix_aware", 2, load_bound=-1)
