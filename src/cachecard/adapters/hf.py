"""HuggingFace transformers 5.x adapter: DynamicCache <-> CanonicalKV, and model identity
(spec/cachecard-1.md §4 canonical layout, §6 identity).

HF caches K after RoPE in rotate-half order, which is the canonical layout, so no permutation is needed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import rfc8785

import numpy as np
import torch
import transformers
from transformers import DynamicCache, PreTrainedModel

from cachecard.codecs.profiles import SensitivityProfile
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


def calibrate(model: PreTrainedModel, tokenizer: object, texts: list[str], *, windows: int = 4, prefix: int = 512,
              continuation: int = 128, k_step: float = 0.6, v_step: float = 1.0,
              progress: Callable[[int, int], None] | None = None) -> SensitivityProfile:
    """Measure a model's per-layer sensitivity profile (cachecard.codecs.profiles): the mean KL of the next-token
    distributions over ``continuation`` tokens when one layer's K (then V) of a ``prefix``-token cache goes
    through ``cachecard.frontier`` at a reference step and everything else is exact. 2·L + 1 forward passes
    of ``windows`` windows; use text the model will not be evaluated on."""
    from cachecard.codecs.base import ChunkContext
    from cachecard.codecs.frontier import FrontierCodec

    ids = np.concatenate([np.asarray(tokenizer(t).input_ids) for t in texts])
    span = prefix + continuation
    if len(ids) < windows * span:
        raise ValueError(f"calibration needs {windows * span} tokens of text; got {len(ids)}")
    batch = torch.from_numpy(np.stack([ids[i * span:(i + 1) * span] for i in range(windows)]))
    device = next(model.parameters()).device
    with torch.no_grad():
        cache = model(batch[:, :prefix].to(device), use_cache=True).past_key_values
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        cont = batch[:, prefix:].to(device)

        def logprobs(ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
            c = DynamicCache()
            for i, (k, v) in enumerate(zip(ks, vs)):
                c.update(k.clone(), v.clone(), i)
            return torch.log_softmax(model(cont, past_key_values=c, use_cache=True).logits[:, :-1].float(), -1)

        exact = logprobs(keys, values)
        costs: dict[str, list[float]] = {"k": [], "v": []}
        steps = 2 * len(keys)
        for which, tensors, codec in (
                ("k", keys, FrontierCodec(step=k_step, center=True, sinks=4, recent=32, salient=0.0, seed=1)),
                ("v", values, FrontierCodec(step=v_step, center=False, sinks=4, recent=32, salient=0.0, seed=1))):
            for layer, t in enumerate(tensors):
                x = as_numpy(t).astype(np.float32)  # (B, H, T, D)
                out = np.empty_like(x)
                for b in range(x.shape[0]):
                    for s in range(0, prefix, 256):
                        chunk = x[b:b + 1, :, s:s + 256]
                        n = chunk.shape[2]
                        ctx = ChunkContext(layer=layer, token_start=s, valid_tokens=n, card_tokens=prefix,
                                           positions=np.arange(s, s + n))
                        data = np.frombuffer(codec.encode_array(chunk, ctx), np.uint8)
                        out[b:b + 1, :, s:s + 256] = codec.decode_array(data, chunk.shape)
                swapped = list(tensors)
                swapped[layer] = torch.from_numpy(out).to(device=t.device, dtype=t.dtype)
                lq = logprobs(swapped, values) if which == "k" else logprobs(keys, swapped)
                kl = float((exact.exp() * (exact - lq)).sum(-1).mean())
                costs[which].append(max(kl, 0.0))  # a KL is >= 0; float noise is not information
                if progress:
                    progress(len(costs["k"]) + len(costs["v"]), steps)
    reference = (f"KL of {windows} windows x {continuation} tokens after a {prefix}-token prefix; one layer through "
                 f"cachecard.frontier (K step {k_step} centered, V step {v_step}; sinks 4, recent 32)")
    return SensitivityProfile(weights_hash=weights_hash(model), model=getattr(model.config, "name_or_path", None),
                              k=costs["k"], v=costs["v"], reference=reference)
