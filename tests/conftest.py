from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from cachecard import CanonicalKV, LayerKind, ModelIdentity, Rope

settings.register_profile("default", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("default")

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def make_identity(layers: int = 2, heads: int = 2, head_dim: int = 8, dtype: str = "float16",
                  **changes: object) -> ModelIdentity:
    fields = dict(
        name="tiny", architecture="llama", num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
        layer_kinds=(LayerKind(),) * layers, rope=Rope(theta=10000.0, rotary_dim=head_dim - head_dim % 2),
        kv_dtype=dtype, weights_hash="sha256:" + "ab" * 32, tokenizer_hash="sha256:" + "cd" * 32,
    )
    fields.update(changes)
    return ModelIdentity(**fields)


def make_kv(layers: int = 2, heads: int = 2, tokens: int = 37, head_dim: int = 8, dtype: str = "float16",
            seed: int = 0) -> CanonicalKV:
    rng = np.random.default_rng(seed)
    shape = (layers, heads, tokens, head_dim)
    return CanonicalKV(rng.standard_normal(shape).astype(DTYPES[dtype]),
                       rng.standard_normal(shape).astype(DTYPES[dtype]))


@pytest.fixture
def small_card(tmp_path):
    """A written card: (path, kv, tokens, identity)."""
    import cachecard

    kv = make_kv(layers=3, heads=2, tokens=50, head_dim=8)
    ids = np.arange(100, 150)
    ident = make_identity(layers=3)
    path = tmp_path / "card"
    cachecard.write_card(path, kv, ids, ident, chunk_tokens=16)
    return path, kv, ids, ident
