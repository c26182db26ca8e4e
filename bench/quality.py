"""Continuation quality with a codec round-tripped prefix KV vs the exact prefix KV (issue 3 evaluation).

For each window of P prefix + C continuation tokens: prefill the prefix, save its KV as a float16 card with the codec
(through the real writer and reader, so bytes are what a store would hold), restore, and score the C
continuation tokens. Perplexity delta and KL(exact || codec) of the next-token distributions are measured
over the C - 1 predictions that depend on the prefix KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import zarr
from transformers import DynamicCache

import cachecard
from cachecard import CanonicalKV
from cachecard.adapters import hf
from cachecard.codecs import planning as plan
from cachecard.transforms.pruning import prune

from cachecard.testing.smollm2 import load


@dataclass
class Score:
    nll: float = 0.0          # summed NLL of codec run
    nll_exact: float = 0.0    # summed NLL of exact run
    kl: float = 0.0           # summed KL(exact || codec)
    n: int = 0                # predictions
    stored_bytes: int = 0     # K and V chunk bytes (shards incl. index) of every card
    elements: int = 0         # K and V elements stored
    per_window_kl: list = field(default_factory=list)

    @property
    def ppl_delta_pct(self) -> float:
        return (math.exp((self.nll - self.nll_exact) / self.n) - 1) * 100

    @property
    def mean_kl(self) -> float:
        return self.kl / self.n

    @property
    def bits_per_element(self) -> float:
        return 8 * self.stored_bytes / self.elements


def cache_of(k: torch.Tensor, v: torch.Tensor) -> DynamicCache:
    """A batched DynamicCache from (B, L, H, T, D) tensors."""
    cache = DynamicCache()
    for i in range(k.shape[1]):
        cache.update(k[:, i].contiguous(), v[:, i].contiguous(), i)
    return cache


def prefill(batch: np.ndarray, prefix: int):
    """Exact prefix KV (B, L, H, P, D) float32 and the continuation's exact log-probs (B, C-1, V)."""
    model, _ = load()
    ids = torch.from_numpy(batch)
    with torch.no_grad():
        out = model(ids[:, :prefix], use_cache=True)
        ks = torch.stack([layer.keys for layer in out.past_key_values.layers], 1)
        vs = torch.stack([layer.values for layer in out.past_key_values.layers], 1)
        logp = continuation_logprobs(ks, vs, ids[:, prefix:])
    return ks, vs, logp


def continuation_logprobs(ks: torch.Tensor, vs: torch.Tensor, cont: torch.Tensor, start: int | None = None
                          ) -> torch.Tensor:
    """Log-probs of the continuation after a cache of T tokens; ``start`` is the continuation's first RoPE
    position when it is not T (a pruned cache: the source length)."""
    model, _ = load()
    kwargs = {}
    t, c = ks.shape[3], cont.shape[1]
    if start is not None and start != t:
        kwargs = {"position_ids": torch.arange(start, start + c)[None].expand(cont.shape[0], c),
                  "cache_position": torch.arange(t, t + c)}
    with torch.no_grad():
        logits = model(cont, past_key_values=cache_of(ks, vs), use_cache=True, **kwargs).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1)


def roundtrip(kv: CanonicalKV, ids: np.ndarray, identity, codec) -> tuple[CanonicalKV, int, int]:
    """KV written as a card with ``codec`` and read back, with the stored bytes and the source elements.

    ``codec`` is a preset name; ``prune:<method>:<keep>:<preset>`` prunes the tokens first (pruned tokens
    count as stored in zero bytes); ``uniform:<preset>`` plans without the model's sensitivity profile."""
    store = zarr.storage.MemoryStore()
    elements = kv.k.size + kv.v.size
    if codec.startswith("uniform:"):  # the preset with per-layer profiles switched off
        token = plan.USE_PROFILES.set(False)
        try:
            return roundtrip(kv, ids, identity, codec.removeprefix("uniform:"))
        finally:
            plan.USE_PROFILES.reset(token)
    if codec.startswith("prune:"):
        _, method, keep, preset = codec.split(":")
        p = prune(kv, ids, float(keep), method)  # type: ignore[arg-type]
        cachecard.write_card(store, p.kv, p.tokens, identity, codec=preset, positions=p.positions, pruning=p.record)
    else:
        cachecard.write_card(store, kv, ids, identity, codec=codec)
    card = cachecard.open_card(store)
    back = card.read()
    stored = sum(size for key, size in card.objects().items() if key.startswith(("k/c/", "v/c/")))
    return back, stored, elements


def score(batch: np.ndarray, prefix: int, exact, codecs: dict[str, object], scores: dict[str, Score]) -> None:
    """Score every codec on one batch of windows; ``exact`` is ``prefill(batch, prefix)``."""
    model, tok = load()
    ks, vs, logp = exact
    identity = hf.model_identity(model, tokenizer=tok, kv_dtype="float16")
    cont = torch.from_numpy(batch[:, prefix:])
    target = cont[:, 1:]
    nll_exact = -logp.gather(-1, target[..., None]).sum().item()
    for name, codec in codecs.items():
        s = scores.setdefault(name, Score())
        kb, vb = [], []
        for b in range(batch.shape[0]):
            kv = CanonicalKV(ks[b].numpy().astype(np.float16), vs[b].numpy().astype(np.float16))
            back, stored, elements = roundtrip(kv, batch[b, :prefix], identity, codec)
            kb.append(torch.from_numpy(back.k.astype(np.float32)))
            vb.append(torch.from_numpy(back.v.astype(np.float32)))
            s.stored_bytes += stored
            s.elements += elements
        lq = continuation_logprobs(torch.stack(kb), torch.stack(vb), cont, start=prefix)
        s.nll += -lq.gather(-1, target[..., None]).sum().item()
        s.nll_exact += nll_exact
        kl = (logp.exp() * (logp - lq)).sum(-1)
        s.kl += kl.sum().item()
        s.n += target.numel()
        s.per_window_kl.extend(kl.mean(-1).tolist())
