"""llama.cpp adapter (llama-cpp-python): sequence state <-> canonical KV, restore into a ``llama_cpp.Llama``,
slot files, and model identity from the GGUF (spec/cachecard-1.md §4 canonical layout, §6 adapters and
identity).

The byte layout lives in :mod:`cachecard.adapters.ggsq`, the conversions to and from canonical KV in
:mod:`cachecard.adapters.llamacpp_kv` (re-exported here), a card's state built once in one buffer (stored
blocks copied, the rest decoded a few layers at a time) in :mod:`cachecard.adapters.llamacpp_card` and
slot-file I/O in :mod:`cachecard.adapters.llamacpp_slots`; this module talks to the runtime. A restore hands
llama.cpp the buffer it built, without another copy.
"""

from __future__ import annotations

import ctypes
import os
import warnings
import weakref
from typing import AbstractSet, Any, Sequence

import numpy as np

from cachecard.adapters._common import missing_extra

try:
    import llama_cpp
except ImportError as e:
    raise missing_extra("llamacpp", e) from e

from cachecard.adapters import ggsq
from cachecard.adapters._common import (
    Identities, cached_ids, card_load_checks, check_card_identity, check_restorable, is_store,
    open_if_location, save_kv, store_prompt, usable_prefix,
)
from cachecard.adapters.ggsq import SeqState
from cachecard.adapters.llamacpp_card import card_state
from cachecard.adapters.llamacpp_kv import (
    NEOX, NORM_PERMUTED, PRESET_BLOCKS, CacheLayout, KOrder, from_canonical, k_order, neox_to_norm, norm_to_neox,
    state_buffer, state_to_canonical, to_state,
)
from cachecard.adapters.llamacpp_slots import read_slot_file, write_slot_body, write_slot_file
from cachecard.card.locations import Location
from cachecard.card.reader import Card
from cachecard.errors import KVShapeError, UnsupportedStateError
from cachecard.identity import gguf_identity
from cachecard.kv import CanonicalKV, token_ids
from cachecard.kvstore.store import Store
from cachecard.manifest import ModelIdentity

RUNTIME = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
_IDENTITIES = Identities()


def model_identity(llm: llama_cpp.Llama, *, tokenizer: Any = None, gguf: str | os.PathLike[str] | None = None,
                   name: str | None = None, kv_dtype: str | None = None) -> ModelIdentity:
    """The identity of the GGUF the Llama was loaded from (``gguf``, default ``llm.model_path``): the same one
    transformers and MLX give it. ``tokenizer`` is not needed (the GGUF holds the tokenizer) and is ignored."""
    return gguf_identity(gguf if gguf is not None else llm.model_path, kv_dtype=kv_dtype or "float16", name=name)


def bind(llm: llama_cpp.Llama, identity: ModelIdentity) -> ModelIdentity:
    """Remember ``identity`` as the Llama's (instead of its GGUF file's)."""
    return _IDENTITIES.put(llm, identity)


def identity_of(llm: llama_cpp.Llama, *, tokenizer: Any = None,
                gguf: str | os.PathLike[str] | None = None) -> ModelIdentity:
    """The identity remembered for the Llama, else its GGUF file's (:func:`model_identity`), remembered."""
    return _IDENTITIES.of(llm, lambda: model_identity(llm, gguf=gguf), module="llamacpp")


def to_canonical(cache: llama_cpp.Llama | SeqState, identity: ModelIdentity | None = None, *,
                 order: KOrder | None = None) -> CanonicalKV:
    """The canonical KV of a Llama's cache (its sequence 0; :func:`capture` gives the token ids too).

    Before 0.2 this took a parsed :class:`SeqState` and the model identity; that form still works until
    0.3, with a DeprecationWarning: use :func:`state_to_canonical`.
    """
    if isinstance(cache, SeqState):
        warnings.warn("llamacpp.to_canonical(state, identity) is deprecated and stops working in 0.3; use "
                      "llamacpp.state_to_canonical(state, identity)", DeprecationWarning, stacklevel=2)
        if identity is None:
            raise TypeError("state_to_canonical needs the model identity")
        return state_to_canonical(cache, identity, order=order)
    return capture(cache, order=order)[0]


