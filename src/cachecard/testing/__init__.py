"""Factories and hypothesis strategies for testing code that uses CacheCard (as ``zarr.testing`` does for
zarr): tiny model identities, random canonical KV, KV-like codec data, and (``cachecard.testing.smollm2``)
the offline SmolLM2 model with its evaluation text. Importing this package imports no ML framework."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from cachecard.kv import CanonicalKV
from cachecard.manifest import LayerKind, ModelIdentity, Rope

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def make_identity(layers: int = 2, heads: int = 2, head_dim: int = 8, dtype: str = "float16",
                  **changes: object) -> ModelIdentity:
    """A model identity of a tiny llama-shaped model; keyword arguments replace fields."""
    fields = dict(
        name="tiny", architecture="llama", num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
        layer_kinds=(LayerKind(),) * layers, rope=Rope(theta=10000.0, rotary_dim=head_dim - head_dim % 2),
        kv_dtype=dtype, weights_hash="sha256:" + "ab" * 32, tokenizer_hash="sha256:" + "cd" * 32,
    )
    fields.update(changes)
    return ModelIdentity(**fields)


def make_kv(layers: int = 2, heads: int = 2, tokens: int = 37, head_dim: int = 8, dtype: str = "float16",
            seed: int = 0) -> CanonicalKV:
    """Standard-normal K and V of that shape and dtype, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    shape = (layers, heads, tokens, head_dim)
    return CanonicalKV(rng.standard_normal(shape).astype(DTYPES[dtype]),
                       rng.standard_normal(shape).astype(DTYPES[dtype]))


__all__ = ["DTYPES", "make_identity", "make_kv"]
