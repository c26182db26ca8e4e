"""Prefix hashes of token sequences (spec/store-1.md §3): the keys every index backend stores and looks up.

Chained block hashes, the same in every process and on every machine (never Python ``hash()``):

    h_-1 = model_key                                   (32 bytes: SHA-256 of the model identity, see below)
    h_i  = BLAKE2b-128(h_{i-1} || tokens[iB:(i+1)B])   (tokens as little-endian int32, personalization ``PERSON``)

``model_key`` is the SHA-256 of the RFC 8785 JSON of the card manifest's ``ModelIdentity`` without ``name``,
so two processes agree on it exactly when the identity check of cachecard-1.md §6 would. A card indexes every
full block of its *whole* sequence (its parent's prefix included), so the set of indexed blocks is
prefix-closed and the longest cached prefix is found by binary search over the query's chain. A sequence
whose length is not a multiple of ``B`` also has a tail: under the key of its last full block (or
``model_key[:16]``), its length and ``H(h_last, tail tokens)``, so a match can end exactly where a card ends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import rfc8785

from cachecard.manifest import ModelIdentity

PERSON = b"cachecard.blk.v1"   # BLAKE2b personalization: block hashes of this scheme, version 1
HASH_BYTES = 16

_MODEL_KEYS: dict[int, tuple[ModelIdentity, bytes]] = {}


def model_key(model: ModelIdentity) -> bytes:
    """SHA-256 of the identity's RFC 8785 JSON without ``name`` (32 bytes). Cached per (frozen) identity
    object: serializing it costs more than a whole prefix lookup."""
    hit = _MODEL_KEYS.get(id(model))
    if hit is not None and hit[0] is model:
        return hit[1]
    key = hashlib.sha256(rfc8785.dumps(model.model_dump(mode="json", exclude={"name"}))).digest()
    if len(_MODEL_KEYS) > 256:
        _MODEL_KEYS.clear()
    _MODEL_KEYS[id(model)] = (model, key)
    return key


def block_hash(prev: bytes, raw: bytes) -> bytes:
    """``H(prev || raw)``: one link of the chain (``raw`` is int32 LE token bytes)."""
    return hashlib.blake2b(prev + raw, digest_size=HASH_BYTES, person=PERSON).digest()


def token_bytes(tokens: np.ndarray) -> bytes:
    """Token ids as the hashed byte string: little-endian int32."""
    return np.ascontiguousarray(tokens, dtype="<i4").tobytes()


def chain(mkey: bytes, raw: bytes, block: int) -> list[bytes]:
    """h_0 … h_{n-1} of the full blocks of ``raw`` (int32 LE token bytes)."""
    out = []
    h = mkey
    step = 4 * block
    for i in range(len(raw) // step):
        h = block_hash(h, raw[i * step:(i + 1) * step])
        out.append(h)
    return out


def tail_key(mkey: bytes, hashes: list[bytes]) -> bytes:
    """Where a tail is filed: the last full block's hash, or ``model_key[:16]`` when there is none."""
    return hashes[-1] if hashes else mkey[:HASH_BYTES]


def tail_hash(mkey: bytes, hashes: list[bytes], raw_tail: bytes) -> bytes:
    return block_hash(hashes[-1] if hashes else mkey, raw_tail)


@dataclass(frozen=True)
class TailEntry:
    """A sequence's tokens after its last full block: filed under ``key``, ``length`` tokens, hash ``hash``."""

    key: bytes
    length: int
    hash: bytes


@dataclass(frozen=True)
class SequenceKeys:
    """Everything an index needs to file or look up one whole token sequence of one model."""

    model_key: bytes
    block: int                    # B, tokens per block
    raw: bytes                    # the tokens, int32 LE
    hashes: tuple[bytes, ...]     # h_0 … h_{n-1} of the full blocks
    tail: TailEntry | None        # the partial last block, if any

    @property
    def tokens(self) -> int:
        return len(self.raw) // 4

    def tail_hash_at(self, blocks: int, length: int) -> bytes:
        """The tail hash of this sequence's ``length`` tokens after its first ``blocks`` full blocks."""
        prev = self.hashes[blocks - 1] if blocks else self.model_key
        start = blocks * self.block
        return block_hash(prev, self.raw[4 * start:4 * (start + length)])


def keys_of(mkey: bytes, tokens: np.ndarray, block: int) -> SequenceKeys:
    """The prefix keys of a whole sequence ``tokens`` of the model with key ``mkey``."""
    raw = token_bytes(tokens)
    hashes = chain(mkey, raw, block)
    n = len(raw) // 4
    t = n - len(hashes) * block
    tail = TailEntry(tail_key(mkey, hashes), t, tail_hash(mkey, hashes, raw[4 * (n - t):])) if t else None
    return SequenceKeys(mkey, block, raw, tuple(hashes), tail)
