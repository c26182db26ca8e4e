"""hypothesis strategies for cards and llama.cpp sequence states (needs ``hypothesis``, from the ``test``
extra)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from cachecard.adapters.ggsq import GGML_TYPES, LayerRows, SeqState, StreamState
from cachecard.testing import make_identity, make_kv


@st.composite
def cards(draw: st.DrawFn, max_layers: int = 4, max_heads: int = 3, max_head_dim: int = 12,
          max_tokens: int = 80, max_chunk: int = 40) -> tuple:
    """``(kv, identity, chunk_tokens)`` of a random small card: any dtype, empty and one-token cards too."""
    layers = draw(st.integers(1, max_layers))
    heads = draw(st.integers(1, max_heads))
    head_dim = draw(st.integers(1, max_head_dim))
    tokens = draw(st.one_of(st.sampled_from([0, 1]), st.integers(2, max_tokens)))
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    chunk = draw(st.integers(1, max_chunk))
    seed = draw(st.integers(0, 2**16))
    return make_kv(layers, heads, tokens, head_dim, dtype, seed), make_identity(layers, heads, head_dim, dtype), chunk


@st.composite
def seq_states(draw: st.DrawFn) -> SeqState:
    """Arbitrary well-formed states: streams, cells, seq ids, cell ext, types, row sizes, V transposition."""
    ext = draw(st.sampled_from([0, 8, 12]))
    n_stream = draw(st.integers(1, 3))
    streams: list[StreamState | None] = []
    for _ in range(n_stream):
        cells = draw(st.integers(0, 4))
        if cells == 0:
            streams.append(None)
            continue
        v_trans = draw(st.booleans())
        n_layer = draw(st.integers(1, 3))
        k_type = draw(st.sampled_from(sorted(GGML_TYPES)))
        plain = [i for i, t in GGML_TYPES.items() if t.block == 1]
        v_type = draw(st.sampled_from(plain if v_trans else sorted(GGML_TYPES)))
        blocks = draw(st.integers(1, 3))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        s = StreamState(rng.integers(-5, 10**6, cells).astype(np.int32),
                        [rng.integers(0, 64, draw(st.integers(0, 3))).astype(np.int32) for _ in range(cells)],
                        [rng.bytes(ext) for _ in range(cells)] if ext else [], v_trans)
        for _ in range(n_layer):
            kt = GGML_TYPES[k_type]
            row = kt.block_bytes * blocks * (32 // kt.block)
            s.k.append(LayerRows(k_type, row, rng.integers(0, 256, (cells, row), np.uint8)))
            vt = GGML_TYPES[v_type]
            if v_trans:
                n_embd = blocks * 32
                s.v.append(LayerRows(v_type, vt.block_bytes,
                                     rng.integers(0, 256, (n_embd, cells * vt.block_bytes), np.uint8), n_embd))
            else:
                row = vt.block_bytes * blocks * (32 // vt.block)
                s.v.append(LayerRows(v_type, row, rng.integers(0, 256, (cells, row), np.uint8)))
        streams.append(s)
    seq_id = draw(st.one_of(st.none(), st.integers(-1, 63)))
    return SeqState(streams, seq_id, ext)


__all__ = ["cards", "seq_states"]
