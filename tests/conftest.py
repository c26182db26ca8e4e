from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from cachecard.testing import make_identity, make_kv

settings.register_profile("default", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("default")


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


@pytest.fixture(autouse=True)
def _no_ambient_store_key(monkeypatch):
    """A developer's CACHECARD_KEY would put every test in keyed mode (spec §7.4); tests that want it set it."""
    monkeypatch.delenv("CACHECARD_KEY", raising=False)
