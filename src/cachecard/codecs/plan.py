"""Presets that plan their configuration from the data to meet a rate (spec/codecs/README.md §6).

- ``frontier_at(bits)``: finds the frontier codec's step that stores the array in about ``bits`` per element,
  by bisection over real encodes of a sample of chunks (entropy coding makes the rate data-dependent).
- ``mixed_at(bits)``: the salient fraction of ``cachecard.mixed`` that meets ``bits`` exactly in expectation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cachecard.codecs.base import ChunkContext, to_float32
from cachecard.codecs.frontier import FrontierCodec
from cachecard.codecs.mixed import MixedCodec, MixedConfig, plan_fraction
from cachecard.codecs.presets import Pipeline, Planner

if TYPE_CHECKING:
    from cachecard.manifest import ModelIdentity

SEED = 0x5EED  # rotation seed of the presets; recorded in every array's codec configuration
SAMPLE_LAYERS = 6
CHUNK = 256


def _sample(x: np.ndarray) -> list[tuple[np.ndarray, ChunkContext]]:
    """Chunks spread over layers and tokens (first, middle and last chunk), with their context."""
    layers, _, t, _ = x.shape
    starts = sorted({0, max(0, (t // 2) - CHUNK // 2), max(0, t - CHUNK)})
    out = []
    for layer in np.unique(np.linspace(0, layers - 1, min(layers, SAMPLE_LAYERS)).round().astype(int)):
        for s in starts:
            chunk = x[layer:layer + 1, :, s:s + CHUNK]
            n = chunk.shape[2]
            out.append((chunk, ChunkContext(layer=int(layer), token_start=s, valid_tokens=n, card_tokens=t,
                                            positions=np.arange(s, s + n))))
    return out


def frontier_step(x: np.ndarray, bits: float, **config: object) -> float:
    """The step (to about 1%) at which ``cachecard.frontier`` with ``config`` stores ``x`` in ``bits`` per element,
    from the code entropy of a sample of chunks."""
    sample = _sample(x)
    elements = sum(c.size for c, _ in sample)
    codec = FrontierCodec(step=1.0, **config)
    prepared = [codec.prepare_estimate(chunk, ctx) for chunk, ctx in sample]

    def rate(step: float) -> float:
        return sum(codec.estimate_bits(p, step) for p in prepared) / elements

    lo, hi = 1 / 64, 4.0
    if rate(hi) > bits:
        return hi
    while hi / lo > 1.01:  # geometric bisection: the rate falls as the step grows
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if rate(mid) > bits else (lo, mid)
    return round(hi, 4)


def frontier_at(bits: float, *, center: bool, sinks: int = 4, recent: int = 32, salient: float = 0.0) -> Planner:
    def plan(array: np.ndarray, model: ModelIdentity) -> Pipeline:
        x = to_float32(np.asarray(array))
        config = dict(center=center, sinks=sinks, recent=recent, salient=salient, seed=SEED)
        return Pipeline(FrontierCodec(step=frontier_step(x, bits, **config), **config))

    return plan


def mixed_at(bits: float, *, base_bits: int = 2, salient_bits: int = 4, sinks: int = 4, recent: int = 32) -> Planner:
    def plan(array: np.ndarray, model: ModelIdentity) -> Pipeline:
        _, _, t, d = array.shape
        cfg = MixedConfig(base_bits=base_bits, salient_bits=salient_bits, salient=0.0, sinks=sinks, recent=recent,
                          seed=SEED)
        frac = plan_fraction(bits, d, t, min(t, sinks + recent), cfg)
        return Pipeline(MixedCodec(cfg.model_copy(update={"salient": round(frac, 4)})))

    return plan