# -- the runtime ------------------------------------------------------------------------------------------------
def get_seq_state(llm: llama_cpp.Llama, seq_id: int = 0) -> bytes:
    """``llama_state_seq_get_data`` of one sequence."""
    ctx = llm._ctx.ctx  # noqa: SLF001 - llama-cpp-python keeps the raw context here
    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    n = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id)
    if n == 0 or n > size:
        raise UnsupportedStateError(f"llama_state_seq_get_data returned {n} of {size} bytes for sequence {seq_id}; "
                                    f"llama.cpp could not save it ({RUNTIME})")
    return bytes(memoryview(buf)[:n])


def set_seq_state(llm: llama_cpp.Llama, data: bytes | bytearray | np.ndarray, seq_id: int = 0) -> None:
    """``llama_state_seq_set_data`` into one sequence; raises if llama.cpp refuses the bytes. A writable buffer
    (a uint8 array, a bytearray) is handed over as it is; ``bytes`` are copied once (ctypes needs writable
    memory)."""
    size = len(data) if not isinstance(data, np.ndarray) else data.nbytes
    array = ctypes.c_uint8 * size
    buf = array.from_buffer_copy(data) if isinstance(data, bytes) else array.from_buffer(data)
    n = llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buf, size, seq_id)  # noqa: SLF001
    if n == 0:
        raise UnsupportedStateError(f"llama.cpp refused the {size}-byte sequence state ({RUNTIME}; its log "
                                    "above says why: too few free cells in the context, or a type/V-transposition "
                                    "mismatch)")


_LAYOUTS: weakref.WeakKeyDictionary[llama_cpp.Llama, CacheLayout] = weakref.WeakKeyDictionary()


def cache_layout(llm: llama_cpp.Llama) -> CacheLayout:
    """The Llama's KV layout, read from a state it writes (Python cannot ask llama.cpp whether flash attention,
    which decides V transposition, ended up on). Evaluates one token once per Llama when it holds none."""
    if llm in _LAYOUTS:
        return _LAYOUTS[llm]
    if llm.n_tokens == 0:
        llm.eval([llm.token_bos()])
        data = get_seq_state(llm, 0)
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # noqa: SLF001
    else:
        data = get_seq_state(llm, 0)
    layout = CacheLayout.of(ggsq.parse_seq_state(data))
    _LAYOUTS[llm] = layout
    return layout


def capture(llm: llama_cpp.Llama, cache: Any = None, input_ids: Any = None, *, seq_id: int = 0,
            order: KOrder | None = None, tokens: Any = None) -> tuple[CanonicalKV, np.ndarray]:
    """The canonical KV and token ids of the Llama's evaluated tokens (sequence ``seq_id``).

    The Llama holds its own cache: ``cache`` is ``None`` or the Llama itself. The Llama's bookkeeping knows
    the token ids of sequence 0 only: other sequences need ``input_ids``. (``capture(llm, seq_id)`` with
    the sequence id second, and ``tokens=``, are the forms before 0.2: deprecated, gone in 0.3.)
    """
    if isinstance(cache, int) and not isinstance(cache, bool):
        warnings.warn("llamacpp.capture(llm, seq_id) is deprecated and stops working in 0.3; pass seq_id=",
                      DeprecationWarning, stacklevel=2)
        seq_id = cache
    elif cache is not None and cache is not llm:
        raise TypeError(f"a Llama holds its own cache: pass cache=None (or the Llama); got {type(cache).__name__}")
    if tokens is not None:
        warnings.warn("llamacpp.capture(..., tokens=) is deprecated and stops working in 0.3; pass input_ids=",
                      DeprecationWarning, stacklevel=2)
        input_ids = tokens
    if seq_id != 0 and input_ids is None:
        raise ValueError(f"llama-cpp-python tracks the token ids of sequence 0 only; pass input_ids= for sequence "
                         f"{seq_id} (a card binds KV to its exact token ids)")
    state = ggsq.parse_seq_state(get_seq_state(llm, seq_id))
    kv = state_to_canonical(state, model_identity(llm), order=order)
    positions = np.sort(state.stream().positions)
    if not np.array_equal(positions, np.arange(len(positions))):
        raise UnsupportedStateError(f"sequence {seq_id} holds positions {positions[:3]}...{positions[-3:]}, not "
                                    "0..n-1 (a shifted or partly removed cache); capture it before shifting")
    if seq_id == 0 and len(positions) != llm.n_tokens:
        raise UnsupportedStateError(f"the cache holds {len(positions)} cells but the Llama counts {llm.n_tokens} "
                                    "tokens; evaluate with llm.eval(...) so both agree")
    if input_ids is None:
        return kv, np.asarray(llm.input_ids[:len(positions)], np.int32)
    return kv, cached_ids(token_ids(input_ids), len(positions)).astype(np.int32)


