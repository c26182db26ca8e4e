"""llama.cpp adapter (llama-cpp-python): sequence state <-> canonical KV, restore into a ``llama_cpp.Llama``,
slot files, and model identity from the GGUF (spec/cachecard-1.md §4 canonical layout, §6 adapters and
identity).

The byte layout lives in :mod:`cachecard.adapters.ggsq`; this module converts it:

* K rows are ``(cells, kv_heads * head_dim)``; V rows the same, or transposed ``(kv_heads * head_dim, cells)``
  when flash attention is off (``v_trans``).
* Architectures with NORM rope whose GGUF converter permuted the Q/K weight rows (llama and its kin) cache K
  with each head's channels interleaved: llama.cpp channel ``2i + t`` is canonical channel ``t * d/2 + i``.
  NEOX-rope architectures (Qwen, Gemma, Phi-3) cache K in canonical order already.
* f32/f16/bf16 are copied; q8_0, q4_0 and q4_1 are ggml blocks, decoded and encoded with cachecard's bit-exact
  codecs. A card whose codec is the cache's block type restores V (and K of NEOX architectures) by copying its
  stored blocks; K of NORM architectures must be re-blocked, because a block of 32 llama.cpp channels is not a
  block of 32 canonical channels.
"""

from __future__ import annotations

import ctypes
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import AbstractSet, Any, Literal, Sequence

import ml_dtypes
import numpy as np

from cachecard.adapters._common import missing_extra

try:
    import llama_cpp
except ImportError as e:
    raise missing_extra("llamacpp", e) from e

from cachecard.adapters import ggsq
from cachecard.adapters._common import (
    Identities, cached_ids, check_card_identity, check_restorable, is_store, open_if_location, save_kv,
    usable_prefix,
)
from cachecard.adapters.ggsq import GGML_TYPES, TYPE_IDS, LayerRows, SeqState, StreamState
from cachecard.card.locations import Location
from cachecard.card.reader import Card
from cachecard.codecs.base import NO_CONTEXT, KVCodec
from cachecard.codecs.q4_0 import Q4_0Codec
from cachecard.codecs.q4_1 import Q4_1Codec
from cachecard.codecs.q8_0 import Q8_0Codec
from cachecard.errors import KVShapeError, UnsupportedCodecError, UnsupportedStateError
from cachecard.identity import gguf_identity
from cachecard.kv import CanonicalKV, token_ids
from cachecard.kvstore.store import Store
from cachecard.manifest import ModelIdentity

RUNTIME = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
_IDENTITIES = Identities()

KOrder = Literal["norm", "neox"]

# GGUF architectures whose converter permutes Q/K rows for NORM rope (conversion/llama.py `permute` and the
# classes that reuse it); their cached K is interleaved per head.
NORM_PERMUTED = frozenset({"llama", "granite", "granitemoe", "deci", "olmo", "arctic", "minicpm", "internlm2",
                           "chameleon", "deepseek", "llada", "nanbeige"})
# Architectures whose cached K is already in rotate-half order.
NEOX = frozenset({"qwen2", "qwen2moe", "qwen3", "qwen3moe", "gemma", "gemma2", "gemma3", "phi3", "stablelm",
                  "gptneox", "falcon", "starcoder2", "olmo2"})

