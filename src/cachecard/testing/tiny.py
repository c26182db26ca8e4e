"""Tiny random models and an in-memory word tokenizer for adapter tests: a transformers ``LlamaConfig``
model and an mlx-lm llama, 2 layers, vocabulary of 128 words ``w0`` … ``w127`` (``w127`` is the EOS).
Each function imports its framework when called; importing this module imports none.
"""

from __future__ import annotations

from typing import Any

VOCAB = 128


def word_tokenizer() -> Any:
    """A fast tokenizer over the words ``w0`` … ``w127`` (a ``transformers.PreTrainedTokenizerFast``), whose
    hash identifies it like any HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token=f"w{VOCAB - 1}")


def hf_llama(seed: int = 0, **overrides: Any) -> Any:
    """A random transformers llama (2 layers, 4 heads, 2 KV heads, head_dim 8), float32, eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256), **overrides})
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def mlx_llama(dtype: str = "float32", seed: int = 0) -> Any:
    """A random mlx-lm llama (2 layers, 2 heads, 1 KV head, head_dim 64: an ``mlx_affine`` group)."""
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, rms_norm_eps=1e-5,
                           vocab_size=VOCAB)
    model = llama.Model(args)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def mlx_tokenizer() -> Any:
    """:func:`word_tokenizer` wrapped as mlx-lm's ``TokenizerWrapper``."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(word_tokenizer())


__all__ = ["VOCAB", "hf_llama", "mlx_llama", "mlx_tokenizer", "word_tokenizer"]
