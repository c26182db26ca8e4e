"""What the adapters share: decoding a card layer group by layer group into reused arrays."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cachecard
from cachecard.adapters import _common
from cachecard.testing.strategies import cards


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cards(max_tokens=60), st.integers(0, 4), st.integers(1, 3000), st.data())
def test_decoded_layers_are_the_card_in_any_groups(tmp_path_factory, card_case, room, group_bytes, data) -> None:
    kv, ident, chunk = card_case
    if kv.num_tokens == 0:
        return
    loc = tmp_path_factory.mktemp("c") / "c"
    cachecard.write_card(loc, kv, np.arange(kv.num_tokens), ident, chunk_tokens=chunk)
    card = cachecard.open_card(loc)
    tokens = data.draw(st.integers(1, kv.num_tokens))
    got = [(layer, k.copy(), v.copy())  # small groups: several reads, one or a few layers each
           for layer, k, v in _common.decoded_layers(card, tokens, capacity=tokens + room, group_bytes=group_bytes)]
    assert [layer for layer, _, _ in got] == list(range(kv.num_layers))
    for layer, k, v in got:
        assert k.shape == (kv.num_kv_heads, tokens + room, kv.head_dim) and k.dtype == kv.k.dtype
        assert np.array_equal(k[:, :tokens].view(np.uint8), kv.k[layer, :, :tokens].view(np.uint8))
        assert np.array_equal(v[:, :tokens].view(np.uint8), kv.v[layer, :, :tokens].view(np.uint8))
        assert not k[:, tokens:].view(np.uint8).any() and not v[:, tokens:].view(np.uint8).any()
