"""A tiny random llama (head_dim 64: every resident codec fits) and helpers for the pool tests (imported by
the test modules of this folder)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cachecard.adapters import hf  # noqa: E402
from cachecard.pool import BlockPool  # noqa: E402
from cachecard.pool.codecs import ResidentCodec  # noqa: E402
from cachecard.pool.hf import PoolCache  # noqa: E402

VOCAB = 256
CODECS = ["fp32", "fp16", "q8_0", "q4_0", "q4", "turbo4"]


class _Tok:
    def __init__(self) -> None:
        from tokenizers import Tokenizer, models

        self.backend_tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    # initializer_range 0.3: varied greedy continuations with clear margins; no EOS token, so no row stops early
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=1024, initializer_range=0.3, eos_token_id=None,
                                   bos_token_id=None, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def tiny_bound():
    """(model, identity): the identity is bound to the model."""
    model = tiny_llama()
    return model, hf.bind(model, hf.model_identity(model, tokenizer=_Tok()))


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, VOCAB, n).tolist()


def block_budget(identity, codec: str, blocks: int, block_tokens: int = 16) -> int:
    """Bytes of ``blocks`` blocks of the tiny model with this codec."""
    row = ResidentCodec(codec, identity.head_dim).row_bytes
    return blocks * 2 * identity.num_layers * identity.num_kv_heads * block_tokens * row


def make_pool(identity, codec: str = "q4", blocks: int = 400, **kwargs) -> BlockPool:
    return BlockPool(identity, budget_bytes=block_budget(identity, codec, blocks, kwargs.get("block_tokens", 16)),
                     codec=codec, **kwargs)


def run_turns(pool, model, agents, turns, max_new_tokens=6, batched=False):
    """Each turn feeds ``turns[t][agent]`` to every agent (one batch, or one agent at a time) and generates;
    returns the generated ids per turn per agent."""
    out = []
    for turn in turns:
        if batched:
            with PoolCache(pool, agents, model) as c:
                out.append(c.generate(model, [turn[a] for a in agents], max_new_tokens=max_new_tokens))
        else:
            row = []
            for a in agents:
                with PoolCache(pool, [a], model) as c:
                    row += c.generate(model, [turn[a]], max_new_tokens=max_new_tokens)
            out.append(row)
    return out
