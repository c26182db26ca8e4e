"""Tiny random transformers models and an in-memory tokenizer for fast tests (imports torch/transformers)."""

from __future__ import annotations

from typing import Any


def tiny_hf_model(kind: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """A 2-layer random ``LlamaConfig`` (or ``Qwen2Config`` with ``kind="qwen2"``) causal LM in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512) | overrides
    cfg = (transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config)(**common)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


class TinyTokenizer:
    """What ``model_identity`` hashes of a tokenizer: a fast tokenizer with 128 words, built in memory."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, models

        self.backend_tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))


__all__ = ["TinyTokenizer", "tiny_hf_model"]
