"""What a card reader hands out besides KV (spec/cachecard-1.md §10): verification reports, undecoded chunks,
and where a shard lies for readers that stream it themselves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.abc.store import Store


@dataclass(frozen=True)
class VerifyReport:
    card_id: str
    format: str
    tokens: int
    objects: int
    stored_bytes: int
    chunks_checked: int
    bound: bool = False          # format 1.3+: every object checked against the object table (spec §7.2)
    authenticated: bool = False  # the HMAC verified under the store key (spec §7.4)
    unlisted: tuple[str, ...] = ()  # objects stored under a bound card that its table does not list (ignored)


@dataclass(frozen=True)
class EncodedChunk:
    """One stored inner chunk of K or V: layer, tokens ``[token_start, token_start + tokens)`` (the chunk
    holds ``chunk_tokens`` rows; rows past ``tokens`` are the writer's padding) and the serializer payload."""

    layer: int
    token_start: int
    tokens: int
    payload: np.ndarray  # uint8, crc32c verified and stripped


@dataclass(frozen=True)
class EncodedKV:
    """Undecoded chunks of one card array (``k`` or ``v``), in (layer, token) order."""

    codec: Any                          # the zarr array-to-bytes codec (serializer) of every chunk
    chunk_shape: tuple[int, int, int, int]  # (1, kv_heads, chunk_tokens, head_dim)
    chunks: list[EncodedChunk]
    buffer: np.ndarray | None = None    # every payload, back to back, in order (None when nothing was read)


@dataclass(frozen=True)
class ShardLayout:
    """K or V of a format 1.1+ card as stored: one shard object whose inner chunks are ``payload + crc32c``.

    ``index`` holds ``(offset, nbytes)`` per inner chunk in grid order (layer-major, then token chunk), already
    checked (its crc32c, and its digest on a bound card); ``expected_crcs`` (layers, token chunks), where the
    card's manifest binds every chunk's crc32c (format 1.3), else ``None``."""

    which: str
    label: str
    store: Store
    key: str
    size: int
    index: np.ndarray
    chunk_shape: tuple[int, ...]    # (1, kv_heads, chunk_tokens, head_dim)
    shape: tuple[int, ...]          # (layers, kv_heads, tokens, head_dim)
    serializer: Any
    storage: np.dtype
    expected_crcs: np.ndarray | None = None


__all__ = ["EncodedChunk", "EncodedKV", "ShardLayout", "VerifyReport"]
