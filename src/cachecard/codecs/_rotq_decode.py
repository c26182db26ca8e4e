"""Decoders of ``cachecard.rotq`` (spec/codecs/rotq.md "Decoding"): numpy (the reference, and the host path)
and whole-tensor torch ops (the device path). Both compute, per vector, integer levels w = s ⊙ q, the
integer h = H w (exact in float32 in any order), then fl(h · σ), then fl(· + μ): the same bits.

The numpy decoder turns packed bytes into signed levels with one table lookup per byte (or per 12 bits for
3-bit codes): the tables hold, for each byte position, the levels of every byte value with the rotation's
signs already applied, so unpacking, level lookup and sign flips cost one gather. The Hadamard transform is
one float32 BLAS product (a Kronecker factorisation for D >= 128, where it is cheaper).
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from cachecard.codecs import _hadamard as hadamard
from cachecard.codecs.base import from_float32
from cachecard.codecs.rotq import HEADER, levels, record_bytes, scale_table, sylvester

if TYPE_CHECKING:
    import torch

Layout = tuple[int, int, int, int, bool, float]  # bits, sink_end, recent_start, recent_end, centered, ref


def sections(data_size: int, shape: tuple[int, ...], layout: Layout) -> dict[str, tuple[int, int]]:
    """Byte ranges [start, stop) of the chunk's sections."""
    bits, a, r0, r1, centered, _ = layout
    *_, t, d = shape
    g = math.prod(shape[:-2])
    p = a + r1 - r0
    out, pos = {}, HEADER.size
    for name, size in (("mean", 2 * g * d if centered else 0), ("pcodes", g * p * d),
                       ("codes", g * (t - p) * record_bytes(d, bits)), ("scales", g * t)):
        out[name] = (pos, pos + size)
        pos += size
    assert pos == data_size
    return out


@lru_cache(maxsize=32)
def _signed_lut(bits: int, dim: int, seed: int) -> tuple[np.ndarray, int]:
    """(table, field bits): table[f, v] holds, as one unsigned word, the int8 signed levels s_i·L[code_i] of
    the coordinates that field f of a record covers when its value is v. Fields are bytes, or 12 bits (four
    3-bit codes) for 3-bit codes."""
    field = 12 if bits == 3 else 8
    per = field // bits
    nfields = dim // per
    v = np.arange(1 << field)
    codes = (v[:, None] >> (bits * np.arange(per))) & ((1 << bits) - 1)  # (values, per)
    lv = levels(bits)[codes].astype(np.int16)                              # (values, per)
    s = hadamard.signs(seed, dim).astype(np.int16).reshape(nfields, per)   # (fields, per)
    signed = (lv[None, :, :] * s[:, None, :]).astype(np.int8)              # (fields, values, per)
    word = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[per]
    out = np.ascontiguousarray(signed).view(word).reshape(nfields, 1 << field)
    out.flags.writeable = False
    return out, field


def signed_levels(data: np.ndarray, start: int, n: int, bits: int, dim: int, seed: int) -> np.ndarray:
    """The ``n`` packed records at byte ``start`` of the payload ``data`` (1-D, contiguous uint8) -> signed
    levels s ⊙ L[code], (n, D) int8."""
    lut, field = _signed_lut(bits, dim, seed)
    width = record_bytes(dim, bits)
    if field == 12:
        # 8 codes in 3 bytes: each 3-byte group is the low 24 bits of an unaligned uint32 read at a stride of 3
        # (the read past the last group lands in the scale section, which always follows the records)
        groups = n * width // 3
        word = np.ndarray((groups,), "<u4", buffer=data, offset=start, strides=(3,)).astype(np.int32)
        idx = np.empty((groups, 2), np.int32)
        idx[:, 0] = word
        idx[:, 1] = word >> 12
        idx &= 0xFFF
        idx = idx.reshape(n, -1)
    else:
        idx = data[start:start + n * width].reshape(n, width).astype(np.int32)
    idx += _field_offsets(idx.shape[1], field)
    return np.take(lut.reshape(-1), idx).view(np.int8).reshape(n, dim)


@lru_cache(maxsize=16)
def _field_offsets(fields: int, field: int) -> np.ndarray:
    out = np.arange(fields, dtype=np.int32) << field
    out.flags.writeable = False
    return out


def hadamard_rows(w: np.ndarray) -> np.ndarray:
    """H w for rows of signed levels w (N, D) int8, as float32 (numpy's float32 BLAS). Every partial sum is
    an integer below 2^24, so any exact-integer or float32 evaluation gives the same result."""
    n, d = w.shape
    wf = w.astype(np.float32)
    if d < 128:
        return wf @ sylvester(d)
    # H_D = H_8 ⊗ H_(D/8): a product over the last D/8 coordinates, then one over the leading 8, on an (N, 8, D/8)
    # view; fewer flops than the D x D product at D >= 128
    b = d // 8
    y = (wf.reshape(n * 8, b) @ sylvester(b)).reshape(n, 8, b)
    return np.matmul(sylvester(8), y).reshape(n, d)


@lru_cache(maxsize=16)
def _int8_sylvester(dim: int) -> torch.Tensor:
    import torch

    return torch.from_numpy(sylvester(dim).astype(np.int8))


