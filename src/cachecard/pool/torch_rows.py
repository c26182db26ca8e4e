"""Resident rows on a torch device (DESIGN.md §4 "Hot tier", §5): the codecs of ``cachecard.pool.codecs``
encoded and decoded where the tensors are, bit for bit what their numpy (card) codecs produce.

The arithmetic is the numpy encoders' own, operation by operation in float32 (each torch operation is its own
kernel, so nothing is fused into a differently rounded one); ties round as numpy does (``torch.round`` is
half-to-even like ``np.rint``; ggml's half-away-from-zero is spelled out), and ``torch.argmax`` returns the
first maximum like ``np.argmax``. Tests hold the two to equal bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachecard.codecs.mlx_affine import EPS

from cachecard.pool.codecs import TURBO_GAIN_BYTES

if TYPE_CHECKING:
    from cachecard.pool.codecs import ResidentCodec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def encode(codec: ResidentCodec, x: torch.Tensor) -> torch.Tensor:
    """Vectors ``(..., head_dim)`` -> rows ``(..., row_bytes)`` uint8, on ``x.device``."""
    lead = x.shape[:-1]
    if codec.kind == "float":
        return x.to(TORCH_DTYPES[codec.card_dtype]).contiguous().view(torch.uint8).reshape(*lead, codec.row_bytes)
    if codec.kind == "turbo":
        # On the host with the card codec itself: its float32 norms and gains are numpy sums in numpy's order,
        # which a torch reduction would not reproduce to the bit (spec/codecs/turbo.md: encoders may differ).
        rows = codec.encode_np(x.detach().float().cpu().numpy())
        return torch.from_numpy(rows).to(x.device)
    # the values in the card's element type first, as ResidentCodec.encode_np
    x = x.detach().to(TORCH_DTYPES[codec.card_dtype]).float().reshape(-1, codec.head_dim)
    rows = _ggml(x, codec.name) if codec.kind == "ggml" else _affine(x, codec)
    return rows.reshape(*lead, codec.row_bytes)


def _ggml(x: torch.Tensor, name: str) -> torch.Tensor:
    blocks = x.reshape(-1, 32)
    if name == "q8_0":
        d = blocks.abs().amax(dim=1, keepdim=True) / 127.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        y = blocks * inv
        a = y.abs()
        fl = a.floor()
        q = (torch.sign(y) * (fl + (2 * (a - fl)).floor())).to(torch.int8).view(torch.uint8)  # C roundf
    else:  # q4_0: d = m / -8, m the element of largest magnitude (the first one)
        m = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
        d = m / -8.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        c = torch.clamp((blocks * inv + 8.5).trunc(), max=15).to(torch.uint8)
        q = c[:, :16] | (c[:, 16:] << 4)
    scale = d.to(torch.float16).view(torch.uint8)
    return torch.cat([scale, q], dim=1).reshape(x.shape[0], -1)


def _affine(x: torch.Tensor, codec: ResidentCodec) -> torch.Tensor:
    bits, group = codec.bits, 64
    g = x.reshape(x.shape[0], -1, group)
    w_max, w_min = g.amax(dim=-1, keepdim=True), g.amin(dim=-1, keepdim=True)
    mask = w_min.abs() > w_max.abs()
    scale = torch.clamp((w_max - w_min) / float((1 << bits) - 1), min=float(EPS))
    scale = torch.where(mask, scale, -scale)
    edge = torch.where(mask, w_min, w_max)
    q0 = (edge / scale).round()
    nz = q0 != 0
    scale = torch.where(nz, edge / q0, scale)  # the edge lands exactly on code q0
    bias = torch.where(nz, edge, torch.zeros_like(edge))
    q = torch.clamp(((g - bias) / scale).round(), 0, (1 << bits) - 1).to(torch.uint8).reshape(x.shape[0], -1)
    packed = q if bits == 8 else q[:, 0::2] | (q[:, 1::2] << 4)  # little-endian bit stream, low nibble first
    sdt = TORCH_DTYPES[codec.scale_dtype]
    s, b = (t.reshape(x.shape[0], -1).to(sdt).contiguous().view(torch.uint8) for t in (scale, bias))
    return torch.cat([packed, s, b], dim=1)


def decode(codec: ResidentCodec, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``(..., row_bytes)`` -> vectors ``(..., head_dim)`` in ``dtype``, on ``rows.device``."""
    lead, d = rows.shape[:-1], codec.head_dim
    if codec.kind == "float":
        return rows.contiguous().view(TORCH_DTYPES[codec.card_dtype]).reshape(*lead, d).to(dtype)
    if codec.kind == "ggml":
        return codec.serializer.decode_torch(rows.reshape(-1), (*lead, d)).to(dtype)
    if codec.kind == "turbo":  # the card layout (every gain, then every vector's codes) for the card decoder
        flat = rows.reshape(-1, codec.row_bytes)
        g = TURBO_GAIN_BYTES
        payload = torch.cat([flat[:, :g].reshape(-1), flat[:, g:].reshape(-1)])
        return codec.serializer.decode_torch(payload, (*lead, d)).to(dtype)
    p = d * codec.bits // 8
    s = (d // 64) * torch.empty((), dtype=TORCH_DTYPES[codec.scale_dtype]).element_size()
    sdt = TORCH_DTYPES[codec.scale_dtype]
    packed = rows[..., :p]
    if codec.bits == 8:
        out = packed.float()
    else:  # unpacking in uint8, then one conversion, is the fastest on a CPU
        out = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(*lead, d).float()
    out = out.reshape(*lead, d // 64, 64)
    scales = rows[..., p:p + s].contiguous().view(sdt).reshape(*lead, -1, 1).float()
    biases = rows[..., p + s:].contiguous().view(sdt).reshape(*lead, -1, 1).float()
    # mx.dequantize rounds s·q, then s·q + b, to the scale type; s·q is exact in float32 (a code has at most
    # 8 bits, a 16-bit scale 11), so float32 arithmetic plus two casts gives its bits, faster than 16-bit
    # arithmetic on a CPU
    out *= scales
    if sdt != torch.float32:
        out = out.to(sdt).float()
    out += biases
    return out.reshape(*lead, d).to(sdt).to(dtype)


__all__ = ["decode", "encode"]