def restore(card: Card | Location, llm: llama_cpp.Llama, *, input_ids: Any = None, tokens: int | None = None,
            identity: ModelIdentity | None = None, allow: AbstractSet[str] = frozenset(), seq_id: int = 0,
            order: KOrder | None = None) -> int:
    """Restore a card (a :class:`cachecard.Card` or its location) into the Llama and return the token count.

    After it, ``llm.generate(prompt)`` / ``create_completion`` continue after the restored prefix
    (llama-cpp-python reuses the longest common prefix of the prompt and the restored tokens, and replays
    the last token to get its logits). With ``input_ids`` (the whole prompt) only the part of the card the
    prompt reuses is restored; ``tokens`` restores the first ``tokens`` tokens.

    Raises
    ------
    IdentityMismatchError
        The card was made by another model (GGUF weights, tokenizer or shapes differ), except for the fields
        named in ``allow``.
    """
    card = open_if_location(card)
    check_card_identity(card, identity or identity_of(llm), allow=allow, module="llamacpp")
    check_restorable(card, runtime="llamacpp")
    n = card.manifest.tokens.count if tokens is None else tokens
    if input_ids is not None:
        n = min(n, usable_prefix(card, input_ids))
    if not 0 < n <= card.manifest.tokens.count:
        raise ValueError(f"tokens must be in [1, {card.manifest.tokens.count}] for this card; got {n}")
    ids, positions = card.token_ids()[:n], card.positions()[:n]
    _check_fits(llm, n, positions, seq_id)
    data = card_state(card, n, cache_layout(llm), order or k_order(identity_of(llm)), seq_id=seq_id)
    return _inject(llm, data, ids, seq_id)


def save(where: Store | Location, llm: llama_cpp.Llama, cache: Any = None, input_ids: Any = None, *,
         codec: str | tuple[str, str] = "lossless", agent: str | None = None,
         identity: ModelIdentity | None = None, tokenizer: Any = None, gguf: str | os.PathLike[str] | None = None,
         seq_id: int = 0, **write_kwargs: Any) -> str:
    """Save the Llama's cache (sequence ``seq_id``; ``cache`` is ``None`` or the Llama) as a card at ``where``
    (a path, ``.zip`` or URL), or into a :class:`cachecard.Store` for ``agent``; return the card id. The token
    ids are the Llama's own (sequence 0) unless ``input_ids`` gives them. The card binds to the GGUF file's
    identity, so every runtime that loads that file can restore it."""
    kv, ids = capture(llm, cache, input_ids, seq_id=seq_id)
    ident = identity or identity_of(llm, gguf=gguf)
    return save_kv(where, kv, ids, ident.model_copy(update={"kv_dtype": kv.dtype}), agent=agent,
                   runtime=RUNTIME, codec=codec, **write_kwargs)


def load(where: Store | Card | Location, llm: llama_cpp.Llama, input_ids: Any = None, *, agent: str | None = None,
         identity: ModelIdentity | None = None, allow: AbstractSet[str] = frozenset(), tokenizer: Any = None,
         gguf: str | os.PathLike[str] | None = None, seq_id: int = 0) -> int:
    """Restore into the Llama, ready for ``llm.generate(input_ids)`` / ``create_completion``, and return how
    many tokens came from the card or store (0: nothing matched, generate prefills as usual).

    From a card (a :class:`cachecard.Card` or its location): the whole card, or the part ``input_ids``
    reuses. From a :class:`cachecard.Store`: the longest cached prefix of ``input_ids`` (``agent``'s cards
    only, if given), its chain of cards joined."""
    ident = identity or identity_of(llm, gguf=gguf)
    if not is_store(where):
        card_load_checks(agent)
        return restore(where, llm, input_ids=input_ids, identity=ident, allow=allow, seq_id=seq_id)
    ids, match = store_prompt(where, ident, agent, input_ids)
    if match is None or match.tokens == 0:
        return 0
    for card, _ in where.parts(match):
        check_card_identity(card, ident, allow=allow, module="llamacpp")
    return restore_kv(where.load(match), ids[:match.tokens], llm, seq_id=seq_id)


