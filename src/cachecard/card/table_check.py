"""The object table's check of chunks as the shard readers meet them (spec/cachecard-1.md §7.2): each inner
chunk's stored CRC-32C must be the table's value for its (layer, token chunk), so a chunk from another card,
the other array or another position cannot pass; and a shard file that cannot be opened is a damaged card."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from cachecard.errors import CorruptCardError

TABLE_MISMATCH = ("its CRC-32C is not the object table's for this position (a chunk from another card, array or "
                  "position)")


def misplaced(expected: np.ndarray | None, layer: int, j: int, stored: int) -> bool:
    """Whether a chunk's stored CRC-32C differs from the object table's value for its grid position."""
    return expected is not None and int(expected[layer, j]) != int(stored)


def first_misplaced(expected: np.ndarray | None, chunks: list[Any], stored: np.ndarray) -> int:
    """Index of the first of ``chunks`` whose stored CRC-32C (``stored``, one per chunk) is not the table's for
    its position, or -1: one vectorised comparison per run instead of one per chunk."""
    if expected is None or not chunks:
        return -1
    layers = np.fromiter((ck.layer for ck in chunks), np.intp, len(chunks))
    js = np.fromiter((ck.j for ck in chunks), np.intp, len(chunks))
    bad = np.flatnonzero(expected[layers, js] != stored)
    return int(bad[0]) if len(bad) else -1


@contextlib.contextmanager
def unreadable_is_corrupt(label: str, name: str, key: str) -> Iterator[None]:
    """A shard file that cannot be opened or read (a symbolic link: O_NOFOLLOW; a directory) is a damaged card."""
    try:
        yield
    except OSError as e:
        raise CorruptCardError(f"object {key!r} cannot be read ({e.strerror or e}); the card is damaged: delete it "
                               "and save again", card=label, part=name) from e


__all__ = ["TABLE_MISMATCH", "first_misplaced", "misplaced", "unreadable_is_corrupt"]
