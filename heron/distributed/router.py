"""Router: which data-parallel replica serves a request (--data-parallel-policy).

What it owns: the routing decision and the bookkeeping behind it, all in the API process and all
counted by the router itself (never read back from the replicas, which answer only between steps):
requests in flight per replica (`started` / `finished`), which replicas are dead (`mark_dead`: never
chosen again), per-replica counts of requests routed and of those routed by prefix affinity, and for
`prefix_aware` a bounded LRU map from KV-block hash to the replica that last served that block.

Why prefix affinity: every replica has its own prefix cache, so a prompt whose leading blocks (a long
system prompt shared by many users) are cached on replica A prefills only its tail there, and all of
it anywhere else. The router hashes the prompt's full KV blocks as a chain, block k's hash covering
blocks 0..k and the request's cache_salt (the engine salts its prefix cache per key, so two salts
never share blocks: they must not share affinity either), and picks the replica that served the
longest matching prefix most recently.

Why the load bound: affinity alone sends a hot prefix's whole traffic to the one replica that first
served it; with one system prompt behind most requests that replica queues everything while the
others idle, and the prefill saved is far less than the queueing added. So a prefix's replica is
taken only while its load (requests in flight there) is at most the least loaded live replica's load
plus `load_bound`; past that the request goes to the least loaded replica, which then holds the
prefix too (the map records the chosen replica for every block of the prompt), so a hot prefix
spreads over just as many replicas as its traffic needs. A replica with a shorter match that is still
within the bound beats falling back to no match at all.

Ties (least_loaded, and the fallback of prefix_aware): among equally loaded live replicas the first
one at or after a rotating cursor wins, so an idle pool is filled evenly (not always replica 0) and
runs are reproducible for a given sequence of calls. round_robin rotates over the live replicas.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from heron.engine.errors import EngineDeadError

POLICIES = ("prefix_aware", "least_loaded", "round_robin")
# Block hashes remembered for prefix affinity: 64k blocks of 16 tokens cover ~1M prompt tokens, a few
# MB of dict in the API process.
DEFAULT_MAX_TRACKED_BLOCKS = 1 << 16


class NoLiveReplicaError(EngineDeadError):
    """Every replica is dead: nothing can serve the request."""


def block_hashes(prompt_token_ids: Sequence[int], block_size: int, cache_salt: str | None = None) -> list[int]:
    """Chain hashes of the prompt's full blocks: element k covers blocks 0..k and the salt."""
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(prompt_token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(prompt_token_ids[start : start + block_size]), cache_salt))
        hashes.append(parent)
    return hashes


class Router:
    def __init__(
        self,
        policy: str,
        num_replicas: int,
        block_size: int = 16,
        load_bound: int = 4,
        max_tracked: int = DEFAULT_MAX_TRACKED_BLOCKS,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown data-parallel policy {policy!r} (one of {', '.join(POLICIES)})")
        if num_replicas < 1:
            raise ValueError("a router needs at least one replica")
        if block_size < 1 or load_bound < 0 or max_tracked < 1:
            raise ValueError("block_size and max_tracked must be positive, load_bound 0 or more")
        self.policy = policy
        self.num_replicas = num_replicas
        self.block_size = block_size
        self.load_bound = load_bound
        self.max_tracked = max_tracked
        self._loads = [0] * num_replicas
        self._dead: set[int] = set()
        self._cursor = 0  # the next replica round robin (and tie-breaking) starts from
        self._owners: OrderedDict[int, int] = OrderedDict()  # block hash -> replica, oldest first
        self.routed = [0] * num_replicas  # requests chosen for each replica
        self.affinity_routed = [0] * num_replicas  # ... of which by a matching prefix

    # ----------------------------------------------------------------- bookkeeping

    @property
    def loads(self) -> list[int]:
        """Requests in flight per replica (started and not yet finished)."""
        return list(self._loads)

    @property
    def num_tracked(self) -> int:
        """Block hashes remembered for prefix affinity (at most max_tracked)."""
        return len(self._owners)

    def started(self, index: int) -> None:
        self._loads[index] += 1

    def finished(self, index: int) -> None:
        if self._loads[index] > 0:
            self._loads[index] -= 1

    def mark_dead(self, index: int) -> None:
        """Never route to `index` again (its process died)."""
        self._dead.add(index)

    def is_dead(self, index: int) -> bool:
        return index in self._dead

    @property
    def live(self) -> list[int]:
        return [i for i in range(self.num_replicas) if i not in self._dead]

    # ----------------------------------------------------------------- choosing

    def choose(self, prompt_token_ids: Sequence[int], cache_salt: str | None = None) -> int:
        """The replica for a request; raises NoLiveReplicaError when every replica is dead. The
        caller calls `started(i)` when the request is handed to it and `finished(i)` at its end."""
        live = self.live
        if not live:
            raise NoLiveReplicaError(f"all {self.num_replicas} engine replicas are dead")
        by_affinity = False
        if self.policy == "round_robin":
            chosen = self._rotate(live)
        elif self.policy == "least_loaded":
            chosen = self._least_loaded(live)
        else:
            hashes = block_hashes(prompt_token_ids, self.block_size, cache_salt)
            matched = self._prefix_choice(hashes, live)
            by_affinity = matched is not None
            chosen = matched if matched is not None else self._least_loaded(live)
            self._record(hashes, chosen)
        self.routed[chosen] += 1
        if by_affinity:
            self.affinity_routed[chosen] += 1
        return chosen

    def _rotate(self, live: list[int]) -> int:
        chosen = next((i for i in live if i >= self._cursor), live[0])
        self._cursor = (chosen + 1) % self.num_replicas
        return chosen

    def _least_loaded(self, live: list[int]) -> int:
        least = min(self._loads[i] for i in live)
        return self._rotate([i for i in live if self._loads[i] == least])

    def _prefix_choice(self, hashes: list[int], live: list[int]) -> int | None:
        """The live replica with the longest matching prefix whose load is within the bound."""
        if not hashes:
            return None
        matched: dict[int, int] = {}  # replica -> blocks matched (the deepest block it owns)
        for depth, block_hash in enumerate(hashes, 1):
            owner = self._owners.get(block_hash)
            if owner is None:
                break  # a chain hash: no deeper block can match either
            if owner not in self._dead:
                matched[owner] = depth
        if not matched:
            return None
        ceiling = min(self._loads[i] for i in live) + self.load_bound
        for replica in sorted(matched, key=lambda r: (-matched[r], self._loads[r], r)):
            if self._loads[replica] <= ceiling:
                return replica
        return None

    def _record(self, hashes: list[int], chosen: int) -> None:
        # Deepest first, so a prompt's leading blocks are the most recently used: eviction takes a
        # prefix's tail before its head, and a lookup walking from block 0 still finds the head.
        owners = self._owners
        for block_hash in reversed(hashes):
            owners[block_hash] = chosen
            owners.move_to_end(block_hash)
        while len(owners) > self.max_tracked:
            owners.popitem(last=False)
