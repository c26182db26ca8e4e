"""Per-layer sensitivity of a transformers model to KV quantization, measured for a profile the codecs pick up
(spec/codecs: the frontier preset's per-layer rates; the profile format is :mod:`cachecard.codecs.profiles`).
Re-exported as ``cachecard.adapters.hf.calibrate``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cachecard.adapters._common import missing_extra

try:
    import torch
    from transformers import DynamicCache, PreTrainedModel
except ImportError as e:
    raise missing_extra("hf", e) from e

from cachecard.adapters.hf_identity import weights_hash
from cachecard.codecs.base import ChunkContext
from cachecard.codecs.frontier import FrontierCodec
from cachecard.codecs.profiles import SensitivityProfile
from cachecard.kv import as_numpy


def calibrate(model: PreTrainedModel, tokenizer: object, texts: list[str], *, windows: int = 4, prefix: int = 512,
              continuation: int = 128, k_step: float = 0.6, v_step: float = 1.0,
              progress: Callable[[int, int], None] | None = None) -> SensitivityProfile:
    """Measure a model's per-layer sensitivity profile (cachecard.codecs.profiles): the mean KL of the next-token
    distributions over ``continuation`` tokens when one layer's K (then V) of a ``prefix``-token cache goes
    through ``cachecard.frontier`` at a reference step and everything else is exact. 2·L + 1 forward passes
    of ``windows`` windows; use text the model will not be evaluated on."""
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
