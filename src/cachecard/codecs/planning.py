"""Presets that plan their configuration from the data to meet a rate (spec/codecs/README.md §6).

- ``frontier_at(bits)``: finds the frontier codec's step that stores the array in about ``bits`` per element,
  by bisection over the code entropy of a sample of chunks (entropy coding makes the rate data-dependent).
  When the model has a sensitivity profile (``cachecard.codecs.profiles``), layers get steps in proportion to
  sensitivity^-1/2 around that step: the rate is then chosen per layer as well as per K/V.
- ``mixed_at(bits)``: the salient fraction of ``cachecard.mixed`` that meets ``bits`` exactly in expectation.
- ``rotq_at(bits)``: per-layer, per-K/V rates of ``cachecard.rotq`` that store the card in at most ``bits``
  per element, every byte counted (``cachecard.codecs.allocation``).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

import numpy as np

from cachecard.codecs import profiles
from cachecard.codecs.base import ChunkContext, to_float32
from cachecard.codecs.frontier import FrontierCodec
from cachecard.codecs.mixed import MixedCodec, MixedConfig, plan_fraction
from cachecard.codecs.pipelines import Pipeline, Planner

if TYPE_CHECKING:
    from cachecard.manifest import ModelIdentity

USE_PROFILES: ContextVar[bool] = ContextVar("USE_PROFILES", default=True)  # off: uniform steps (benchmarks)
SPREAD = 1.5  # per-layer steps stay within [step / SPREAD, step · SPREAD]: the profile is measured near one step
SEED = 0x5EED  # rotation seed of the presets; recorded in every array's codec configuration
SAMPLE_LAYERS = 6
CHUNK = 256


def _sample(x: np.ndarray, every_layer: bool = False) -> list[tuple[np.ndarray, ChunkContext]]:
    """Chunks spread over layers (every layer when their steps differ) and tokens (first, middle and last
    chunk), with their context."""
    layers, _, t, _ = x.shape
    starts = sorted({0, max(0, (t // 2) - CHUNK // 2), max(0, t - CHUNK)})
    out = []
    picked = range(layers) if every_layer else np.linspace(0, layers - 1, min(layers, SAMPLE_LAYERS)).round()
    for layer in np.unique(np.asarray(picked, dtype=int)):
        for s in starts:
            chunk = x[layer:layer + 1, :, s:s + CHUNK]
            n = chunk.shape[2]
            out.append((chunk, ChunkContext(layer=int(layer), token_start=s, valid_tokens=n, card_tokens=t,
                                            positions=np.arange(s, s + n))))
    return out


def layer_weights(model: ModelIdentity | None, which: str, layers: int) -> np.ndarray | None:
    """Relative step of each layer from the model's sensitivity profile, or None without one (or when
    profiles are switched off). Steps go as sensitivity^-1/2 (reverse water-filling: equal marginal cost
    per bit), normalised to geometric mean 1 so the planner's step keeps its meaning, clipped to SPREAD."""
    if model is None or not USE_PROFILES.get():
        return None
    profile = profiles.lookup(model.weights_hash)
    if profile is None:
        return None
    w = np.asarray(profile.k if which == "k" else profile.v, dtype=np.float64)
    if len(w) != layers:
        return None
    w = np.maximum(w, w.max() * 1e-3)
    rel = w**-0.5
    return np.clip(rel / np.exp(np.mean(np.log(rel))), 1 / SPREAD, SPREAD)


def frontier_step(x: np.ndarray, bits: float, rel: np.ndarray | None = None, **config: object) -> float:
    """The step (to about 1%) at which ``cachecard.frontier`` with ``config`` (and per-layer steps ``step · rel``)
    stores ``x`` in ``bits`` per element, from the code entropy of a sample of chunks."""
    sample = _sample(x, every_layer=rel is not None)
    elements = sum(c.size for c, _ in sample)
    codec = FrontierCodec(step=1.0, **config)
    prepared = [(codec.prepare_estimate(chunk, ctx), 1.0 if rel is None else rel[ctx.layer]) for chunk, ctx in sample]

    def rate(step: float) -> float:
        return sum(codec.estimate_bits(p, min(4.0, step * r)) for p, r in prepared) / elements

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
        rel = layer_weights(model, "k" if center else "v", x.shape[0])
        step = frontier_step(x, bits, rel, **config)
        layer_steps = None if rel is None else [round(float(min(4.0, step * r)), 4) for r in rel]
        return Pipeline(FrontierCodec(step=step, layer_steps=layer_steps, **config))

    return plan


def mixed_at(bits: float, *, base_bits: int = 2, salient_bits: int = 4, sinks: int = 4, recent: int = 32) -> Planner:
    def plan(array: np.ndarray, model: ModelIdentity) -> Pipeline:
        _, _, t, d = array.shape
        cfg = MixedConfig(base_bits=base_bits, salient_bits=salient_bits, salient=0.0, sinks=sinks, recent=recent,
                          seed=SEED)
        frac = plan_fraction(bits, d, t, min(t, sinks + recent), cfg)
        return Pipeline(MixedCodec(cfg.model_copy(update={"salient": round(frac, 4)})))

    return plan


def rotq_at(bits: float, *, which: str, sinks: int = 4, recent: int = 32) -> Planner:
    """K (``which="k"``, centered) or V rates of the joint K+V plan: both planners compute the same plan from
    the array's shape (K and V have one shape) and the model's profile."""
    from cachecard.codecs import allocation
    from cachecard.codecs.rotq import RotqCodec

    def plan(array: np.ndarray, model: ModelIdentity) -> Pipeline:
        p = allocation.plan(tuple(array.shape), bits, model, sinks=sinks, recent=recent)
        layer_bits = list(p.k if which == "k" else p.v)
        return Pipeline(RotqCodec(bits=int(round(np.mean(layer_bits))), layer_bits=layer_bits, center=which == "k",
                                  sinks=sinks, recent=recent, seed=SEED))

    return plan
