"""SmolLM2-135M (real weights) over the pool: batched agents of different lengths equal each agent alone (q4),
and a lossless resident codec equals plain transformers generation."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cachecard.adapters import hf  # noqa: E402
from cachecard.pool import BlockPool  # noqa: E402
from cachecard.pool.hf import PoolCache  # noqa: E402


@pytest.fixture(scope="module")
def smol():
    from cachecard.testing import smollm2

    model, tok = smollm2.load()
    hf.bind(model, hf.model_identity(model, tokenizer=tok, gguf=smollm2.gguf_path()))
    windows = smollm2.windows(160, 0, 3)
    return model, [w[:n].tolist() for w, n in zip(windows, (160, 97, 131))]


def generate(model, codec, prompts, batched):
    pool = BlockPool(hf.identity_of(model), budget_bytes=64 << 20, codec=codec)
    names = [f"a{i}" for i in range(len(prompts))]
    for n in names:
        pool.add(n)
    if batched:
        with PoolCache(pool, names, model) as c:
            return c.generate(model, prompts, max_new_tokens=12)
    out = []
    for n, p in zip(names, prompts):
        with PoolCache(pool, [n], model) as c:
            out += c.generate(model, [p], max_new_tokens=12)
    return out


@pytest.mark.model
def test_smollm2_batched_pool_equals_each_agent_alone(smol):
    model, prompts = smol
    assert generate(model, "q4", prompts, batched=True) == generate(model, "q4", prompts, batched=False)


@pytest.mark.model
def test_smollm2_lossless_pool_equals_plain_generation(smol):
    model, prompts = smol
    got = generate(model, "fp32", prompts, batched=True)
    for p, g in zip(prompts, got):
        assert model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist() == g
