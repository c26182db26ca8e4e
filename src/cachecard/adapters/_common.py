"""What every runtime adapter shares (spec/cachecard-1.md §4 canonical layout, §6 identity and adapters):
opening a card given by location, the rule for which cards restore on their own, the check of a model's
shapes against a GGUF identity, how much of a card a prompt can reuse, identities remembered per model,
``save``/``load`` targets (a card location or a store), and decoding a card layer group by layer group for
runtimes that copy it into their own memory.

This module imports no ML framework: each adapter module imports its own at the top and calls these.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import AbstractSet, Any, Callable, Iterator, Mapping

import numpy as np

from cachecard.card.locations import Location
from cachecard.card.reader import Card, open_card
from cachecard.errors import IdentityMismatchError, KVShapeError, MissingIdentityError
from cachecard.identity import SCHEME as GGUF_SCHEME
from cachecard.identity import check_identity
from cachecard.kv import NUMPY_DTYPES, token_ids
from cachecard.kvstore.store import Store
from cachecard.manifest import ModelIdentity

EXTRAS = {"hf": "torch and transformers", "mlx": "mlx and mlx-lm", "llamacpp": "llama-cpp-python"}


def missing_extra(extra: str, error: ImportError) -> ImportError:
    """The ImportError an adapter raises when its framework is missing: it names the extra to install."""
    return ImportError(f"cachecard.adapters.{extra} needs {EXTRAS[extra]}, and {error.name or error} is not "
                       f'installed; install them with: pip install "cachecard[{extra}]"', name=error.name)


def open_if_location(card: Card | Location) -> Card:
    """``card`` itself, or the card opened at that location."""
    return card if isinstance(card, Card) else open_card(card)


GROUP_BYTES = 16 << 20  # K (or V) bytes decoded per Card.read in decoded_layers (measured best of 2-64 MiB)


def decoded_layers(card: Card, tokens: int, *, capacity: int | None = None, group_bytes: int = GROUP_BYTES
                   ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(layer, k, v)`` for every layer of the card's first ``tokens`` tokens, each ``(heads, capacity, dim)``
    (``capacity`` defaults to ``tokens``; rows past ``tokens`` are zero), decoded a few layers at a time into
    two reused arrays of about ``group_bytes`` each (``Card.read(out=...)``). They are views, overwritten by the next group: copy each layer
    where it goes before taking the next.

    For runtimes that copy KV into memory of their own (llama.cpp's state bytes, mlx arrays): decoding the
    whole card into new arrays first costs about twice as much at 4K tokens on a 2-core CPU, since fresh
    arrays fault in every page and their data has left the cache by the time it is copied."""
    m = card.manifest.model
    cap = tokens if capacity is None else capacity
    dtype = NUMPY_DTYPES[m.kv_dtype]
    group = max(1, min(m.num_layers, group_bytes // max(1, m.num_kv_heads * cap * m.head_dim * dtype.itemsize)))
    k, v = (np.zeros((group, m.num_kv_heads, cap, m.head_dim), dtype) for _ in "kv")
    for start in range(0, m.num_layers, group):
        stop = min(m.num_layers, start + group)
        n = stop - start
        card.read(layers=range(start, stop), tokens=tokens, out=(k[:n, :, :tokens], v[:n, :, :tokens]))
        for j in range(n):
            yield start + j, k[j], v[j]


def check_restorable(card: Card, *, runtime: str) -> None:
    """THE rule for restoring a card on its own: it must start at position 0, i.e. hold its whole sequence.

    A store's child card holds only the tokens after its parent's (``parent`` set, ``start_position`` > 0);
    restoring it alone would put the wrong KV at the wrong positions, so it goes through its store, which
    joins the chain. ``runtime`` names the adapter module (``"hf"``, ``"mlx"``, ``"llamacpp"``) in the advice.
    """
    m = card.manifest
    if m.parent is not None or m.start_position:
        parent = m.parent.card_id if m.parent else "?"
        raise KVShapeError(f"this card continues card {parent} from position {m.start_position}: it holds only "
                           f"the tokens after its parent's. Restore it through its store, which joins the chain: "
                           f"{runtime}.load(store, model, input_ids, agent=...)", card=card.label)


def check_gguf_shapes(ours: Mapping[str, object], ident: ModelIdentity, gguf: str | os.PathLike[str]) -> None:
    """IdentityMismatchError unless each field of ``ours`` (read from the runtime's model) equals the GGUF
    identity's: the model was not loaded from that file."""
    theirs = {name: ident.rope.theta if name == "rope_theta" else getattr(ident, name) for name in ours}
    diffs = [f"{name}: model has {value!r}, file has {theirs[name]!r}" for name, value in ours.items()
             if value != theirs[name]]
    if diffs:
        raise IdentityMismatchError(f"the model was not loaded from {os.fspath(gguf)!r}: " + "; ".join(diffs)
                                    + ". Pass the GGUF file this model's weights came from")


def usable_prefix(card: Card, input_ids: object) -> int:
    """How many of the card's tokens a prompt can reuse: its common prefix with ``input_ids``, leaving at
    least one prompt token to compute (generation needs the last token's logits)."""
    ids = token_ids(input_ids)
    have = card.token_ids()
    m = min(len(have), len(ids) - 1)
    diff = np.flatnonzero(have[:m] != ids[:m])
    if len(diff) and diff[0] == 0:
        raise KVShapeError(f"the card's tokens do not start the prompt (token 0: card {have[0]}, prompt "
                           f"{ids[0]}): it holds another text. Pass the whole prompt, the card's "
                           f"{len(have)} tokens first", card=card.label)
    return int(diff[0]) if len(diff) else max(m, 0)


def check_card_identity(card: Card, runtime: ModelIdentity, *, allow: AbstractSet[str], module: str) -> None:
    """IdentityMismatchError unless ``card`` was made by the model ``runtime`` identifies (fields in
    ``allow`` are not compared); the error says how to make the identities agree, when it can."""
    try:
        check_identity(card.manifest.model, runtime, what=f"card {card.label!r}", allow=allow)
    except IdentityMismatchError as e:
        advice = mismatch_advice(card.manifest.model, runtime, module)
        if not advice:
            raise
        raise IdentityMismatchError(str(e) + advice) from None


def mismatch_advice(card: ModelIdentity, runtime: ModelIdentity, module: str) -> str:
    """What to do about an identity mismatch, beyond switching the check off: when the card is bound to a
    GGUF file and the model to its own tensors (or the other way round), say how to make them agree."""
    card_gguf = card.weights_hash.startswith(GGUF_SCHEME + ":")
    ours_gguf = runtime.weights_hash.startswith(GGUF_SCHEME + ":")
    if card_gguf and not ours_gguf:
        return (f" The card is bound to a GGUF file ({card.name or card.architecture}); if this model's weights "
                f"came from that file, give its path: {module}.bind(model, {module}.model_identity(model, "
                "gguf=PATH)) or identity=")
    if ours_gguf and not card_gguf:
        return (" The card is bound to its writer's own tensors, so only that runtime can restore it; write "
                "cards every runtime restores with the GGUF identity (model_identity(..., gguf=PATH))")
    return ""


class Identities:
    """Identities remembered per model object (weakly: a model that goes away takes its identity along)."""

    def __init__(self) -> None:
        self._known: weakref.WeakKeyDictionary[Any, ModelIdentity] = weakref.WeakKeyDictionary()
        self._by_id: dict[int, ModelIdentity] = {}  # models that cannot be weakly referenced

    def get(self, model: Any) -> ModelIdentity | None:
        try:
            return self._known.get(model)
        except TypeError:
            return self._by_id.get(id(model))

    def put(self, model: Any, identity: ModelIdentity) -> ModelIdentity:
        try:
            self._known[model] = identity
        except TypeError:
            self._by_id[id(model)] = identity
        return identity

    def of(self, model: Any, derive: Callable[[], ModelIdentity | None], *, module: str) -> ModelIdentity:
        """The remembered identity, else the one ``derive`` finds (remembered for next time), else
        MissingIdentityError saying how to give one."""
        known = self.get(model)
        if known is not None:
            return known
        found = derive()
        if found is None:
            raise MissingIdentityError(
                f"cachecard cannot tell which model this is: it was not loaded from a GGUF file. Give the "
                f"tokenizer (tokenizer=tok: cards bound to these weights, for this runtime) or the GGUF file "
                f"its weights came from (gguf=PATH: cards every runtime restores), to {module}.save / "
                f"{module}.load, or once: {module}.bind(model, {module}.model_identity(model, tokenizer=tok))")
        return self.put(model, found)


def is_store(where: object) -> bool:
    """True for a :class:`cachecard.Store`; a path or URL is a card location."""
    return isinstance(where, Store)


def save_kv(where: Store | Location, kv: Any, ids: np.ndarray, identity: ModelIdentity, *, agent: str | None,
            runtime: str, **write_kwargs: Any) -> str:
    """Write canonical KV to a card location or into a store for ``agent``; return the card id."""
    if is_store(where):
        if agent is None:
            raise TypeError("a store keeps cards per agent: pass agent='name' to save into it")
        return where.put(kv, ids, identity, agent=agent, **write_kwargs)
    if agent is not None:
        raise TypeError(f"agent= names an agent of a store; {where!r} is a card location (open a "
                        "cachecard.Store to save for an agent)")
    from cachecard.card.writer import write_card

    write_kwargs.setdefault("runtime", runtime)
    return write_card(where, kv, ids, identity, **write_kwargs).card_id


def cached_ids(ids: np.ndarray, cached: int) -> np.ndarray:
    """The token ids a cache of ``cached`` tokens was computed from: all of ``ids``, or all but the last
    (``generate`` returns sequences whose last token is not in its cache yet)."""
    if len(ids) == cached:
        return ids
    if len(ids) == cached + 1:
        return ids[:-1]
    raise KVShapeError(f"the cache holds {cached} tokens but {len(ids)} token ids were given; pass the ids the "
                       "cache was computed from (the prompt, or generate's output sequence)")


def deprecated_positional(name: str, old: str, new: str) -> None:
    """Warn once per call site that a positional argument became keyword-only (removed in 0.3)."""
    warnings.warn(f"{name}: passing {old} positionally is deprecated and stops working in 0.3; pass {new}",
                  DeprecationWarning, stacklevel=3)


def card_load_checks(agent: str | None) -> None:
    """``load`` from a card location: ``agent`` has no meaning there."""
    if agent is not None:
        raise TypeError("agent= selects an agent's cards in a store; a card location has no agents")


def store_prompt(where: Any, ident: Any, agent: str | None, input_ids: object) -> tuple[np.ndarray, Any]:
    """``load`` from a store: the prompt's token ids and their longest cached prefix (``None``: no match)."""
    if input_ids is None:
        raise TypeError("loading from a store matches a prompt: pass input_ids (the whole prompt)")
    ids = token_ids(input_ids)
    return ids, where.match(ids[:-1], ident, agent=agent)

