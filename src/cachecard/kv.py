"""The canonical in-memory KV cache (spec/cachecard-1.md §4, "Canonical layout").

One sequence, all layers stacked: ``k`` and ``v`` have shape ``(layers, kv_heads, tokens, head_dim)``.
K is after RoPE in rotate-half (NEOX) order. Element types are float32, float16 or bfloat16 (numpy has
no bfloat16; ``ml_dtypes.bfloat16`` provides it and is what the reader returns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import ml_dtypes
import numpy as np

from cachecard.errors import KVShapeError

KVDType = Literal["float32", "float16", "bfloat16"]

NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def dtype_name(dtype: np.dtype) -> KVDType:
    """The spec name of a numpy dtype, or KVShapeError if KV cannot be stored in it."""
    for name, dt in NUMPY_DTYPES.items():
        if dt == dtype:
            return name  # type: ignore[return-value]
    raise KVShapeError(f"KV dtype must be one of {sorted(NUMPY_DTYPES)}; got {dtype}. Cast the cache first.")


def as_numpy(x: Any) -> np.ndarray:
    """A numpy view or copy of an array-like, including torch tensors in bfloat16 (numpy cannot take
    those directly, so their bits go through int16 and come back as ml_dtypes.bfloat16)."""
    if type(x).__module__.startswith("torch"):
        import torch  # only reached when the caller already uses torch

        t = x.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(x)


def token_ids(tokens: Any) -> np.ndarray:
    """Token ids as a 1-d numpy array, from anything that holds one sequence of them: a list, a numpy
    array, a torch or mlx tensor, of shape ``(T,)`` or ``(1, T)`` (a batch of one, as tokenizers return).

    Raises KVShapeError for a batch of several sequences, more dimensions, or values that are not integers.
    """
    ids = as_numpy(tokens) if not isinstance(tokens, (list, tuple, range)) else np.asarray(tokens)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        rows = f"a batch of {ids.shape[0]} sequences" if ids.ndim == 2 else f"shape {ids.shape}"
        raise KVShapeError(f"need one sequence of token ids, shape (T,) or (1, T); got {rows}. A card holds one "
                           "sequence: pass one row")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise KVShapeError(f"token ids must be integers; got {ids.dtype}")
    return ids


@dataclass(frozen=True, eq=False)
class CanonicalKV:
    """K and V of one token sequence, every layer, in the canonical layout."""

    k: np.ndarray
    v: np.ndarray

    def __post_init__(self) -> None:
        if self.k.ndim != 4 or self.k.shape != self.v.shape:
            raise KVShapeError(
                "k and v must both have shape (layers, kv_heads, tokens, head_dim); "
                f"got k {self.k.shape} and v {self.v.shape}."
            )
        if self.k.dtype != self.v.dtype:
            raise KVShapeError(f"k and v must share one dtype; got {self.k.dtype} and {self.v.dtype}.")
        dtype_name(self.k.dtype)

    @classmethod
    def from_layers(cls, keys: Sequence[Any], values: Sequence[Any]) -> CanonicalKV:
        """Stack per-layer ``(kv_heads, tokens, head_dim)`` arrays or tensors (a leading batch axis of 1
        is dropped)."""
        if len(keys) != len(values) or not keys:
            raise KVShapeError(f"need one K and one V per layer; got {len(keys)} K and {len(values)} V.")

        def prep(x: Any) -> np.ndarray:
            a = as_numpy(x)
            return a[0] if a.ndim == 4 and a.shape[0] == 1 else a

        ks, vs = [prep(x) for x in keys], [prep(x) for x in values]
        shapes = {a.shape for a in ks + vs}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise KVShapeError(f"every layer must have one shape (kv_heads, tokens, head_dim); got {shapes}.")
        return cls(np.stack(ks), np.stack(vs))

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> KVDType:
        return dtype_name(self.k.dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def equal(self, other: CanonicalKV) -> bool:
        """Bit-for-bit equality (NaNs with equal bits compare equal)."""
        if self.k.shape != other.k.shape or self.k.dtype != other.k.dtype:
            return False
        u = np.dtype(f"u{self.k.dtype.itemsize}")
        return bool(
            np.array_equal(self.k.view(u), other.k.view(u)) and np.array_equal(self.v.view(u), other.v.view(u))
        )