# Element types a cache row decodes from; block codecs give float32 exactly.
_BLOCK_CODECS: dict[str, type[KVCodec]] = {"q8_0": Q8_0Codec, "q4_0": Q4_0Codec, "q4_1": Q4_1Codec}
_PLAIN = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype(ml_dtypes.bfloat16)}
# card preset -> the llama.cpp block type whose bytes its chunks hold
PRESET_BLOCKS = {"q8": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1"}


def k_order(identity: ModelIdentity) -> KOrder:
    """How llama.cpp orders each head's K channels for this architecture."""
    arch = identity.architecture
    if arch in NORM_PERMUTED:
        if identity.rope.rotary_dim != identity.head_dim:
            raise UnsupportedStateError(f"architecture {arch!r} has partial rotary ({identity.rope.rotary_dim} of "
                                        f"{identity.head_dim} channels); its K order is not known to cachecard")
        return "norm"
    if arch in NEOX:
        return "neox"
    raise UnsupportedStateError(f"cachecard does not know how llama.cpp orders K channels for architecture {arch!r}; "
                                "pass k_order='norm' (GGUF Q/K rows permuted, as for llama) or 'neox'")


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


# -- bytes <-> canonical --------------------------------------------------------------------------------------
def _decode_rows(rows: np.ndarray, type_name: str, n_values: int) -> np.ndarray:
    """``(n, row_bytes)`` uint8 of one ggml type -> ``(n, n_values)`` in float32 / f16 / bf16 bits."""
    if type_name in _PLAIN:
        return rows.view(_PLAIN[type_name]).reshape(len(rows), n_values)
    if type_name in _BLOCK_CODECS:
        return _BLOCK_CODECS[type_name]().decode_array(np.ascontiguousarray(rows).reshape(-1), (len(rows), n_values))
    raise UnsupportedStateError(f"KV cache type {type_name} cannot be converted; cachecard converts "
                                f"{sorted(_PLAIN) + sorted(_BLOCK_CODECS)}. Run llama.cpp with one of those")


def _result_dtype(k: str, v: str) -> np.dtype:
    if k == v and k in _PLAIN:
        return _PLAIN[k]
    return np.dtype("float32")  # blocks decode exactly to float32; mixed types (bf16 included) meet there too


def norm_to_neox(k: np.ndarray) -> np.ndarray:
    """Per head: llama.cpp's interleaved channels ``[0, d/2, 1, d/2+1, ...]`` back to rotate-half order."""
    return np.concatenate([k[..., 0::2], k[..., 1::2]], axis=-1)


def neox_to_norm(k: np.ndarray) -> np.ndarray:
    """The inverse of :func:`norm_to_neox`."""
    d = k.shape[-1]
    return np.stack([k[..., : d // 2], k[..., d // 2:]], axis=-1).reshape(k.shape)


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


def state_to_canonical(state: SeqState, identity: ModelIdentity, *, order: KOrder | None = None) -> CanonicalKV:
    """The canonical KV of a parsed sequence state, tokens in position order.

    Raises
    ------
    UnsupportedStateError
        The state's shapes contradict ``identity``, or it holds a cache type cachecard cannot decode.
    """
    st = state.stream()
    heads, dim, layers = identity.num_kv_heads, identity.head_dim, identity.num_layers
    n_embd, cells = heads * dim, st.cell_count
    if len(st.k) != layers:
        raise UnsupportedStateError(f"the state has {len(st.k)} layers; the model {identity.name!r} has {layers}")
    k_type, v_type = st.k[0].type.name, st.v[0].type.name
    if any(r.type.name != k_type for r in st.k) or any(r.type.name != v_type for r in st.v):
        raise UnsupportedStateError("layers of the state have different KV types; cachecard needs one K and one "
                                    "V type")
    dtype = _result_dtype(k_type, v_type)
    k = np.empty((layers, heads, cells, dim), dtype)
    v = np.empty_like(k)
    order_ = np.argsort(st.positions, kind="stable")
    in_order = bool(np.all(order_ == np.arange(cells)))
    for i, (kr, vr) in enumerate(zip(st.k, st.v)):
        if kr.size != kr.type.block_bytes * n_embd // kr.type.block:
            raise UnsupportedStateError(f"layer {i} K rows are {kr.size} bytes; {heads} heads x {dim} channels of "
                                        f"{kr.type.name} take {kr.type.block_bytes * n_embd // kr.type.block}")
        rows = _decode_rows(kr.data, k_type, n_embd).reshape(cells, heads, dim)
        k[i] = rows.transpose(1, 0, 2) if in_order else rows[order_].transpose(1, 0, 2)
        if vr.transposed:
            if vr.n_embd != n_embd:
                raise UnsupportedStateError(f"layer {i} V has {vr.n_embd} channels; the model has {n_embd}")
            cols = vr.data.view(_PLAIN[v_type]).reshape(heads, dim, cells)
            v[i] = cols.transpose(0, 2, 1) if in_order else cols[:, :, order_].transpose(0, 2, 1)
        else:
            rows = _decode_rows(vr.data, v_type, n_embd).reshape(cells, heads, dim)
            v[i] = rows.transpose(1, 0, 2) if in_order else rows[order_].transpose(1, 0, 2)
    if (order or k_order(identity)) == "norm":
        k = norm_to_neox(k)
    return CanonicalKV(k, v)


@dataclass(frozen=True)
class CacheLayout:
    """How a llama.cpp context stores KV: element types, V transposition, streams, cell ext size."""

    k_type: str = "f16"
    v_type: str = "f16"
    v_trans: bool = True      # flash attention off (llama-cpp-python's default)
    n_stream: int = 1         # 1 with a unified KV cache (llama-cpp-python's default)
    stream: int = 0           # the stream the sequence lives in
    cell_ext_size: int = 0

    @classmethod
    def of(cls, state: SeqState) -> CacheLayout:
        """The layout a parsed state was written with."""
        idx = [i for i, s in enumerate(state.streams) if s is not None]
        st = state.stream()
        return cls(st.k[0].type.name, st.v[0].type.name, st.v_trans, len(state.streams), idx[0],
                   state.cell_ext_size)


def _encode_rows(x: np.ndarray, type_name: str) -> np.ndarray:
    """``(n, n_values)`` float -> ``(n, row_bytes)`` uint8 in one ggml type."""
    if type_name in _PLAIN:
        return np.ascontiguousarray(x.astype(_PLAIN[type_name])).view(np.uint8).reshape(len(x), -1)
    if type_name in _BLOCK_CODECS:
        data = _BLOCK_CODECS[type_name]().encode_array(np.ascontiguousarray(x, np.float32), NO_CONTEXT)
        return np.frombuffer(data, np.uint8).reshape(len(x), -1)
    raise UnsupportedStateError(f"cannot write KV cache type {type_name}; cachecard writes "
                                f"{sorted(_PLAIN) + sorted(_BLOCK_CODECS)}")


def to_state(kv: CanonicalKV, *, positions: Sequence[int] | np.ndarray | None = None, seq_id: int | None = 0,
             layout: CacheLayout = CacheLayout(), order: KOrder = "norm",
             blocks: dict[str, np.ndarray] | None = None) -> SeqState:
    """A :class:`SeqState` holding ``kv`` for ``llama_state_seq_set_data`` (``seq_id`` is the header's).

    ``blocks`` may give ready rows ``(cells, row_bytes)`` per layer stack for ``"k"``/``"v"`` (shape
    ``(layers, cells, row_bytes)``), already in the layout's block type: they are used as they are."""
    n = kv.num_tokens
    pos = np.arange(n, dtype=np.int32) if positions is None else np.asarray(positions, np.int32)
    if pos.shape != (n,):
        raise KVShapeError(f"need one position per token ({n}); got {pos.shape}")
    if layout.cell_ext_size:
        raise UnsupportedStateError("cachecard cannot synthesise the per-cell ext block (M-RoPE or n-gram "
                                    "embedding models) yet")
    heads, dim = kv.num_kv_heads, kv.head_dim
    k = neox_to_norm(kv.k) if order == "norm" else kv.k
    st = StreamState(pos, [np.array([max(seq_id or 0, 0)], np.int32)] * n, [], layout.v_trans)
    for i in range(kv.num_layers):
        if blocks and "k" in blocks:
            krows = blocks["k"][i]
        else:
            krows = _encode_rows(k[i].transpose(1, 0, 2).reshape(n, heads * dim), layout.k_type)
        st.k.append(LayerRows(TYPE_IDS[layout.k_type], krows.shape[1], krows))
        if layout.v_trans:
            if layout.v_type not in _PLAIN:
                raise UnsupportedStateError(f"llama.cpp never transposes a {layout.v_type} V cache")
            cols = _encode_rows(kv.v[i].transpose(0, 2, 1).reshape(heads * dim, n), layout.v_type)
            st.v.append(LayerRows(TYPE_IDS[layout.v_type], GGML_TYPES[TYPE_IDS[layout.v_type]].block_bytes,
                                  cols, heads * dim))
        else:
            if blocks and "v" in blocks:
                vrows = blocks["v"][i]
            else:
                vrows = _encode_rows(kv.v[i].transpose(1, 0, 2).reshape(n, heads * dim), layout.v_type)
            st.v.append(LayerRows(TYPE_IDS[layout.v_type], vrows.shape[1], vrows))
    streams: list[StreamState | None] = [None] * layout.n_stream
    streams[layout.stream] = st
    return SeqState(streams, seq_id, layout.cell_ext_size)


def from_canonical(kv: CanonicalKV, **kwargs: object) -> bytes:
    """Bytes for ``llama_state_seq_set_data`` holding ``kv`` (keyword arguments as :func:`to_state`)."""
    return to_state(kv, **kwargs).to_bytes()  # type: ignore[arg-type]


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


def set_seq_state(llm: llama_cpp.Llama, data: bytes, seq_id: int = 0) -> None:
    """``llama_state_seq_set_data`` into one sequence; raises if llama.cpp refuses the bytes."""
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    n = llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buf, len(data), seq_id)  # noqa: SLF001
    if n == 0:
        raise UnsupportedStateError(f"llama.cpp refused the {len(data)}-byte sequence state ({RUNTIME}; its log "
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
    layout = cache_layout(llm)
    order_ = order or k_order(identity_of(llm))
    blocks = _stored_blocks(card, layout, order_, n)
    kv = card.read(tokens=n)
    return _restore(kv, card.token_ids()[:n], card.positions()[:n], llm, seq_id=seq_id, layout=layout,
                    order=order_, blocks=blocks)


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
        if agent is not None:
            raise TypeError("agent= selects an agent's cards in a store; a card location has no agents")
        return restore(where, llm, input_ids=input_ids, identity=ident, allow=allow, seq_id=seq_id)
    if input_ids is None:
        raise TypeError("loading from a store matches a prompt: pass input_ids (the whole prompt)")
    ids = token_ids(input_ids)
    match = where.match(ids[:-1], ident, agent=agent)
    if match is None or match.tokens == 0:
        return 0
    for card, _ in where.parts(match):
        check_card_identity(card, ident, allow=allow, module="llamacpp")
    return restore_kv(where.load(match), ids[:match.tokens], llm, seq_id=seq_id)


def restore_kv(kv: CanonicalKV, tokens: Sequence[int] | np.ndarray, llm: llama_cpp.Llama, *, seq_id: int = 0,
               order: KOrder | None = None) -> int:
    """Restore canonical KV of ``tokens`` (positions 0..n-1) into the Llama; the caller checked identity."""
    n = len(tokens)
    return _restore(kv, token_ids(tokens).astype(np.int32), np.arange(n, dtype=np.int32), llm, seq_id=seq_id,
                    layout=cache_layout(llm), order=order or k_order(identity_of(llm)), blocks=None)


def _restore(kv: CanonicalKV, tokens: np.ndarray, positions: np.ndarray, llm: llama_cpp.Llama, *, seq_id: int,
             layout: CacheLayout, order: KOrder, blocks: dict[str, np.ndarray] | None) -> int:
    n = kv.num_tokens
    if len(tokens) != n:
        raise KVShapeError(f"{len(tokens)} token ids for {n} tokens of KV")
    if n > llm.n_ctx():
        raise KVShapeError(f"{n} tokens do not fit the Llama's context of {llm.n_ctx()}; create it with "
                           f"n_ctx >= {n}")
    if seq_id == 0 and not np.array_equal(positions, np.arange(n)):
        raise KVShapeError("a Llama's token bookkeeping needs positions 0..n-1; this card starts at "
                           f"{positions[0] if n else 0} or skips positions")
    data = from_canonical(kv, positions=positions, seq_id=seq_id, layout=layout, order=order, blocks=blocks)
    if seq_id == 0:
        llm.reset()
    set_seq_state(llm, data, seq_id)
    if seq_id == 0:
        llm.input_ids[:n] = tokens
        llm.n_tokens = n
        llm._requires_eval = True  # noqa: SLF001 - logits are not restored; generate() replays the last token
    return n


# -- direct copy of a block-coded card ---------------------------------------------------------------------------
def _stored_blocks(card: Card, layout: CacheLayout, order: KOrder, tokens: int) -> dict[str, np.ndarray] | None:
    """Rows of llama.cpp blocks taken straight from the card's stored chunks (``Card.read_encoded``), for K
    and/or V, where the card's chunks are exactly the cache's block type: V when it is not transposed, K when
    it needs no re-ordering (NEOX architectures). ``None`` when nothing can be copied."""
    out: dict[str, np.ndarray] = {}
    for which, target in (("k", layout.k_type), ("v", layout.v_type)):
        if target not in _BLOCK_CODECS or (which == "k" and order == "norm") or (which == "v" and layout.v_trans):
            continue
        try:
            enc = card.read_encoded(which, tokens=tokens)
        except UnsupportedCodecError:
            continue  # compressed chunks or a format 1.0 card: decode instead
        if type(enc.codec) is not _BLOCK_CODECS[target]:
            continue
        out[which] = _block_rows(enc, tokens, GGML_TYPES[TYPE_IDS[target]])
    return out or None


def _block_rows(enc: object, tokens: int, t: ggsq.GGMLType) -> np.ndarray:
    """``(layers, tokens, row_bytes)`` llama.cpp rows from chunks of blocks ordered (head, token, block)."""
    _, heads, c, dim = enc.chunk_shape  # type: ignore[attr-defined]
    per_token = dim // t.block * t.block_bytes
    layers = 1 + max(ch.layer for ch in enc.chunks)  # type: ignore[attr-defined]
    out = np.empty((layers, tokens, heads * per_token), np.uint8)
    for ch in enc.chunks:  # type: ignore[attr-defined]
        keep = min(ch.tokens, tokens - ch.token_start)  # the last chunk may run past the tokens asked for
        blocks = ch.payload.reshape(heads, c, per_token)[:, :keep]
        out[ch.layer, ch.token_start: ch.token_start + keep] = blocks.transpose(1, 0, 2).reshape(keep, -1)
    return out


# -- slot files -----------------------------------------------------------------------------------------------
def read_slot_file(path: str | os.PathLike[str], *, cell_ext_size: int = 0) -> tuple[SeqState, np.ndarray]:
    """A llama.cpp slot file (``llama_state_seq_save_file``, the server's ``/slots?action=save``) as
    ``(state, tokens)``."""
    with open(path, "rb") as f:
        data = f.read()
    state, tokens, _version = ggsq.parse_slot_file(data, cell_ext_size=cell_ext_size)
    return state, tokens


def write_slot_file(path: str | os.PathLike[str], state: SeqState, tokens: Sequence[int] | np.ndarray, *,
                    version: int = ggsq.SLOT_VERSION) -> None:
    """Write a slot file that ``llama_state_seq_load_file`` (or the server's ``action=restore``) reads."""
    data = ggsq.slot_file_bytes(state, np.asarray(tokens), version=version)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def card_to_slot_file(card: Card | Location, path: str | os.PathLike[str], llm: llama_cpp.Llama, *,
                      identity: ModelIdentity | None = None, allow: AbstractSet[str] = frozenset()) -> None:
    """Export a card as a slot file for this Llama's cache layout (no restore happens)."""
    card = open_if_location(card)
    identity = identity or identity_of(llm)
    check_card_identity(card, identity, allow=allow, module="llamacpp")
    check_restorable(card, runtime="llamacpp")
    state = to_state(card.read(), positions=card.positions(), seq_id=None, layout=cache_layout(llm),
                     order=k_order(identity))
    write_slot_file(path, state, card.token_ids())


def slot_file_to_kv(path: str | os.PathLike[str], llm_or_identity: llama_cpp.Llama | ModelIdentity
                    ) -> tuple[CanonicalKV, np.ndarray]:
    """Import a slot file as canonical KV and its tokens (write a card of them with ``write_card``)."""
    identity = llm_or_identity if isinstance(llm_or_identity, ModelIdentity) else identity_of(llm_or_identity)
    state, tokens = read_slot_file(path)
    return state_to_canonical(state, identity), tokens
