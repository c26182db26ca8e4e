"""llama.cpp KV cache rows <-> canonical KV (spec/cachecard-1.md §4 canonical layout): the conversions of
:mod:`cachecard.adapters.llamacpp`, which need no llama.cpp (the byte layout is :mod:`cachecard.adapters.ggsq`).

* K rows are ``(cells, kv_heads * head_dim)``; V rows the same, or transposed ``(kv_heads * head_dim, cells)``
  when flash attention is off (``v_trans``).
* Architectures with NORM rope whose GGUF converter permuted the Q/K weight rows (llama and its kin) cache K
  with each head's channels interleaved: llama.cpp channel ``2i + t`` is canonical channel ``t * d/2 + i``.
  NEOX-rope architectures (Qwen, Gemma, Phi-3) cache K in canonical order already.
* f32/f16/bf16 are copied; q8_0, q4_0 and q4_1 are ggml blocks, decoded and encoded with cachecard's bit-exact
  codecs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import ml_dtypes
import numpy as np

from cachecard.adapters import ggsq
from cachecard.adapters.ggsq import GGML_TYPES, TYPE_IDS, LayerRows, SeqState, StreamState
from cachecard.codecs.base import NO_CONTEXT, KVCodec
from cachecard.codecs.q4_0 import Q4_0Codec
from cachecard.codecs.q4_1 import Q4_1Codec
from cachecard.codecs.q8_0 import Q8_0Codec
from cachecard.errors import KVShapeError, UnsupportedStateError
from cachecard.kv import CanonicalKV
from cachecard.manifest import ModelIdentity

KOrder = Literal["norm", "neox"]

# GGUF architectures whose converter permutes Q/K rows for NORM rope (conversion/llama.py `permute` and the
# classes that reuse it); their cached K is interleaved per head.
NORM_PERMUTED = frozenset({"llama", "granite", "granitemoe", "deci", "olmo", "arctic", "minicpm", "internlm2",
                           "chameleon", "deepseek", "llada", "nanbeige"})
# Architectures whose cached K is already in rotate-half order.
NEOX = frozenset({"qwen2", "qwen2moe", "qwen3", "qwen3moe", "gemma", "gemma2", "gemma3", "phi3", "stablelm",
                  "gptneox", "falcon", "starcoder2", "olmo2"})

# Element types a cache row decodes from; block codecs give float32 exactly.
BLOCK_CODECS: dict[str, type[KVCodec]] = {"q8_0": Q8_0Codec, "q4_0": Q4_0Codec, "q4_1": Q4_1Codec}
PLAIN_TYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype(ml_dtypes.bfloat16)}
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


def decode_rows(rows: np.ndarray, type_name: str, n_values: int) -> np.ndarray:
    """``(n, row_bytes)`` uint8 of one ggml type -> ``(n, n_values)`` in float32 / f16 / bf16 bits."""
    if type_name in PLAIN_TYPES:
        return rows.view(PLAIN_TYPES[type_name]).reshape(len(rows), n_values)
    if type_name in BLOCK_CODECS:
        return BLOCK_CODECS[type_name]().decode_array(np.ascontiguousarray(rows).reshape(-1), (len(rows), n_values))
    raise UnsupportedStateError(f"KV cache type {type_name} cannot be converted; cachecard converts "
                                f"{sorted(PLAIN_TYPES) + sorted(BLOCK_CODECS)}. Run llama.cpp with one of those")


def result_dtype(k: str, v: str) -> np.dtype:
    if k == v and k in PLAIN_TYPES:
        return PLAIN_TYPES[k]
    return np.dtype("float32")  # blocks decode exactly to float32; mixed types (bf16 included) meet there too


def norm_to_neox(k: np.ndarray) -> np.ndarray:
    """Per head: llama.cpp's interleaved channels ``[0, d/2, 1, d/2+1, ...]`` back to rotate-half order."""
    return np.concatenate([k[..., 0::2], k[..., 1::2]], axis=-1)


