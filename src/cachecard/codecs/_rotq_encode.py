"""The reference encoder of ``cachecard.rotq`` (spec/codecs/rotq.md "Encoding"). Float64 inside: only decoding
is specified to the bit; an encoder is free in how it picks levels and scales."""

from __future__ import annotations

import numpy as np

from cachecard.codecs import _bitpack as bitpack, _hadamard as hadamard
from cachecard.codecs.rotq import (
    GAIN_ITERATIONS, HEADER, MAX_GAIN_RATIO, MIN_REF, SCALE, VERSION, levels, scale_codes, scale_table,
)


def rotate(z: np.ndarray, seed: int) -> np.ndarray:
    """u = s ⊙ (H z) / D for rows z (N, D): the decoder's z = H (s ⊙ u) inverted (H H = D·I), in float64.

    A butterfly, not a BLAS product: a (N, D) x (D, D) product from several writer threads makes a threaded
    BLAS oversubscribe the cores (70x slower on a busy 2-core machine), and the butterfly is deterministic."""
    n, d = z.shape
    y = z.astype(np.float64)
    h = 1
    while h < d:  # Sylvester order: pairs (i, i + h) within blocks of 2h
        v = y.reshape(n, d // (2 * h), 2, h)
        y = np.concatenate([v[:, :, :1] + v[:, :, 1:], v[:, :, :1] - v[:, :, 1:]], axis=2).reshape(n, d)
        h *= 2
    return y * (hadamard.signs(seed, d) / d)


def nearest_codes(u: np.ndarray, sigma: np.ndarray, bits: int) -> np.ndarray:
    """Index of the nearest level of u / sigma (rows), ties to the larger level: the number of midpoints
    between adjacent levels that are <= u / sigma."""
    lv = levels(bits).astype(np.float64)
    v = u / sigma[:, None]
    codes = np.zeros(u.shape, np.uint8)
    for mid in (lv[1:] + lv[:-1]) / 2:
        codes += v >= mid
    return codes


def base_gains(u: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes and gain of unprotected rows: Lloyd iterations on the gain (nearest levels, then the least-squares
    gain), then the unbiased gain <u,u>/<u,c>, capped at MAX_GAIN_RATIO times the least-squares one."""
    lv = levels(bits).astype(np.float64)
    rms = np.sqrt(np.mean(u * u, axis=1))
    live = rms > 0
    sigma = np.where(live, rms / SCALE[bits], 1.0)
    for _ in range(GAIN_ITERATIONS):
        c = lv[nearest_codes(u, sigma, bits)]
        sigma = np.where(live, np.einsum("nd,nd->n", u, c) / np.einsum("nd,nd->n", c, c), 1.0)
    codes = nearest_codes(u, sigma, bits)
    c = lv[codes]
    uc = np.einsum("nd,nd->n", u, c)
    least_squares = uc / np.einsum("nd,nd->n", c, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        unbiased = np.einsum("nd,nd->n", u, u) / uc
    gain = np.where(live, np.minimum(unbiased, MAX_GAIN_RATIO * least_squares), 0.0)
    return codes, gain


def encode(x: np.ndarray, *, bits: int, ranges: tuple[int, int, int], valid: int, center: bool, seed: int) -> bytes:
    """One chunk ``x`` (G, T, D) float32 with protected tokens [0, a) and [r0, r1) and ``valid`` real tokens."""
    g, t, d = x.shape
    a, r0, r1 = ranges
    prot = np.zeros(t, bool)
    prot[:a] = prot[r0:r1] = True
    z = x
    mean = None
    if center:
        body = ~prot
        body[valid:] = False
        if not body.any():
            body[:valid] = True
        mean = (x[:, body].mean(axis=1) if body.any() else np.zeros((g, d), np.float32)).astype("<f2")
        z = x - mean.astype(np.float32)[:, None, :]
    z = z.copy() if z is x else z
    z[:, valid:] = 0  # padding carries no information
    u = rotate(z.reshape(-1, d), seed).reshape(g, t, d)

    pu = u[:, prot].reshape(-1, d)
    bu = u[:, ~prot].reshape(-1, d)
    p_sigma = np.abs(pu).max(axis=1) / 127 if pu.size else np.zeros(0)
    codes, b_sigma = base_gains(bu, bits) if bu.size else (np.zeros((0, d), np.uint8), np.zeros(0))
    ref = np.float32(max(p_sigma.max(initial=0), b_sigma.max(initial=0)))
    if ref < MIN_REF:  # scales this small would be subnormal: store the chunk as zeros (spec "Scales")
        ref = np.float32(0)
        p_sigma, b_sigma = np.zeros_like(p_sigma), np.zeros_like(b_sigma)
    table = scale_table(ref).astype(np.float64)

    p_code = scale_codes(p_sigma, ref, up=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        pq = np.where(p_code[:, None] > 0, np.rint(pu / table[p_code][:, None]), 0)
    pq = np.clip(pq, -127, 127).astype(np.int8)
    b_code = scale_codes(b_sigma, ref, up=False)

    sc = np.empty((g, t), np.uint8)
    sc[:, prot] = p_code.reshape(g, -1)
    sc[:, ~prot] = b_code.reshape(g, -1)
    head = HEADER.pack(VERSION, int(center), bits, 0, a, r0, r1, float(ref), 0)
    parts = [head, b"" if mean is None else mean.tobytes(), pq.tobytes(), bitpack.pack(codes, bits).tobytes(),
             sc.tobytes()]
    return b"".join(parts)

