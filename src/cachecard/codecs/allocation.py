"""Per-layer, per-K/V rates of ``cachecard.rotq`` planned to a card's bit budget (spec/codecs/rotq.md "Rate
planning").

Every stored byte counts: headers, scale codes, key means and protected tokens are fixed costs of the card's
shape; the rest of the budget is spread over the ``2·L`` rates (one per layer and K/V) by greedy marginal
allocation — a bit at a time to the rate whose distortion drop, weighted by its layer's sensitivity, is the
largest. Sensitivities come from the model's profile (``cachecard.codecs.profiles``); without one every
layer is alike and keys weigh three times values (the data-independent default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cachecard.codecs import profiles
from cachecard.codecs.rotq import HEADER

if TYPE_CHECKING:
    from cachecard.manifest import ModelIdentity

# relative MSE of a Gaussian vector per bit width, unbiased gain (tests/codecs/test_codec_quality.py)
DISTORTION = {1: 0.557, 2: 0.125, 3: 0.0316, 4: 0.0084}
DEFAULT_KEY_WEIGHT = 3.0     # without a profile: a key's distortion costs three times a value's
CHUNK_OVERHEAD = 4 + 16      # stored per chunk beside its payload: crc32c and the shard-index entry
CHUNK_TOKENS = 256           # the writer's default (cachecard.card.layout.DEFAULT_CHUNK_TOKENS)


@dataclass(frozen=True)
class Plan:
    """Bits per layer for keys and values, and the rate (bits per element) they give the card."""

    k: tuple[int, ...]
    v: tuple[int, ...]
    bits_per_element: float


def sensitivities(model: ModelIdentity | None, layers: int) -> tuple[np.ndarray, np.ndarray] | None:
    """KL per unit of relative MSE of each layer's K and V from the model's profile, or None without one (or
    when profiles are switched off, or the profile is of another layer count)."""
    from cachecard.codecs.planning import USE_PROFILES

    if model is None or not USE_PROFILES.get():
        return None
    p = profiles.lookup(model.weights_hash)
    if p is None or len(p.k) != layers or len(p.v) != layers:
        return None
    k = np.asarray(p.k, np.float64) / (p.k_step**2 / 12)  # a uniform step's MSE: the reference distortion
    v = np.asarray(p.v, np.float64) / (p.v_step**2 / 12)
    floor = max(k.max(), v.max()) * 1e-4  # a KL of 0 is noise, not a free layer
    return np.maximum(k, floor), np.maximum(v, floor)


def fixed_bits(shape: tuple[int, ...], sinks: int, recent: int, chunk_tokens: int = CHUNK_TOKENS) -> tuple[int, int, int]:
    """(bits stored for K apart from its codes, the same for V, unprotected elements per layer and array)."""
    layers, heads, t, d = shape
    chunks = max(1, math.ceil(t / chunk_tokens))
    protected = min(t, sinks) + max(0, min(recent, t - sinks))
    per_layer = 8 * (chunks * (HEADER.size + CHUNK_OVERHEAD) + heads * t + heads * protected * d)
    mean = 8 * chunks * 2 * heads * d
    return layers * (per_layer + mean), layers * per_layer, heads * (t - protected) * d


def allocate(weights_k: np.ndarray, weights_v: np.ndarray, total_bits: int, lo: int = 2, hi: int = 4) -> tuple[list[int], list[int]]:
    """Integer bits per K and V layer in [lo, hi] summing to at most ``total_bits`` (and at least ``lo`` each):
    one bit at a time to the largest weighted distortion drop, ties to keys, then to the lower layer."""
    weights = np.concatenate([weights_k, weights_v])
    bits = np.full(len(weights), lo)
    spare = total_bits - bits.sum()
    while spare > 0:
        gain = np.array([w * (DISTORTION[b] - DISTORTION[b + 1]) if b < hi else -1.0 for w, b in zip(weights, bits)])
        best = int(np.argmax(gain))  # first maximum: keys before values, lower layers first
        if gain[best] < 0:
            break
        bits[best] += 1
        spare -= 1
    n = len(weights_k)
    return [int(b) for b in bits[:n]], [int(b) for b in bits[n:]]


def plan(shape: tuple[int, ...], target_bits: float, model: ModelIdentity | None, *, sinks: int, recent: int,
         lo: int = 2, hi: int = 4) -> Plan:
    """The rates meeting ``target_bits`` per element on a card of K and V arrays of ``shape`` (L, H, T, D)."""
    layers = shape[0]
    fixed_k, fixed_v, base = fixed_bits(shape, sinks, recent)
    weights = sensitivities(model, layers)
    if weights is None:
        weights = np.full(layers, DEFAULT_KEY_WEIGHT), np.ones(layers)
    elements = 2 * math.prod(shape)
    spare = target_bits * elements - fixed_k - fixed_v
    total = int(spare // base) if base else 2 * layers * lo
    k, v = allocate(*weights, total, lo, hi)
    stored = fixed_k + fixed_v + base * (sum(k) + sum(v))
    return Plan(tuple(k), tuple(v), stored / elements)
