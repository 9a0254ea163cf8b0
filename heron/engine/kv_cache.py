"""The paged KV-cache block manager: which physical blocks each request owns, and prefix reuse.

Owns the block pool's bookkeeping (reference counts, the free list, each request's block table)
and a `PrefixCache` of full blocks keyed by chained content hashes. The scheduler calls it:
`get_computed_blocks(request)` finds a cached prefix, `allocate_slots(request, ...)` grows the
request's block table (all-or-nothing) and registers newly full blocks, `free(request)` drops its
references. The workers only ever see block ids. Pure Python, no torch; every call costs
O(blocks it touches), never O(pool).

Each block is in exactly one state: truly free (on the free list), referenced by one or more live
requests (ref count > 0, possibly also cached), or cached but unreferenced (evictable, LRU order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from heron.engine.prefix_cache import CachedBlock, PrefixCache

if TYPE_CHECKING:
    from heron.engine.request import Request


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...], cache_salt: str | None) -> int:
    """Chained content hash of one full block; equal hashes are re-verified before any reuse."""
    return hash((parent_hash, token_ids, cache_salt))


@dataclass(slots=True)
class _RequestBlocks:
    """One live request's block table and how far its blocks have been offered to the prefix cache."""

    block_ids: list[int] = field(default_factory=list)
    # Leading blocks of `block_ids` already registered (or resolved to an equal cached block).
    num_registered_blocks: int = 0
    # Serial of the cached block holding the content of block `num_registered_blocks - 1`.
    last_serial: int | None = None
    # Cleared after a hash collision, or once the cached block it chains through is evicted:
    # later blocks of this request could not be chained to anything findable.
    cacheable: bool = True


