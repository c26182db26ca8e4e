"""Token-level rate allocation shared by the mixed-precision codecs (spec/codecs/frontier.md §Token classes).

Which tokens of a chunk deserve more bits: attention sinks (the first positions of the sequence), the most
recent window of the card, and salient tokens (largest vector norm, summed over heads: value norm for V,
key norm for K, as ZipCache/VATP do). Sinks and the recent window need the chunk context; without it (a plain
zarr write) only salience applies. The decision is recorded in the chunk, so decoding never repeats it.
"""

from __future__ import annotations

import numpy as np

from cachecard.codecs.base import ChunkContext


def protected(x: np.ndarray, ctx: ChunkContext, *, sinks: int, recent: int, salient: float) -> np.ndarray:
    """Boolean mask over the chunk's tokens (axis 1 of ``x``, float32 ``(G, T, D)``) of tokens kept at high
    rate."""
    t = x.shape[1]
    mask = np.zeros(t, dtype=bool)
    valid = t if ctx.valid_tokens is None else ctx.valid_tokens
    if ctx.known:
        if sinks and ctx.positions is not None:
            mask |= np.asarray(ctx.positions[:t]) < sinks
        if recent and ctx.card_tokens is not None:
            index = ctx.token_start + np.arange(t)
            mask |= (index >= ctx.card_tokens - recent) & (index < ctx.card_tokens)
    mask[valid:] = False  # padding is never worth bits
    if salient > 0:
        norms = np.sqrt(np.einsum("gtd,gtd->t", x, x, dtype=np.float32))
        candidates = np.flatnonzero(~mask[:valid])
        k = int(np.floor(salient * len(candidates)))
        if k:
            # stable order: ties go to the earlier token, so encoding stays deterministic
            order = np.argsort(-norms[candidates], kind="stable")[:k]
            mask[candidates[order]] = True
    return mask


def pack_mask(mask: np.ndarray) -> bytes:
    return np.packbits(mask.astype(np.uint8), bitorder="little").tobytes()


def unpack_mask(data: np.ndarray, t: int) -> np.ndarray:
    return np.unpackbits(data, bitorder="little", count=t).astype(bool)


def encode_protected(rows: np.ndarray) -> bytes:
    """Protected vectors (N, D), already rotated: fp16 scales ``absmax / 127`` then int8 codes (spec/codecs/
    frontier.md "Format"; mixed.md uses the same layout)."""
    s16 = (np.abs(rows).max(axis=1) / np.float32(127)).astype("<f2") if rows.size else np.zeros(0, "<f2")
    s = s16.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.clip(np.rint(rows / s), -127, 127), 0).astype(np.int8)
    return s16.tobytes() + q.tobytes()
