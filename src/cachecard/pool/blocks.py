"""Block accounting of a pool (DESIGN.md §4 "Hot tier"): free list, reference counts, shared prefix blocks.

A block is used by every agent whose block table lists it (its reference count). A *full* block whose tokens
and whole prefix are known gets a chained hash, ``h_i = H(h_{i-1}, tokens of block i)`` with ``h_-1`` naming
the model, resident codec and block size (never Python's ``hash()``: it differs between processes), and is
registered under it: an agent whose sequence starts with the same tokens references the registered block
instead of holding its own copy. Only a block no agent references may be reused; a registered one then
stays findable ("cached") until its memory is needed, least recently released first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

HASH_BYTES = 16
_PERSON = b"cachecard-pool"


def root_hash(model_key: bytes, codec: str, block_tokens: int) -> bytes:
    """The chain's start: blocks of another model, resident codec or block size never match."""
    return hashlib.blake2b(model_key + f"|{codec}|{block_tokens}".encode(), digest_size=HASH_BYTES,
                           person=_PERSON).digest()


def chain(prev: bytes, tokens: np.ndarray) -> bytes:
    """The hash of a block of ``tokens`` (int32 little-endian) after the block hashed ``prev``."""
    return hashlib.blake2b(prev + np.asarray(tokens, dtype="<i4").tobytes(), digest_size=HASH_BYTES,
                           person=_PERSON).digest()


class BlockAllocator:
    """Which blocks are free, which are referenced and how often, and which hold a registered prefix."""

    def __init__(self, blocks: int) -> None:
        self.total = blocks
        self.refs = np.zeros(blocks, dtype=np.int64)
        self._free = list(range(blocks - 1, -1, -1))           # a stack: low ids first
        self._cached: OrderedDict[int, bytes] = OrderedDict()  # unreferenced registered blocks, LRU first
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    # -- counts ---------------------------------------------------------------------------------------------
    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached and reclaimable)."""
        return len(self._free) + len(self._cached)

    def used(self) -> int:
        """Blocks some agent references."""
        return self.total - self.available()

    def cached(self) -> int:
        return len(self._cached)

    def shared(self) -> int:
        """Blocks referenced by more than one agent."""
        return int(np.count_nonzero(self.refs > 1))

    # -- allocation -----------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """``n`` blocks with one reference each (the caller checked :meth:`available`)."""
        if n > self.available():
            raise RuntimeError(f"allocate({n}) with {self.available()} blocks available")  # a pool bug
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # reclaim the least recently released prefix block
                b, h = self._cached.popitem(last=False)
                del self._by_hash[h], self._hash_of[b]
            self.refs[b] = 1
            out.append(b)
        return out

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refs[b] == 0:
                self._cached.pop(b)  # only registered blocks are findable while unreferenced
            self.refs[b] += 1

    def decref(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] < 0:
                raise RuntimeError(f"block {b} released more often than referenced")  # a pool bug
            if self.refs[b] == 0:
                if b in self._hash_of:
                    self._cached[b] = self._hash_of[b]
                else:
                    self._free.append(b)

    # -- shared prefixes ----------------------------------------------------------------------------------
    def register(self, block: int, h: bytes) -> None:
        """Make a full block findable under its chained hash (the first block registered for a hash wins)."""
        if h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h] = block
            self._hash_of[block] = h

    def lookup(self, h: bytes) -> int | None:
        """The registered block of this hash (referenced or cached), or None."""
        return self._by_hash.get(h)

    def is_registered(self, block: int) -> bool:
        return block in self._hash_of


__all__ = ["BlockAllocator", "HASH_BYTES", "chain", "root_hash"]
