"""Store contract, part 3 (runs on every index backend): hostile input. Bad agent and card ids, a KV that does
not fit, symbolic links inside a store: a clear CacheCardError, nothing written or removed outside the store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachecard import AgentIdError, CardNotFoundError, IdentityMismatchError, KVShapeError, StoreError
from cachecard.testing import make_identity, make_kv
from store_helpers import IDENT, seq_kv, tokens


BAD_AGENTS = ["", "../evil", "a/b", "a\\b", "a\x00b", "a\nb", "a\n", "a\r", "\ta", "a\x7f", "a\u2028", "x" * 129,
              ".hidden", "-x", "..", 5]


@pytest.mark.parametrize("agent", BAD_AGENTS)
def test_bad_agent_ids_are_refused(store, agent):
    with pytest.raises(AgentIdError) as e:
        store.put(seq_kv(5), tokens(5), IDENT, agent=agent)
    assert repr(agent)[:20] in str(e.value) or not isinstance(agent, str)
    assert store.cards() == []
    assert not (Path(store.objects.base).parent / "evil").exists()


def test_bad_card_ids_are_refused(store):
    for bad in ("../../etc", "AB" * 16, "a" * 31, ""):
        with pytest.raises(CardNotFoundError, match="not a card id"):
            store.load(bad)
        with pytest.raises(CardNotFoundError):
            store.delete(bad)


def test_another_model_is_refused_on_load(store):
    a = store.put(seq_kv(10), tokens(10), IDENT, agent="a")
    with pytest.raises(IdentityMismatchError, match="weights_hash"):
        store.load(a, model=make_identity(weights_hash="sha256:" + "ee" * 32))
    with pytest.raises(KVShapeError):
        store.put(seq_kv(10), tokens(10), make_identity(layers=3), agent="a")
    with pytest.raises(KVShapeError):
        store.put(seq_kv(10), tokens(9), IDENT, agent="a")


@pytest.mark.parametrize("agent", BAD_AGENTS)
def test_bad_agent_ids_are_refused_by_every_verb(store, agent):
    """Issue 13 defect 6: "a\\n" passed a ``$`` regex and named a directory with a newline in it."""
    a = store.put(seq_kv(5), tokens(5), IDENT, agent="ok")
    for verb in (lambda: store.cards(agent=agent), lambda: store.handoff(a, agent), lambda: store.drop_agent(agent),
                 lambda: store.delete(a, agent=agent), lambda: store.match(tokens(5), IDENT, agent=agent),
                 lambda: store.evict(0, agent=agent), lambda: store.handoff(a, "ok2", from_agent=agent)):
        with pytest.raises(AgentIdError):
            verb()
    assert sorted(os.listdir(Path(store.objects.base) / "refs")) == ["ok"]
    assert [c.agents for c in store.cards()] == [("ok",)]


def test_card_id_with_a_trailing_newline_is_refused(store):
    a = store.put(seq_kv(5), tokens(5), IDENT, agent="ok")
    for verb in (store.load, store.delete, store.tokens_of, store.card_location, lambda c: store.handoff(c, "b")):
        with pytest.raises(CardNotFoundError, match="not a card id"):
            verb(a + "\n")


def test_put_of_a_stored_sequence_still_checks_the_kv(store):
    """Issue 13 defect 7: the whole sequence is a card already, yet a KV of the wrong shape or dtype is an
    error, not a silent new reference to the old card."""
    a = store.put(seq_kv(20), tokens(20), IDENT, agent="ann")
    bad = {"layers": make_kv(layers=3, tokens=20), "heads": make_kv(heads=1, tokens=20),
           "head_dim": make_kv(head_dim=4, tokens=20), "dtype": make_kv(tokens=20, dtype="float32")}
    for why, kv in bad.items():
        with pytest.raises(KVShapeError, match="does not match the model identity"):
            store.put(kv, tokens(20), IDENT, agent="bob")
    with pytest.raises(KVShapeError, match="one token id per cached token"):
        store.put(seq_kv(19), tokens(20), IDENT, agent="bob")
    assert [c.agents for c in store.cards()] == [("ann",)]
    assert store.put(seq_kv(20), tokens(20), IDENT, agent="bob") == a  # a right KV still just gains a reference


@pytest.fixture
def outside(tmp_path):
    """A directory outside the store holding a file that must survive every test below."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious").write_text("keep me")
    return d


def _untouched(outside: Path) -> bool:
    return sorted(p.name for p in outside.iterdir()) == ["precious"] and (outside / "precious").read_text() == "keep me"


def test_agent_refs_dir_linked_outside_is_refused(store, outside):
    """Issue 13 defect 8: ``refs/<agent>`` pointing elsewhere made put write, and drop_agent delete, there."""
    a = store.put(seq_kv(5), tokens(5), IDENT, agent="ann")
    os.symlink(outside, Path(store.objects.base) / "refs" / "mallory")
    (outside / a).write_text("not a ref, a victim")  # what drop_agent would delete through the link
    with pytest.raises(StoreError, match="symbolic link"):
        store.put(seq_kv(5), tokens(5), IDENT, agent="mallory")
    with pytest.raises(StoreError, match="symbolic link"):
        store.handoff(a, "mallory")
    assert sorted(p.name for p in outside.iterdir()) == [a, "precious"]
    store.gc(grace_s=0)
    assert (outside / a).read_text() == "not a ref, a victim" and (outside / "precious").exists()
    assert [c.agents for c in store.cards()] == [("ann",)]


def test_cards_dir_linked_outside_is_refused(store, outside):
    base = Path(store.objects.base)
    a = store.put(seq_kv(5), tokens(5), IDENT, agent="ann")
    real = base / "cards" / a[:2] / a
    moved = outside / a
    real.rename(moved)
    os.symlink(moved, real)  # a card directory that is a link
    with pytest.raises(StoreError, match="symbolic link"):
        store.drop_agent("ann")
    with pytest.raises(StoreError, match="symbolic link"):
        store.load(a)
    assert (moved / "zarr.json").exists()
    os.unlink(real)
    moved.rename(real)
    (base / "cards").rename(base / "cards.real")
    os.symlink(outside, base / "cards")  # the whole cards/ tree is a link
    with pytest.raises(StoreError, match="symbolic link"):
        store.put(seq_kv(9, seed=4), tokens(9, start=50), IDENT, agent="bob")
    with pytest.raises(StoreError, match="symbolic link"):
        store.gc(grace_s=0)
    assert _untouched(outside)