def signed_rows(data: np.ndarray, shape: tuple[int, ...], layout: Layout, seed: int) -> np.ndarray:
    """w = s ⊙ q of every vector, (G·T, D) int8 in token order."""
    bits, a, r0, r1, _, _ = layout
    *_, t, d = shape
    g = math.prod(shape[:-2])
    sec = sections(data.size, shape, layout)
    p = a + r1 - r0
    base = signed_levels(data, sec["codes"][0], g * (t - p), bits, d, seed) if t - p else None
    if not p:
        return base
    w = np.empty((g, t, d), np.int8)
    pc = data[slice(*sec["pcodes"])].view(np.int8).reshape(g, p, d) * hadamard.signs(seed, d).astype(np.int8)
    w[:, :a], w[:, r0:r1] = pc[:, :a], pc[:, a:]
    if base is not None:
        base = base.reshape(g, t - p, d)
        w[:, a:r0], w[:, r1:] = base[:, :r0 - a], base[:, r0 - a:]
    return w.reshape(g * t, d)


def decode_numpy(data: np.ndarray, shape: tuple[int, ...], layout: Layout, seed: int,
                 storage: np.dtype | None = None) -> np.ndarray:
    """The chunk as float32, or (``storage``) in the storage element type, rounded to nearest even.

    When the caller has torch loaded, the product H w is torch's int8 x int8 -> int32 product (VNNI on x86:
    several times numpy's float32 product) and the scale, mean and cast run as torch's vectorised kernels;
    the steps and their roundings are the same, so the bits are too (tested)."""
    *_, t, d = shape
    g = math.prod(shape[:-2])
    sec = sections(data.size, shape, layout)
    w = signed_rows(data, shape, layout, seed)
    sigma = scale_table(np.float32(layout[5]))[data[slice(*sec["scales"])]]
    mean = data[slice(*sec["mean"])].view("<f2").reshape(g, 1, d) if layout[4] else None
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "_int_mm"):
        try:
            h = torch._int_mm(torch.from_numpy(w), _int8_sylvester(d))
        except RuntimeError:  # a torch build without a CPU int8 product: the float path is as exact
            h = None
        if h is not None:
            return _finish_torch(torch, h, sigma, mean, (g, t, d), storage).reshape(shape)
    x = hadamard_rows(w)
    x *= sigma[:, None]
    x = x.reshape(g, t, d)
    if mean is not None:
        x += mean.astype(np.float32)
    return (x if storage is None else from_float32(x, storage)).reshape(shape)


def _finish_torch(torch, h, sigma: np.ndarray, mean: np.ndarray | None, gtd: tuple[int, int, int],  # noqa: ANN001
                  storage: np.dtype | None) -> np.ndarray:
    """fl(h · σ), then fl(· + μ), then the cast, with torch on the CPU (separate kernels: no fused multiply-add)."""
    x = h.to(torch.float32)
    x.mul_(torch.from_numpy(sigma)[:, None])
    x = x.view(gtd)
    if mean is not None:
        x.add_(torch.from_numpy(mean.copy()).to(torch.float32))
    if storage is None or np.dtype(storage) == np.dtype("<f4"):
        return x.numpy()
    half = x.to(torch.float16 if np.dtype(storage) == np.dtype("<f2") else torch.bfloat16)
    return half.view(torch.int16).numpy().view(storage)


def decode_torch(data: torch.Tensor, shape: tuple[int, ...], layout: Layout, seed: int) -> torch.Tensor:
    import torch

    bits, a, r0, r1, centered, ref = layout
    *_, t, d = shape
    g = math.prod(shape[:-2])
    dev = data.device
    sec = sections(data.numel(), shape, layout)
    p = a + r1 - r0

    def part(name: str) -> torch.Tensor:
        return data[sec[name][0]:sec[name][1]]

    q = torch.empty((g, t, d), dtype=torch.int16, device=dev)
    if p:
        pc = part("pcodes").view(torch.int8).reshape(g, p, d).to(torch.int16)
        q[:, :a], q[:, r0:r1] = pc[:, :a], pc[:, a:]
    if t - p:
        rec = part("codes").reshape(g * (t - p), -1)
        if bits == 3:  # 8 codes in 3 bytes, little-endian: one 24-bit word per group
            grp = rec.reshape(rec.shape[0], -1, 3).to(torch.int32)
            word = grp[..., 0] | (grp[..., 1] << 8) | (grp[..., 2] << 16)
            shifts = torch.arange(0, 24, 3, device=dev, dtype=torch.int32)
        else:
            word = rec.to(torch.int32)
            shifts = torch.arange(0, 8, bits, device=dev, dtype=torch.int32)
        codes = ((word[..., None] >> shifts) & ((1 << bits) - 1)).reshape(g, t - p, d).long()
        base = torch.from_numpy(levels(bits).astype(np.int16)).to(dev)[codes]
        q[:, a:r0], q[:, r1:] = base[:, :r0 - a], base[:, r0 - a:]
    s = torch.from_numpy(hadamard.signs(seed, d).astype(np.int16)).to(dev)
    w = (q * s).to(torch.float32).reshape(-1, d)
    h = w @ torch.from_numpy(sylvester(d).copy()).to(dev)
    sigma = torch.from_numpy(scale_table(np.float32(ref))).to(dev)[part("scales").long()]
    x = (h * sigma[:, None]).reshape(g, t, d)
    if centered:
        x = x + part("mean").clone().view(torch.float16).to(torch.float32).reshape(g, 1, d)
    return x.reshape(shape)
