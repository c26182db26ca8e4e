"""A second, independent decoder of ``cachecard.frontier`` chunks, written from spec/codecs/frontier.md and
the rotation of spec/codecs/turbo.md alone: plain Python integers and floats (IEEE binary64, as the spec's
arithmetic) and numpy for float32 rounding, without ``constriction`` and without ``cachecard.codecs``.

The tests hold it to ``cachecard.codecs.frontier`` bit for bit (golden vectors and hypothesis data), so the
spec text is enough to decode a card; it is slow (one Python step per symbol) and meant for tests only.
Hand-written on purpose: it exists to prove the spec is self-contained, so it may not share code with the
reference implementation it checks.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np

PRECISION = 24                      # bits of the quantized probabilities
WORD = 32                           # bits of a stream word
LOW = 1 << WORD                     # the decoder refills below this state
F = np.array([0x3F800000, 0x3F85AAC3, 0x3F8B95C2, 0x3F91C3D3, 0x3F9837F0, 0x3F9EF532, 0x3FA5FED7, 0x3FAD583F,
              0x3FB504F3, 0x3FBD08A4, 0x3FC5672A, 0x3FCE248C, 0x3FD744FD, 0x3FE0CCDF, 0x3FEAC0C7, 0x3FF5257D],
             dtype="<u4").view("<f4")  # F[j] = float32(2^(j/16)), the spec's table, as bit patterns


@dataclass
class Chunk:
    """The fields of a frontier chunk (spec/codecs/frontier.md "Format"), in file order."""

    flags: int
    step: np.float32
    ref: np.float32
    protected: np.ndarray           # bool (c,)
    mean: np.ndarray | None         # float16 (G, D)
    p_scale: np.ndarray             # float16 (P,)
    p_codes: np.ndarray             # int8 (P, D)
    scale_code: np.ndarray          # uint8 (E,)
    qmin: int
    counts: np.ndarray              # uint32 (nsym,)
    words: np.ndarray               # uint32 (nwords,)
    version: int = 1
    reserved: int = 0


def parse(data: bytes, shape: tuple[int, ...]) -> Chunk:
    """Split a chunk of ``shape`` (..., c, D) into its fields; ValueError if the sizes disagree."""
    *lead, c, d = shape
    g = math.prod(lead)
    pos = 0

    def take(fmt: str, count: int = 1) -> np.ndarray:
        nonlocal pos
        size = np.dtype(fmt).itemsize * count
        if pos + size > len(data):
            raise ValueError(f"chunk ends at byte {len(data)}; field needs bytes {pos}..{pos + size}")
        out = np.frombuffer(data, fmt, count, pos)
        pos += size
        return out

    version, flags, reserved = int(take("u1")[0]), int(take("u1")[0]), int(take("<u2")[0])
    if version != 1 or flags & ~1:
        raise ValueError(f"version {version}, flags {flags}: not a version-1 chunk")
    step, ref = take("<f4")[0], take("<f4")[0]
    protected = np.unpackbits(take("u1", (c + 7) // 8), bitorder="little")[:c].astype(bool)
    mean = take("<f2", g * d).reshape(g, d) if flags & 1 else None
    p = g * int(protected.sum())
    p_scale, p_codes = take("<f2", p), take("i1", p * d).reshape(p, d)
    scale_code = take("u1", g * c - p)
    qmin, nsym, nwords = int(take("<i2")[0]), int(take("<u2")[0]), int(take("<u4")[0])
    if nsym == 0:
        raise ValueError("nsym is 0")
    counts, words = take("<u4", nsym), take("<u4", nwords)
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes after the rANS stream")
    return Chunk(flags, step, ref, protected, mean, p_scale, p_codes, scale_code, qmin, counts, words, version,
                 reserved)


def build(ch: Chunk) -> bytes:
    """The bytes of a chunk from its fields (the inverse of ``parse``), for tests that craft chunks."""
    head = struct.pack("<BBHff", ch.version, ch.flags, ch.reserved, float(ch.step), float(ch.ref))
    parts = [head, np.packbits(ch.protected.astype(np.uint8), bitorder="little").tobytes()]
    if ch.mean is not None:
        parts.append(np.asarray(ch.mean, "<f2").tobytes())
    parts += [np.asarray(ch.p_scale, "<f2").tobytes(), np.asarray(ch.p_codes, "i1").tobytes(),
              np.asarray(ch.scale_code, "u1").tobytes(), struct.pack("<hHI", ch.qmin, len(ch.counts), len(ch.words)),
              np.asarray(ch.counts, "<u4").tobytes(), np.asarray(ch.words, "<u4").tobytes()]
    return b"".join(parts)


# -- rANS (frontier.md "Entropy coding") ------------------------------------------------------------------
def quantized_cdf(counts: np.ndarray) -> list[int]:
    """cdf[0..n] of the 24-bit model: binary64 probabilities, left-to-right sums, floor, +k."""
    n = len(counts)
    total = sum(int(x) for x in counts)
    p = [float(int(x)) / float(total) for x in counts]      # binary64 division, rounded to nearest
    partial = [0.0]
    for pk in p:                                             # left to right, each sum rounded
        partial.append(partial[-1] + pk)
    scale = float((1 << PRECISION) - n) / partial[-1]
    return [math.floor(partial[k] * scale) + k for k in range(n)] + [1 << PRECISION]


def rans_decode(words: np.ndarray, cdf: list[int], count: int) -> list[int]:
    """``count`` symbols from a stream (read from its last word); ValueError if it is not a valid stream."""
    w = [int(x) for x in words]
    if w and w[-1] == 0:
        raise ValueError("the rANS stream's last word is 0")
    state = w.pop() if w else 0
    if w:
        state = (state << WORD) | w.pop()
    out = []
    starts = cdf[:-1]
    for _ in range(count):
        quantile = state & ((1 << PRECISION) - 1)
        s = _last_le(starts, quantile)
        state = (state >> PRECISION) * (cdf[s + 1] - cdf[s]) + quantile - cdf[s]
        if state < LOW and w:
            state = (state << WORD) | w.pop()
        out.append(s)
    if state != 0:
        raise ValueError(f"the rANS state is {state:#x}, not 0, after the last symbol")
    return out


def rans_encode(symbols: list[int], cdf: list[int]) -> list[int]:
    """The stream of ``symbols`` (encoded last first, so they decode first to last)."""
    state, out = 0, []
    for s in reversed(symbols):
        f = cdf[s + 1] - cdf[s]
        if (state >> (64 - PRECISION)) >= f:
            out.append(state & (LOW - 1))
            state >>= WORD
        state = ((state // f) << PRECISION) + cdf[s] + state % f
    if state >= LOW:
        out += [state & (LOW - 1), state >> WORD]
    elif state:
        out.append(state)
    return out


def _last_le(starts: list[int], q: int) -> int:
    lo, hi = 0, len(starts)                                  # starts[0] = 0 <= q
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if starts[mid] <= q else (lo, mid)
    return lo


# -- rotation (turbo.md "Rotation") -----------------------------------------------------------------------
def signs(seed: int, d: int) -> np.ndarray:
    bits = hashlib.shake_128(seed.to_bytes(8, "little")).digest((d + 7) // 8)
    return np.array([-1.0 if bits[i // 8] >> (i % 8) & 1 else 1.0 for i in range(d)])


def inverse_rotation(y: np.ndarray, seed: int) -> np.ndarray:
    """R⁻¹ of float32 rows: exact binary64 Walsh-Hadamard butterflies (another order than the reference's
    matrix product; the sums are exact, so the order does not matter), signs, -0 -> +0, times c_D, float32."""
    h = y.astype(np.float64)
    d = h.shape[-1]
    half = 1
    while half < d:
        blocks = h.reshape(*h.shape[:-1], d // (2 * half), 2, half)
        a, b = blocks[..., 0, :].copy(), blocks[..., 1, :].copy()
        blocks[..., 0, :], blocks[..., 1, :] = a + b, a - b
        half *= 2
    s = h * signs(seed, d)
    s = np.where(s == 0, 0.0, s)                             # an exact zero is +0
    return (s * (1.0 / math.sqrt(d))).astype(np.float32)


# -- the whole chunk (frontier.md "Decoding") ----------------------------------------------------------------
def decode(data: bytes, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The float32 decode of one chunk of ``shape`` (..., c, D) under configuration ``seed``."""
    *lead, c, d = shape
    g = math.prod(lead)
    ch = parse(bytes(data), shape)
    y = np.zeros((g, c, d), np.float32)
    y[:, ch.protected] = (ch.p_codes.astype(np.float32) * ch.p_scale.astype(np.float32)[:, None]).reshape(g, -1, d)
    e = len(ch.scale_code)
    if e:
        total = sum(int(x) for x in ch.counts)
        if total != e * d:
            raise ValueError(f"counts add up to {total}, the chunk has {e * d} coded values")
        if len(ch.counts) == 1:
            if len(ch.words):
                raise ValueError("a one-symbol chunk carries a rANS stream")
            sym = [0] * (e * d)
        else:
            sym = rans_decode(ch.words, quantized_cdf(ch.counts), e * d)
        q = (np.array(sym, np.int64) + ch.qmin).astype(np.float32).reshape(e, d)
        y[:, ~ch.protected] = (q * (ch.step * rms_q(ch.scale_code, ch.ref))[:, None]).reshape(g, -1, d)
    x = inverse_rotation(y.reshape(-1, d), seed).reshape(g, c, d)
    if ch.mean is not None:
        x = x + ch.mean.astype(np.float32)[:, None, :]
    return x.reshape(shape)


def rms_q(code: np.ndarray, ref: np.float32) -> np.ndarray:
    """Decoded RMS per vector: 0 for code 0, else ldexp(ref·F[e mod 16], floor(e/16)), e = code − 255."""
    out = np.zeros(len(code), np.float32)
    for i, k in enumerate(code.tolist()):
        if k:
            e = k - 255
            out[i] = np.ldexp(np.float32(ref * F[e % 16]), e // 16)
    return out