class KVCache:
    """Ref-counted paged KV blocks with hash-based prefix caching and LRU eviction."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache = PrefixCache()
        self._ref_counts: list[int] = [0] * num_blocks
        # A stack popped from the end; reversed so a fresh pool hands out block 0 first.
        self._free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))
        self._requests: dict[str, _RequestBlocks] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids) + self.prefix_cache.num_evictable_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_block_ids(self, request_id: str, start: int = 0) -> list[int]:
        """The request's block table from block `start` on (a live request's table only grows)."""
        state = self._requests.get(request_id)
        # A copy, so a table handed to the runner cannot change under it when the request grows.
        return state.block_ids[start:] if state is not None else []

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached full-block prefix of the request's tokens, without taking references."""
        if not self.enable_prefix_caching:
            return [], 0
        num_tokens = request.num_tokens
        # Leave at least one token to compute so the model still produces logits for it.
        max_hit_blocks = max(0, (num_tokens - 1) // self.block_size)
        self._extend_block_hashes(request, max_hit_blocks)
        block_size = self.block_size
        token_ids = request.all_token_ids
        block_hashes = request.block_hashes
        cache_salt = request.cache_salt
        hit_block_ids: list[int] = []
        parent_serial: int | None = None
        for i in range(max_hit_blocks):
            cached = self.prefix_cache.lookup(
                block_hashes[i],
                tuple(token_ids[i * block_size : (i + 1) * block_size]),
                cache_salt,
                parent_serial,
            )
            if cached is None:
                break
            hit_block_ids.append(cached.block_id)
            parent_serial = cached.serial
        num_hit_tokens = len(hit_block_ids) * block_size
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hit_block_ids, num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[int] = (),
    ) -> list[int] | None:
        """Grow the request's table to cover its next step; None (and no change) if the pool is short.

        `new_computed_blocks` are prefix hits from `get_computed_blocks` in this same scheduling pass,
        for a request that holds no blocks yet. No other allocation may run between the two calls:
        a hit block evicted in between raises ValueError rather than serve another prefix's KV.
        Blocks registered here may be hit by requests scheduled later in the same step, before
        this step's forward has written them; the runner must write a layer's KV before attending.
        """
        block_size = self.block_size
        state = self._requests.get(request.request_id)
        num_hit_blocks = len(new_computed_blocks)
        num_required_tokens = request.num_computed_tokens + num_hit_blocks * block_size + num_new_tokens
        num_fresh_blocks = -(-num_required_tokens // block_size) - num_hit_blocks
        if state is not None:
            num_fresh_blocks -= len(state.block_ids)

        num_revived_blocks = 0
        if num_hit_blocks:
            if state is not None and state.block_ids:
                raise ValueError(f"prefix hits given for {request.request_id!r}, which already holds blocks")
            self._check_prefix_hits(request, new_computed_blocks)
            ref_counts = self._ref_counts
            num_revived_blocks = sum(1 for block_id in new_computed_blocks if ref_counts[block_id] == 0)
        # Reviving a hit block takes it out of the evictable set, so it cannot also be handed out fresh.
        if num_fresh_blocks > 0 and num_fresh_blocks > self.num_free_blocks - num_revived_blocks:
            return None

        if state is None:
            state = self._requests[request.request_id] = _RequestBlocks()
        if num_hit_blocks:
            ref_counts = self._ref_counts
            for block_id in new_computed_blocks:
                if ref_counts[block_id] == 0:
                    self.prefix_cache.mark_in_use(block_id)
                ref_counts[block_id] += 1
            state.block_ids.extend(new_computed_blocks)
        if num_fresh_blocks > 0:
            new_block_ids = [self._take_free_block() for _ in range(num_fresh_blocks)]
            state.block_ids.extend(new_block_ids)
        else:
            new_block_ids = []

        if self.enable_prefix_caching and state.cacheable:
            # Only blocks whose every token is known and will have KV after this step may be shared.
            num_full_blocks = min(num_required_tokens, len(request.all_token_ids)) // block_size
            if num_full_blocks > state.num_registered_blocks:
                self._register_full_blocks(request, state, num_full_blocks)
        return new_block_ids

    def free(self, request: Request) -> None:
        """Drop the request's references; shared and cached blocks survive as others need them."""
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return
        ref_counts = self._ref_counts
        # Tail first: a request's deepest blocks are the least likely to be shared, so they should
        # be the first to be evicted, and the shared head of a prompt the last.
        for block_id in reversed(state.block_ids):
            ref_counts[block_id] -= 1
            if ref_counts[block_id] == 0:
                if self.prefix_cache.is_cached(block_id):
                    self.prefix_cache.mark_evictable(block_id)
                else:
                    self._free_block_ids.append(block_id)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (e.g. after a weight reload); refused while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self._free_block_ids.extend(self.prefix_cache.evict_all())
        return True

    def _check_prefix_hits(self, request: Request, hit_block_ids: Sequence[int]) -> None:
        """Refuse hits that no longer hold this request's prefix (evicted and reused since lookup)."""
        block_size = self.block_size
        token_ids = request.all_token_ids
        parent_serial: int | None = None
        for i, block_id in enumerate(hit_block_ids):
            cached = self.prefix_cache.get(block_id)
            if (
                cached is None
                or cached.parent_serial != parent_serial
                or cached.cache_salt != request.cache_salt
                or cached.token_ids != tuple(token_ids[i * block_size : (i + 1) * block_size])
            ):
                raise ValueError(
                    f"block {block_id} no longer holds prefix block {i} of {request.request_id!r}; "
                    "call allocate_slots right after get_computed_blocks"
                )
            parent_serial = cached.serial

    def _take_free_block(self) -> int:
        # Truly free blocks first: evicting cached content is the last resort.
        if not self._free_block_ids:
            # Eviction may free more than one block (descendants of the victim that nobody can
            # reach any more); the extras simply join the free list.
            freed_block_ids = self.prefix_cache.evict()
            self._free_block_ids.extend(reversed(freed_block_ids))
        block_id = self._free_block_ids.pop()
        self._ref_counts[block_id] = 1
        return block_id

    def _extend_block_hashes(self, request: Request, num_full_blocks: int) -> None:
        """Hash the request's full blocks up to `num_full_blocks`, continuing where it left off."""
        block_hashes = request.block_hashes
        if len(block_hashes) >= num_full_blocks:
            return
        block_size = self.block_size
        token_ids = request.all_token_ids
        cache_salt = request.cache_salt
        parent_hash = block_hashes[-1] if block_hashes else None
        for i in range(len(block_hashes), num_full_blocks):
            parent_hash = hash_block(
                parent_hash, tuple(token_ids[i * block_size : (i + 1) * block_size]), cache_salt
            )
            block_hashes.append(parent_hash)

    def _register_full_blocks(self, request: Request, state: _RequestBlocks, num_full_blocks: int) -> None:
        """Offer the request's newly full blocks to the prefix cache, chaining each to its parent."""
        self._extend_block_hashes(request, num_full_blocks)
        block_size = self.block_size
        token_ids = request.all_token_ids
        block_hashes = request.block_hashes
        cache_salt = request.cache_salt
        prefix_cache = self.prefix_cache
        parent_serial = state.last_serial
        if parent_serial is not None and not prefix_cache.is_live(parent_serial):
            # The cached block our last full block chains through was evicted (it was a twin of our
            # private duplicate, or an ancestor of it was): nothing chained to it could ever be found.
            state.cacheable = False
            return
        for i in range(state.num_registered_blocks, num_full_blocks):
            block_id = state.block_ids[i]
            block_hash = block_hashes[i]
            cached = prefix_cache.get(block_id)
            if cached is None:
                block_token_ids = tuple(token_ids[i * block_size : (i + 1) * block_size])
                parent_hash = block_hashes[i - 1] if i > 0 else None
                cached = self._cache_block(
                    block_id, block_hash, parent_hash, block_token_ids, cache_salt, parent_serial
                )
                if cached is None:
                    state.cacheable = False
                    return
            elif cached.block_hash != block_hash or cached.parent_serial != parent_serial:
                # Only prefix hits arrive here already cached, and lookup chained them exactly so.
                raise RuntimeError(f"block {block_id} of {request.request_id!r} is cached with other content")
            parent_serial = cached.serial
            state.num_registered_blocks = i + 1
            state.last_serial = parent_serial

    def _cache_block(
        self,
        block_id: int,
        block_hash: int,
        parent_hash: int | None,
        token_ids: tuple[int, ...],
        cache_salt: str | None,
        parent_serial: int | None,
    ) -> CachedBlock | None:
        """Cache one block, or find the equal block cached first; None on a hash collision."""
        prefix_cache = self.prefix_cache
        cached = prefix_cache.insert(block_id, block_hash, parent_hash, token_ids, cache_salt, parent_serial)
        if cached is not None:
            return cached
        # Same content computed twice (two requests prefilled the same prefix at once): keep the
        # first copy cached; this request keeps its private duplicate and chains through the first.
        return prefix_cache.lookup(block_hash, token_ids, cache_salt, parent_serial)
