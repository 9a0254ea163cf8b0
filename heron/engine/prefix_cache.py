"""The prefix cache: which physical KV blocks hold which token content, and which of them may be evicted.

Owns the map from a chained block hash to the one cached block holding that content, each cached
block's identity record (`CachedBlock`), the parent -> children links between cached blocks, and the
LRU order of cached blocks that no live request references. `KVCache` is its only caller: it inserts
blocks as they become full, looks prefixes up for new requests, marks blocks evictable or in use as
their reference counts cross zero, and evicts the least recently freed block when it runs out of
truly free ones; eviction hands back the block ids that became free. Cost is O(blocks touched);
nothing scans the pool. Pure Python, no torch.

Invariant: a cached block's parent is cached too. Forgetting a block forgets its descendants,
because a lookup chain could never reach them again.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class CachedBlock:
    """What one cached block holds, kept so a lookup can prove a hash match is a content match."""

    block_id: int
    block_hash: int
    parent_hash: int | None
    token_ids: tuple[int, ...]
    cache_salt: str | None
    # Serials are never reused, so `parent_serial` pins the exact cached block this one was computed
    # after: a chain of verified lookups then matches the whole prefix, not just equal 64-bit hashes
    # (Python's tuple hash is not collision resistant against crafted token ids).
    serial: int
    parent_serial: int | None


class PrefixCache:
    """Hash -> cached block map with LRU eviction of blocks no request references."""

    def __init__(self) -> None:
        self._cached_by_hash: dict[int, CachedBlock] = {}
        self._cached_by_block_id: dict[int, CachedBlock] = {}
        self._cached_by_serial: dict[int, CachedBlock] = {}
        self._child_serials: dict[int, set[int]] = {}
        # Insertion order is the eviction order: least recently freed first.
        self._evictable_block_ids: OrderedDict[int, None] = OrderedDict()
        self._serials = itertools.count()

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached_by_block_id)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable_block_ids)

    def get(self, block_id: int) -> CachedBlock | None:
        return self._cached_by_block_id.get(block_id)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._cached_by_block_id

    def is_evictable(self, block_id: int) -> bool:
        return block_id in self._evictable_block_ids

    def is_live(self, serial: int) -> bool:
        return serial in self._cached_by_serial

    def lookup(
        self,
        block_hash: int,
        token_ids: tuple[int, ...],
        cache_salt: str | None,
        parent_serial: int | None,
    ) -> CachedBlock | None:
        """The cached block holding exactly this content after exactly this parent, or None."""
        cached = self._cached_by_hash.get(block_hash)
        if cached is None:
            return None
        if (
            cached.parent_serial != parent_serial
            or cached.token_ids != token_ids
            or cached.cache_salt != cache_salt
        ):
            # A hash collision: never serve KV computed for other tokens.
            return None
        return cached

    def insert(
        self,
        block_id: int,
        block_hash: int,
        parent_hash: int | None,
        token_ids: tuple[int, ...],
        cache_salt: str | None,
        parent_serial: int | None,
    ) -> CachedBlock | None:
        """Cache a referenced block under `block_hash`; None if the hash is already taken.

        The first block cached for a hash wins, so a duplicate computed concurrently stays private
        to its request and the map never points at two blocks.
        """
        if block_hash in self._cached_by_hash:
            return None
        if block_id in self._cached_by_block_id:
            raise ValueError(f"block {block_id} is already cached")
        if parent_serial is not None and parent_serial not in self._cached_by_serial:
            raise ValueError(f"parent serial {parent_serial} of block {block_id} is not cached")
        cached = CachedBlock(
            block_id=block_id,
            block_hash=block_hash,
            parent_hash=parent_hash,
            token_ids=token_ids,
            cache_salt=cache_salt,
            serial=next(self._serials),
            parent_serial=parent_serial,
        )
        self._cached_by_hash[block_hash] = cached
        self._cached_by_block_id[block_id] = cached
        self._cached_by_serial[cached.serial] = cached
        if parent_serial is not None:
            self._child_serials.setdefault(parent_serial, set()).add(cached.serial)
        return cached

    def mark_evictable(self, block_id: int) -> None:
        """A cached block's last reference was dropped: it stays findable but may be reclaimed."""
        self._evictable_block_ids[block_id] = None
        self._evictable_block_ids.move_to_end(block_id)

    def mark_in_use(self, block_id: int) -> None:
        """A prefix hit took a reference on an evictable block: it must not be reclaimed now."""
        del self._evictable_block_ids[block_id]

    def evict(self) -> list[int]:
        """Reclaim the least recently freed unreferenced block and forget its descendants.

        Returns the blocks that became free: the victim first, then any unreferenced descendants.
        Referenced descendants stay with their requests, merely uncached.
        """
        block_id, _ = self._evictable_block_ids.popitem(last=False)
        root = self._cached_by_block_id[block_id]
        if root.parent_serial is not None:
            siblings = self._child_serials[root.parent_serial]
            siblings.discard(root.serial)
            if not siblings:
                del self._child_serials[root.parent_serial]
        freed_block_ids = [block_id]
        pending = [root]
        while pending:
            cached = pending.pop()
            del self._cached_by_hash[cached.block_hash]
            del self._cached_by_block_id[cached.block_id]
            del self._cached_by_serial[cached.serial]
            for child_serial in self._child_serials.pop(cached.serial, ()):
                child = self._cached_by_serial[child_serial]
                pending.append(child)
                if child.block_id in self._evictable_block_ids:
                    del self._evictable_block_ids[child.block_id]
                    freed_block_ids.append(child.block_id)
        return freed_block_ids

    def evict_all(self) -> list[int]:
        """Forget every cached block; only valid when none is referenced. Returns the freed ids."""
        if len(self._evictable_block_ids) != len(self._cached_by_block_id):
            raise RuntimeError("cannot drop the prefix cache while requests reference cached blocks")
        block_ids = list(self._evictable_block_ids)
        self._evictable_block_ids.clear()
        self._cached_by_block_id.clear()
        self._cached_by_hash.clear()
        self._cached_by_serial.clear()
        self._child_serials.clear()
        return block_ids
