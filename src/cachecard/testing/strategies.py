"""hypothesis strategies for cards (needs ``hypothesis``, from the ``test`` extra)."""

from __future__ import annotations

from hypothesis import strategies as st

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


__all__ = ["cards"]
