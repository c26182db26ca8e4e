"""Preallocated caches for restores: headroom in the dynamic cache, and static slots (adapters/hf_cache.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import cachecard  # noqa: E402
from cachecard.adapters import hf  # noqa: E402
from cachecard.adapters.hf_cache import HeadroomLayer, Slot  # noqa: E402
from cachecard.testing.tiny import hf_llama, word_tokenizer  # noqa: E402


def _greedy(model, ids, past=None, steps=12):
    with torch.no_grad():
        return model.generate(input_ids=torch.as_tensor([ids]), past_key_values=past, max_new_tokens=steps,
                              do_sample=False, pad_token_id=0)[0, len(ids):].tolist()


@pytest.fixture
def saved(tmp_path):
    model = hf_llama()
    hf.bind(model, hf.model_identity(model, tokenizer=word_tokenizer()))
    ids = np.random.default_rng(3).integers(1, 128, 60).tolist()
    with torch.no_grad():
        kv = hf.to_canonical(model(torch.as_tensor([ids]), use_cache=True).past_key_values)
    cachecard.write_card(tmp_path / "c", kv, ids, hf.identity_of(model), chunk_tokens=16)
    return model, ids, cachecard.open_card(tmp_path / "c")


def test_headroom_cache_writes_new_tokens_in_place_and_generates_exactly(saved):
    model, ids, card = saved
    prompt = ids + [5, 9, 11]
    cache = hf.restore(card, model, input_ids=prompt)
    layer = cache.layers[0]
    assert isinstance(layer, HeadroomLayer)
    base = layer.keys.data_ptr()
    with torch.no_grad():
        model(torch.as_tensor([prompt[60:]]), past_key_values=cache)
    assert cache.layers[0].keys.data_ptr() == base and cache.get_seq_length() == 63  # no copy of the cache
    assert _greedy(model, prompt, hf.restore(card, model, input_ids=prompt)) == _greedy(model, prompt)


def test_headroom_falls_back_to_concatenation_when_full(saved):
    model, ids, card = saved
    from cachecard.adapters import hf_cache

    cache = hf_cache.dynamic_cache(*_room(model, card, 60, headroom=2), 60, model.config)
    with torch.no_grad():
        model(torch.as_tensor([[1, 2, 3, 4]]), past_key_values=cache)  # 4 new tokens > 2 of room
    assert cache.get_seq_length() == 64
    ref = hf.from_canonical(card.read())
    with torch.no_grad():
        model(torch.as_tensor([[1, 2, 3, 4]]), past_key_values=ref)
    for a, b in zip(cache.layers, ref.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def _room(model, card, n, headroom):
    from cachecard.adapters import hf_cache
    from cachecard.adapters.torch_read import read_kv

    k, v = hf_cache.room(model, n, headroom=headroom, device=torch.device("cpu"), dtype=torch.float32)
    read_kv(card, n, device="cpu", dtype=torch.float32, into=(k[:, 0], v[:, 0]))
    return k, v


def test_slot_restore_steps_and_generates_like_a_dynamic_restore(saved, tmp_path):
    model, ids, card = saved
    slot = Slot(model, 128, compile=False)
    prompt = ids + [5, 9, 11]
    for _ in range(2):  # the slot is reused: a second restore overwrites the first
        cache = hf.restore(card, model, input_ids=prompt, slot=slot)
        assert cache is slot.cache and slot.tokens == 60
        logits = slot.step(torch.as_tensor([prompt[60:]]))
        dyn = hf.restore(card, model, input_ids=prompt)
        with torch.no_grad():
            ref = model(torch.as_tensor([prompt[60:]]), past_key_values=dyn).logits[:, -1]
        # attention over the padded static length sums in another order: equal to float32 rounding
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    hf.restore(card, model, input_ids=prompt, slot=slot)
    assert _greedy(model, prompt, slot.cache) == _greedy(model, prompt)


def test_slot_restore_from_a_store_chain(saved, tmp_path):
    model, ids, card = saved
    store = cachecard.Store(tmp_path / "s", block_tokens=16)
    ident = hf.identity_of(model)
    more = ids + [7, 8, 9, 10, 11]
    for seq in (ids, more):
        with torch.no_grad():
            kv = hf.to_canonical(model(torch.as_tensor([seq]), use_cache=True).past_key_values)
        store.put(kv, seq, ident, agent="a")
    prompt = more + [3]
    slot = Slot(model, 100, compile=False)
    cache, n = hf.restore_from_store(store, model, prompt, agent="a", slot=slot)
    assert n == len(more) and len(store.parts(store.match(more, ident))) == 2
    assert _greedy(model, prompt, cache) == _greedy(model, prompt)
    store.close()


def test_slot_positions_past_the_restore_are_finite(saved):
    # masked positions still enter the attention product: garbage there (NaN) made CI generate zeros
    model, ids, card = saved
    slot = Slot(model, 100, compile=False)
    assert torch.isfinite(slot.keys).all() and torch.isfinite(slot.values).all()
    hf.restore(card, model, input_ids=ids, slot=slot)
    assert torch.isfinite(slot.keys).all() and torch.isfinite(slot.values).all()


def test_slot_refuses_what_it_cannot_hold(saved):
    model, ids, card = saved
    slot = Slot(model, 32, compile=False)
    with pytest.raises(ValueError, match="holds 32 tokens"):
        hf.restore(card, model, slot=slot)
    with pytest.raises(ValueError, match="another model"):
        hf.restore(card, hf_llama(), identity=hf.identity_of(model), slot=slot)