def restore_kv(kv: CanonicalKV, tokens: Sequence[int] | np.ndarray, llm: llama_cpp.Llama, *, seq_id: int = 0,
               order: KOrder | None = None) -> int:
    """Restore canonical KV of ``tokens`` (positions 0..n-1) into the Llama; the caller checked identity."""
    ids = token_ids(tokens).astype(np.int32)
    positions = np.arange(kv.num_tokens, dtype=np.int32)
    _check_fits(llm, len(ids), positions, seq_id)
    if len(ids) != kv.num_tokens:
        raise KVShapeError(f"{len(ids)} token ids for {kv.num_tokens} tokens of KV")
    data, _ = state_buffer(kv, positions=positions, seq_id=seq_id, layout=cache_layout(llm),
                           order=order or k_order(identity_of(llm)))
    return _inject(llm, data, ids, seq_id)


def _check_fits(llm: llama_cpp.Llama, n: int, positions: np.ndarray, seq_id: int) -> None:
    """Refuse, before any state is built, what the Llama cannot hold."""
    if n > llm.n_ctx():
        raise KVShapeError(f"{n} tokens do not fit the Llama's context of {llm.n_ctx()}; create it with "
                           f"n_ctx >= {n}")
    if seq_id == 0 and not np.array_equal(positions, np.arange(n)):
        raise KVShapeError("a Llama's token bookkeeping needs positions 0..n-1; this card starts at "
                           f"{positions[0] if n else 0} or skips positions")


def _inject(llm: llama_cpp.Llama, data: np.ndarray, tokens: np.ndarray, seq_id: int) -> int:
    """Hand the state to llama.cpp (no copy) and, for sequence 0, update the Llama's token bookkeeping."""
    n = len(tokens)
    if seq_id == 0:
        llm.reset()
    set_seq_state(llm, data, seq_id)
    if seq_id == 0:
        llm.input_ids[:n] = tokens
        llm.n_tokens = n
        llm._requires_eval = True  # noqa: SLF001 - logits are not restored; generate() replays the last token
    return n


# -- slot files -----------------------------------------------------------------------------------------------
def card_to_slot_file(card: Card | Location, path: str | os.PathLike[str], llm: llama_cpp.Llama, *,
                      identity: ModelIdentity | None = None, allow: AbstractSet[str] = frozenset()) -> None:
    """Export a card as a slot file for this Llama's cache layout (no restore happens)."""
    card = open_if_location(card)
    identity = identity or identity_of(llm)
    check_card_identity(card, identity, allow=allow, module="llamacpp")
    check_restorable(card, runtime="llamacpp")
    body = card_state(card, card.manifest.tokens.count, cache_layout(llm), k_order(identity), seq_id=None)
    write_slot_body(path, body, card.token_ids())


def slot_file_to_kv(path: str | os.PathLike[str], llm_or_identity: llama_cpp.Llama | ModelIdentity
                    ) -> tuple[CanonicalKV, np.ndarray]:
    """Import a slot file as canonical KV and its tokens (write a card of them with ``write_card``)."""
    identity = llm_or_identity if isinstance(llm_or_identity, ModelIdentity) else identity_of(llm_or_identity)
    state, tokens = read_slot_file(path)
    return state_to_canonical(state, identity), tokens


__all__ = [
    "NEOX", "NORM_PERMUTED", "PRESET_BLOCKS", "RUNTIME", "CacheLayout", "KOrder", "bind", "cache_layout", "capture",
    "card_to_slot_file", "from_canonical", "get_seq_state", "identity_of", "k_order", "load", "model_identity",
    "neox_to_norm", "norm_to_neox", "read_slot_file", "restore", "restore_kv", "save", "set_seq_state",
    "slot_file_to_kv", "state_to_canonical", "to_canonical", "to_state", "write_slot_file",
]
