"""Per-layer rate planning from sensitivity profiles (spec/codecs/frontier.md "Rate planning")."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import cachecard
from cachecard.codecs import planning as plan, profiles, pipeline
from cachecard.codecs.profiles import SensitivityProfile
from cachecard.testing import make_identity
from cachecard.testing.codec_data import kv_like

IDENT = make_identity(layers=2, heads=2, head_dim=64)


@pytest.fixture
def profile():
    p = SensitivityProfile(weights_hash=IDENT.weights_hash, k=[0.001, 0.1], v=[0.05, 0.05], reference="test")
    profiles.register(p)
    yield p
    profiles.unregister(IDENT.weights_hash)


def k_codec(name="frontier2.5"):
    k = kv_like((2, 2, 300, 64), 1).astype(np.float16)
    return pipeline(name, "k", k, IDENT).serializer


def test_without_a_profile_every_layer_gets_one_step():
    assert profiles.lookup(IDENT.weights_hash) is None
    assert k_codec().config.layer_steps is None


def test_sensitive_layers_get_finer_steps(profile):
    steps = k_codec().config.layer_steps
    assert steps is not None and len(steps) == 2
    assert steps[1] == pytest.approx(steps[0] / plan.SPREAD**2, rel=0.02)  # 100x more sensitive: finer, clipped
    token = plan.USE_PROFILES.set(False)
    try:
        assert k_codec().config.layer_steps is None
    finally:
        plan.USE_PROFILES.reset(token)


def test_planned_rate_is_met_with_per_layer_steps(profile):
    kv = cachecard.CanonicalKV(kv_like((2, 2, 600, 64), 1).astype(np.float16),
                               kv_like((2, 2, 600, 64), 2).astype(np.float16))
    store = zarr.storage.MemoryStore()
    cachecard.write_card(store, kv, np.arange(600), IDENT, codec="frontier2.5")
    card = cachecard.open_card(store)
    k_bits = 8 * card.objects()["k/c/0/0/0/0"] / kv.k.size
    assert k_bits == pytest.approx(3.1, rel=0.1)


def test_a_profile_of_another_layer_count_is_ignored(profile):
    k = kv_like((3, 2, 100, 64), 1).astype(np.float16)
    ident3 = make_identity(layers=3, heads=2, head_dim=64)
    assert pipeline("frontier2.5", "k", k, ident3).serializer.config.layer_steps is None


def test_builtin_profiles_are_valid():
    for p in profiles._builtin().values():  # noqa: SLF001
        assert len(p.k) == len(p.v) and all(c >= 0 for c in p.k + p.v)
