"""Batched mlx-lm inference over the pool, through mlx-lm's quantized attention (kept short: MLX on a CPU)."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx.utils import tree_map  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import QuantizedKVCache  # noqa: E402

from cachecard.adapters import mlx as mlxa  # noqa: E402
from cachecard.errors import PoolError  # noqa: E402
from cachecard.pool import BlockPool  # noqa: E402
from cachecard.pool.mlx import MLXPoolCache  # noqa: E402

PROMPTS = [np.random.default_rng(i).integers(0, 127, n).tolist() for i, n in enumerate((30, 17, 45))]


@pytest.fixture(scope="module")
def tiny_mlx():
    from tokenizers import Tokenizer, models

    mx.random.seed(0)
    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, rms_norm_eps=1e-5,
                           vocab_size=128)
    model = llama.Model(args)
    model.update(tree_map(lambda p: p * 3, model.parameters()))  # varied greedy continuations
    mx.eval(model.parameters())
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    return model, mlxa.model_identity(model, tokenizer=tok)


def mlx_pool(ident, agents, **kw):
    pool = BlockPool(ident, budget_bytes=10**7, codec="q4", backend="numpy", scale_dtype=ident.kv_dtype, **kw)
    for a in agents:
        pool.add(a)
    return pool


def quantized_kv_cache_run(model, prompt, turn2, n):
    """mlx-lm alone: QuantizedKVCache(group 64, 4 bits), greedy, two turns."""
    cache = [QuantizedKVCache(group_size=64, bits=4) for _ in model.layers]
    outs = []
    for fed in (prompt, None):
        x, out = mx.array([fed if fed is not None else [outs[-1][-1]] + turn2]), []
        for _ in range(n):
            t = int(mx.argmax(model(x, cache=cache)[:, -1, :], axis=-1).item())
            out.append(t)
            x = mx.array([[t]])
        outs.append(out)
    return outs


def test_batched_equals_mlx_lm_quantized_cache_per_agent(tiny_mlx):
    model, ident = tiny_mlx
    names = ["a", "b", "c"]
    pool = mlx_pool(ident, names)
    turn2 = [[5, 6, 7], [8], [9, 10]]
    with MLXPoolCache(pool, names, identity=ident) as c:
        first = c.generate(model, PROMPTS, max_new_tokens=6)
    with MLXPoolCache(pool, names, identity=ident) as c:  # the last generated token is fed first
        second = c.generate(model, turn2, max_new_tokens=6)
    for i in range(3):
        assert [first[i], second[i]] == quantized_kv_cache_run(model, PROMPTS[i], turn2[i], 6)
    assert len({tuple(x) for x in first}) == 3


def test_mlx_pool_needs_affine_blocks_in_the_models_type(tiny_mlx):
    _, ident = tiny_mlx
    with pytest.raises(PoolError, match="MLX affine codec"):
        MLXPoolCache(BlockPool(ident, budget_bytes=10**6, codec="q8_0", backend="numpy"), ["a"], identity=ident)
    wrong = BlockPool(ident, budget_bytes=10**6, codec="q4", backend="numpy", scale_dtype="float16")
    with pytest.raises(PoolError, match="scale_dtype='float32'"):
        MLXPoolCache(wrong, ["a"], identity=ident)
