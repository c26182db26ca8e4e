"""HuggingFace transformers 5.x adapter: DynamicCache <-> CanonicalKV, and model identity
(spec/cachecard-1.md §4 canonical layout, §6 identity).

HF caches K after RoPE in rotate-half order, which is the canonical layout, so no permutation is needed.
"""

from __future__ import annotations

import hashlib
import json

import rfc8785

import numpy as np
import torch
import transformers
from transformers import DynamicCache, PreTrainedModel

from cachecard.errors import KVShapeError
from cachecard.kv import CanonicalKV, as_numpy
from cachecard.manifest import LayerKind, ModelIdentity, Rope

RUNTIME = f"transformers {transformers.__version__}"


def weights_hash(model: PreTrainedModel) -> str:
    """SHA-256 over every parameter and buffer: name, dtype, shape and raw bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        a = as_numpy(t)
        h.update(f"{name}|{a.dtype}|{a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
    return "sha256:" + h.hexdigest()


def tokenizer_hash(tokenizer: object) -> str:
    """SHA-256 of the fast tokenizer's definition (vocabulary, merges, normalizers, specials) as RFC 8785
    canonical JSON, so any language can reproduce it from tokenizer.json."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError("need a fast (tokenizers-backed) tokenizer to compute its identity hash")
    spec = json.loads(backend.to_str())
    return "sha256:" + hashlib.sha256(rfc8785.dumps(spec)).hexdigest()


def model_identity(model: PreTrainedModel, tokenizer: object, *, name: str | None = None,
                   kv_dtype: str | None = None) -> ModelIdentity:
    """The identity a card of this model binds to."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = float(rope.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    partial = float(rope.pop("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)))
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    kinds = [LayerKind(attention="sliding", window=cfg.sliding_window) if t == "sliding_attention"
             else LayerKind() for t in layer_types]
    dtype = kv_dtype or str(model.dtype).removeprefix("torch.")
    return ModelIdentity(
        name=name or getattr(cfg, "name_or_path", None) or None, architecture=cfg.model_type,
        num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
        layer_kinds=tuple(kinds), rope=Rope(theta=theta, rotary_dim=int(head_dim * partial), scaling=scaling),
        kv_dtype=dtype, weights_hash=weights_hash(model), tokenizer_hash=tokenizer_hash(tokenizer),
    )


def to_canonical(cache: DynamicCache) -> CanonicalKV:
    """One sequence of a DynamicCache (batch size 1) as canonical KV."""
    layers = cache.layers
    if any(layer.keys is None for layer in layers):
        raise KVShapeError("the cache has layers that hold no KV yet; run a forward pass first")
    if layers[0].keys.shape[0] != 1:
        raise KVShapeError(f"to_canonical takes one sequence; the cache holds a batch of {layers[0].keys.shape[0]}")
    return CanonicalKV.from_layers([layer.keys for layer in layers], [layer.values for layer in layers])


def from_canonical(kv: CanonicalKV, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> DynamicCache:
    """A DynamicCache (batch size 1) holding ``kv``, ready for ``model(..., past_key_values=...)``."""
    cache = DynamicCache()
    bf16 = kv.dtype == "bfloat16"
    for i in range(kv.num_layers):
        k, v = (torch.from_numpy(np.ascontiguousarray(a[i][None]).view(np.int16 if bf16 else a.dtype))
                for a in (kv.k, kv.v))
        if bf16:
            k, v = k.view(torch.bfloat16), v.view(torch.bfloat16)
        cache.update(k.to(device=device, dtype=dtype or k.dtype), v.to(device=device, dtype=dtype or v.dtype), i)
    return cache
