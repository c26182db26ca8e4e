"""Array names, shapes, chunking and storage dtypes of a card (spec/cachecard-1.md §4–5).

Format 1.1 (written): two layer-stacked arrays ``k`` and ``v`` of shape (layers, kv_heads, tokens, head_dim),
inner chunks of one layer × ``chunk_tokens`` tokens inside shards that hold every layer, so a card is a
handful of objects while a layer range or a token prefix still reads only the chunks it needs.
Format 1.0 (read only): one array per layer, ``k/<layer>`` and ``v/<layer>`` of shape
(kv_heads, tokens, head_dim), unsharded — about a thousand objects for a 4K-token card of a 30-layer model.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

DEFAULT_CHUNK_TOKENS = 256  # mlx-lm grows its cache in steps of 256 too
TOKEN_CHUNK = 65536         # tokens / positions: one object up to 64K tokens
KV_DIMENSIONS = ("layer", "kv_head", "token", "channel")

STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # zarr 3 has no bfloat16: the bit patterns are stored as uint16
}


def kv_shape(num_layers: int, num_kv_heads: int, tokens: int, head_dim: int) -> tuple[int, int, int, int]:
    return (num_layers, num_kv_heads, tokens, head_dim)


def balanced_chunk(tokens: int, max_chunk: int) -> int:
    """The chunk length: at most ``max_chunk``, as few chunks as that allows, sized so the last chunk is
    nearly full. zarr stores an edge chunk at full size, so 42 tokens in a 256-token chunk would store 256;
    balanced, the padding is under one token per chunk."""
    if tokens <= 0:
        return max_chunk
    return math.ceil(tokens / math.ceil(tokens / max_chunk))


def kv_chunks(num_kv_heads: int, head_dim: int, chunk_tokens: int) -> tuple[int, int, int, int]:
    return (1, num_kv_heads, chunk_tokens, head_dim)


def kv_shards(num_layers: int, num_kv_heads: int, tokens: int, head_dim: int,
              chunk_tokens: int) -> tuple[int, int, int, int]:
    """One shard per array: all layers, all tokens rounded up to whole chunks."""
    span = max(1, math.ceil(tokens / chunk_tokens)) * chunk_tokens
    return (num_layers, num_kv_heads, span, head_dim)


def legacy_layer_path(which: str, layer: int) -> str:
    """Format 1.0 per-layer array path."""
    return f"{which}/{layer}"


def id_chunk(tokens: int) -> int:
    """Chunk length of the ``tokens`` and ``positions`` arrays: one object up to TOKEN_CHUNK ids."""
    return max(1, min(tokens, TOKEN_CHUNK))


def as_range(sel: range | slice | int | None, n: int, what: str) -> range:
    """A layer or token selection (None: all; an int: that one; a slice or range of step 1) as a range."""
    if sel is None:
        return range(n)
    if isinstance(sel, int) and not isinstance(sel, bool):
        if not 0 <= sel < n and what == "layers":
            raise IndexError(f"{what} index {sel} out of range for {n}")
        sel = slice(sel, sel + 1)
    if isinstance(sel, range):
        sel = slice(sel.start, sel.stop, sel.step)
    if not isinstance(sel, slice):
        raise TypeError(f"{what} must be an int, a range or a slice; got {type(sel).__name__}")
    r = range(*sel.indices(n))
    if r.step != 1:
        raise ValueError(f"{what} must be a contiguous range (step 1); got step {r.step}")
    return r


def grid_cells(bounds: list[tuple[int, int]], grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The chunk-grid cells that a region (per-axis ``(start, stop)``) touches, in C order."""
    if any(b <= a for a, b in bounds):
        return []
    return list(itertools.product(*(range(a // g, (b - 1) // g + 1) for (a, b), g in zip(bounds, grid))))