def neox_to_norm(k: np.ndarray) -> np.ndarray:
    """The inverse of :func:`norm_to_neox`."""
    d = k.shape[-1]
    return np.stack([k[..., : d // 2], k[..., d // 2:]], axis=-1).reshape(k.shape)


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
    dtype = result_dtype(k_type, v_type)
    k = np.empty((layers, heads, cells, dim), dtype)
    v = np.empty_like(k)
    order_ = np.argsort(st.positions, kind="stable")
    in_order = bool(np.all(order_ == np.arange(cells)))
    for i, (kr, vr) in enumerate(zip(st.k, st.v)):
        if kr.size != kr.type.block_bytes * n_embd // kr.type.block:
            raise UnsupportedStateError(f"layer {i} K rows are {kr.size} bytes; {heads} heads x {dim} channels of "
                                        f"{kr.type.name} take {kr.type.block_bytes * n_embd // kr.type.block}")
        rows = decode_rows(kr.data, k_type, n_embd).reshape(cells, heads, dim)
        k[i] = rows.transpose(1, 0, 2) if in_order else rows[order_].transpose(1, 0, 2)
        if vr.transposed:
            if vr.n_embd != n_embd:
                raise UnsupportedStateError(f"layer {i} V has {vr.n_embd} channels; the model has {n_embd}")
            cols = vr.data.view(PLAIN_TYPES[v_type]).reshape(heads, dim, cells)
            v[i] = cols.transpose(0, 2, 1) if in_order else cols[:, :, order_].transpose(0, 2, 1)
        else:
            rows = decode_rows(vr.data, v_type, n_embd).reshape(cells, heads, dim)
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


def encode_rows(x: np.ndarray, type_name: str) -> np.ndarray:
    """``(n, n_values)`` float -> ``(n, row_bytes)`` uint8 in one ggml type."""
    if type_name in PLAIN_TYPES:
        return np.ascontiguousarray(x.astype(PLAIN_TYPES[type_name])).view(np.uint8).reshape(len(x), -1)
    if type_name in BLOCK_CODECS:
        data = BLOCK_CODECS[type_name]().encode_array(np.ascontiguousarray(x, np.float32), NO_CONTEXT)
        return np.frombuffer(data, np.uint8).reshape(len(x), -1)
    raise UnsupportedStateError(f"cannot write KV cache type {type_name}; cachecard writes "
                                f"{sorted(PLAIN_TYPES) + sorted(BLOCK_CODECS)}")


def skeleton(cells: int, layers: int, n_embd: int, layout: CacheLayout, positions: np.ndarray,
             seq_id: int | None) -> SeqState:
    """A one-sequence state of ``cells`` cells in ``layout`` whose rows have no data yet: :func:`ggsq.allocate`
    lays it out and the caller fills the rows in place (:func:`put_k`, :func:`put_v`)."""
    if layout.cell_ext_size:
        raise UnsupportedStateError("cachecard cannot synthesise the per-cell ext block (M-RoPE or n-gram "
                                    "embedding models) yet")
    for name in (layout.k_type, layout.v_type):
        if name not in PLAIN_TYPES and name not in BLOCK_CODECS:
            raise UnsupportedStateError(f"cannot write KV cache type {name}; cachecard writes "
                                        f"{sorted(PLAIN_TYPES) + sorted(BLOCK_CODECS)}")
    if layout.v_trans and layout.v_type not in PLAIN_TYPES:
        raise UnsupportedStateError(f"llama.cpp never transposes a {layout.v_type} V cache")
    kt, vt = (GGML_TYPES[TYPE_IDS[name]] for name in (layout.k_type, layout.v_type))
    if n_embd % kt.block or n_embd % vt.block:
        raise UnsupportedStateError(f"{n_embd} channels per token are not whole {kt.name}/{vt.name} blocks")
    st = StreamState(positions, [np.array([max(seq_id or 0, 0)], np.int32)] * cells, [], layout.v_trans)
    for _ in range(layers):
        st.k.append(LayerRows(TYPE_IDS[layout.k_type], n_embd // kt.block * kt.block_bytes, None))
        if layout.v_trans:
            st.v.append(LayerRows(TYPE_IDS[layout.v_type], vt.block_bytes, None, n_embd))
        else:
            st.v.append(LayerRows(TYPE_IDS[layout.v_type], n_embd // vt.block * vt.block_bytes, None))
    streams: list[StreamState | None] = [None] * layout.n_stream
    streams[layout.stream] = st
    return SeqState(streams, seq_id, layout.cell_ext_size)


def put_k(rows: np.ndarray, k: np.ndarray, type_name: str, order: KOrder) -> None:
    """Write one layer's canonical K ``(heads, cells, dim)`` into its rows ``(cells, row_bytes)`` (contiguous,
    in the state buffer) in place: the NORM interleave, the relayout to one row per cell and the cast happen in
    the copy (plain types); block types are encoded from a float32 copy in that order."""
    heads, cells, dim = k.shape
    if type_name in PLAIN_TYPES:
        _relayout_k(rows.view(PLAIN_TYPES[type_name]).reshape(cells, heads * dim), k, order)
    else:
        x = np.empty((cells, heads * dim), np.float32)
        _relayout_k(x, k, order)
        rows[...] = encode_rows(x, type_name)


def _relayout_k(dst: np.ndarray, k: np.ndarray, order: KOrder) -> None:
    """``(heads, cells, dim)`` canonical K into ``dst`` ``(cells, heads * dim)`` in llama.cpp's channel order."""
    heads, cells, dim = k.shape
    if order == "neox":
        dst.reshape(cells, heads, dim)[...] = k.transpose(1, 0, 2)
        return
    # canonical channel t * d/2 + i is llama.cpp's 2i + t: (h, c, t, i) -> (c, h, i, t). One copy per t, so the
    # inner loop runs over d/2 channels rather than over pairs (a fused copy is ~7x slower).
    out = dst.reshape(cells, heads, dim // 2, 2)
    src = k.reshape(heads, cells, 2, dim // 2)
    for t in (0, 1):
        out[..., t] = src[:, :, t].transpose(1, 0, 2)


_TILE = 256  # tokens per copy of transposed V: the strided reads of a tile stay in cache (~3x faster at 4K)


def put_v(rows: np.ndarray, v: np.ndarray, type_name: str, transposed: bool) -> None:
    """Write one layer's canonical V ``(heads, cells, dim)`` into its rows in place: one row per cell, or per
    channel (``transposed``: ``(n_embd, cells * el)``, plain types only)."""
    heads, cells, dim = v.shape
    if transposed:
        out = rows.view(PLAIN_TYPES[type_name]).reshape(heads, dim, cells)
        for t0 in range(0, cells, _TILE):
            out[:, :, t0:t0 + _TILE] = v[:, t0:t0 + _TILE].transpose(0, 2, 1)
    elif type_name in PLAIN_TYPES:
        rows.view(PLAIN_TYPES[type_name]).reshape(cells, heads, dim)[...] = v.transpose(1, 0, 2)
    else:
        x = np.empty((cells, heads, dim), np.float32)
        x[...] = v.transpose(1, 0, 2)
        rows[...] = encode_rows(x.reshape(cells, -1), type_name)


def state_buffer(kv: CanonicalKV, *, positions: Sequence[int] | np.ndarray | None = None, seq_id: int | None = 0,
                 layout: CacheLayout = CacheLayout(), order: KOrder = "norm",
                 blocks: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, SeqState]:
    """The bytes for ``llama_state_seq_set_data`` holding ``kv`` (``seq_id`` is the header's; ``None``: no
    header, as in a slot file), built in one buffer, and the state as views of it.

    ``blocks`` may give ready rows per layer stack for ``"k"``/``"v"`` (shape ``(layers, cells, row_bytes)``),
    already in the layout's block type: they are copied as they are."""
    n = kv.num_tokens
    pos = np.arange(n, dtype=np.int32) if positions is None else np.asarray(positions, np.int32)
    if pos.shape != (n,):
        raise KVShapeError(f"need one position per token ({n}); got {pos.shape}")
    buf, state = ggsq.allocate(skeleton(n, kv.num_layers, kv.num_kv_heads * kv.head_dim, layout, pos, seq_id))
    st = state.stream()
    for i in range(kv.num_layers):
        if blocks and "k" in blocks:
            st.k[i].data[...] = blocks["k"][i]
        else:
            put_k(st.k[i].data, kv.k[i], layout.k_type, order)
        if blocks and "v" in blocks and not layout.v_trans:
            st.v[i].data[...] = blocks["v"][i]
        else:
            put_v(st.v[i].data, kv.v[i], layout.v_type, layout.v_trans)
    return buf, state


def to_state(kv: CanonicalKV, **kwargs: Any) -> SeqState:
    """A :class:`SeqState` holding ``kv`` for ``llama_state_seq_set_data`` (keyword arguments as
    :func:`state_buffer`; its rows are views of one buffer)."""
    return state_buffer(kv, **kwargs)[1]


def from_canonical(kv: CanonicalKV, **kwargs: Any) -> bytes:
    """Bytes for ``llama_state_seq_set_data`` holding ``kv`` (keyword arguments as :func:`state_buffer`)."""
    return state_buffer(kv, **kwargs)[0].tobytes()
