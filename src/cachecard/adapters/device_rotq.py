"""The fused device decode of ``cachecard.rotq`` chunks (spec/codecs/rotq.md "Decoding"), for the restore path.

rotq chunks differ in size (protected tokens, per-layer rates), so their 24-byte headers are read on the host
(they are in the pinned staging buffer already), checked, and turned into per-chunk section offsets; then one
Triton kernel decodes every vector of every chunk: codes unpacked, levels looked up and signed, the inverse
Walsh-Hadamard transform as one small matrix product (the levels are integers: exact in bfloat16 with
float32 accumulation), ``fl(h·σ)``, then ``fl(· + mean)`` without contraction, the storage rounding, the output
dtype, and the row written where it belongs. Bit for bit the reference decoder's values
(tests/adapters/test_device_decode.py, on a GPU).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from cachecard.card.stream import ChunkTable
from cachecard.errors import CorruptCardError

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

HEADER = np.dtype([("version", "u1"), ("flags", "u1"), ("bits", "u1"), ("reserved", "u1"), ("a", "<u4"),
                   ("r0", "<u4"), ("r1", "<u4"), ("ref", "<f4"), ("zero", "<u4")])
VECTORS = 64  # vectors per program


def parse_headers(host: np.ndarray, table: ChunkTable, chunk_shape: tuple[int, ...], label: str,
                  which: str) -> dict[str, np.ndarray]:
    """Every chunk's header, checked as the codec checks it, and its sections' offsets in the buffer."""
    _, G, T, D = chunk_shape
    rel = table.payload_offsets()
    size = table.nbytes - 4
    short = np.flatnonzero(size < HEADER.itemsize)
    head = np.zeros(len(rel), HEADER)
    ok_rows = np.flatnonzero(size >= HEADER.itemsize)
    if len(ok_rows):
        raw = host[rel[ok_rows, None] + np.arange(HEADER.itemsize)]
        head[ok_rows] = raw.view(HEADER).reshape(-1)
    bits = head["bits"].astype(np.int64)
    a, r0, r1 = (head[k].astype(np.int64) for k in ("a", "r0", "r1"))
    centered = (head["flags"] & 1).astype(np.int64)
    P = a + r1 - r0
    b = np.clip(bits, 1, 4)
    want = HEADER.itemsize + 2 * G * D * centered + G * P * D + G * (T - P) * (D * b // 8) + G * T
    bad = ((head["version"] != 1) | (head["flags"] & ~np.uint8(1) != 0) | (head["reserved"] != 0)
           | (head["zero"] != 0) | (bits < 1) | (bits > 4) | ~((a <= r0) & (r0 <= r1) & (r1 <= T))
           | ~np.isfinite(head["ref"]) | (head["ref"] < 0) | (size != want))
    bad[short] = True
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CorruptCardError(f"the {which!r} chunk of layer {int(table.layers[i])}, token chunk "
                               f"{int(table.token_chunks[i])} has a rotq header that does not fit its "
                               f"{int(size[i])} bytes; the card is damaged, delete it and save it again",
                               card=label, part=which)
    mean = rel + HEADER.itemsize
    pcodes = mean + 2 * G * D * centered
    codes = pcodes + G * P * D
    scales = codes + G * (T - P) * (D * b // 8)
    return {"bits": bits, "a": a, "r0": r0, "r1": r1, "centered": centered, "ref": head["ref"].astype(np.float32),
            "mean": mean, "pcodes": pcodes, "codes": codes, "scales": scales}


# The rotation runs as a tensor-core dot of integer codes (|w| <= 127) and +-1 entries, exact in bfloat16 with a
# float32 sum. Triton's CPU interpreter (TRITON_INTERPRET=1, how CI runs this kernel) has no bfloat16 dot: it
# multiplies the raw bits. There the same exact products are taken in float32.
DOT_DTYPE = torch.float32 if os.environ.get("TRITON_INTERPRET") == "1" else torch.bfloat16


def tables(seed: int, D: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(levels by bits, signs, Hadamard matrix, F[j] and 2^k of each of the 256 scale codes) on the device."""
    from cachecard.codecs import _hadamard as hadamard
    from cachecard.codecs import rotq

    lv = np.zeros((5, 16), np.int32)
    for bits in range(1, 5):
        lv[bits, :1 << bits] = rotq.levels(bits)
    sig = hadamard.signs(seed, D).astype(np.int32)
    return (torch.from_numpy(lv.reshape(-1)).to(device), torch.from_numpy(sig).to(device),
            torch.from_numpy(rotq.sylvester(D).astype(np.float32)).to(device=device, dtype=DOT_DTYPE),
            torch.from_numpy(np.asarray(rotq.FRAC[rotq._J], np.float32)).to(device),  # noqa: SLF001 - the spec's
            torch.from_numpy(np.asarray(rotq._POW2, np.float32)).to(device))  # noqa: SLF001 - j and 2^k per code


if triton is not None:
    @triton.jit
    def _rotq_kernel(raw8, raw_i8, raw16, meta_i, meta_f, layers, jidx, levels, signs, hmat, frac, pow2, out,
                     s0, s1, s2, s3, tokens, n_chunks,
                     G: tl.constexpr, T: tl.constexpr, D: tl.constexpr, STORAGE: tl.constexpr,
                     BV: tl.constexpr):
        c = tl.program_id(0)
        v = tl.program_id(1) * BV + tl.arange(0, BV)        # vector index g*T + t within the chunk
        i = tl.arange(0, D)
        g = v // T
        t = v % T
        bits = tl.load(meta_i + 0 * n_chunks + c)
        a = tl.load(meta_i + 1 * n_chunks + c)
        r0 = tl.load(meta_i + 2 * n_chunks + c)
        r1 = tl.load(meta_i + 3 * n_chunks + c)
        centered = tl.load(meta_i + 4 * n_chunks + c)
        mean_off = tl.load(meta_i + 5 * n_chunks + c)
        p_off = tl.load(meta_i + 6 * n_chunks + c)
        c_off = tl.load(meta_i + 7 * n_chunks + c)
        s_off = tl.load(meta_i + 8 * n_chunks + c)
        ref = tl.load(meta_f + c)
        layer = tl.load(layers + c)
        j = tl.load(jidx + c)
        live = v < G * T
        tok = j * T + t
        P = a + r1 - r0
        prot = (t < a) | ((t >= r0) & (t < r1))
        prank = tl.where(t < a, t, a + t - r0)
        urank = tl.where(t < r0, t - a, t - a - (r1 - r0))
        m2 = live[:, None] & (i[None, :] >= 0)
        # protected: int8 codes
        pq = tl.load(raw_i8 + p_off + (g * P + prank)[:, None] * D + i[None, :], mask=m2 & prot[:, None], other=0)
        # unprotected: a little-endian bit stream per record, code i in bits [i*b, (i+1)*b)
        rec = c_off + (g * (T - P) + urank) * (D * bits // 8)
        bit = i * bits
        um = m2 & ~prot[:, None]
        lo = tl.load(raw8 + rec[:, None] + (bit >> 3)[None, :], mask=um, other=0).to(tl.int32)
        hi = tl.load(raw8 + rec[:, None] + (bit >> 3)[None, :] + 1, mask=um & (((bit & 7) + bits) > 8)[None, :],
                     other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> (bit & 7)[None, :]) & ((1 << bits) - 1)
        uq = tl.load(levels + bits * 16 + code, mask=um, other=0)
        q = tl.where(prot[:, None], pq.to(tl.int32), uq)
        w = (q * tl.load(signs + i)[None, :]).to(hmat.dtype.element_ty)  # |w| <= 127: exact in bfloat16
        h = tl.dot(w, tl.load(hmat + i[:, None] * D + i[None, :]), out_dtype=tl.float32)  # exact integers
        sc = tl.load(raw8 + s_off + g * T + t, mask=live, other=0).to(tl.int32)
        sigma = (ref * tl.load(frac + sc)) * tl.load(pow2 + sc)   # fl(ref * F[j]) * 2^k, exact second product
        sigma = tl.where(sc == 0, 0.0, sigma)
        y = h * sigma[:, None]
        mean = tl.load(raw16 + (mean_off // 2 + g * D)[:, None] + i[None, :], mask=m2 & (centered != 0),
                       other=0).to(tl.float16, bitcast=True).to(tl.float32)
        y = tl.where(centered != 0, y + mean, y)
        if STORAGE == 0:
            y = y.to(tl.float16).to(tl.float32)
        elif STORAGE == 1:
            y = y.to(tl.bfloat16).to(tl.float32)
        dest = out + (layer * s0) + g[:, None] * s1 + tok[:, None] * s2 + i[None, :] * s3
        tl.store(dest, y.to(out.dtype.element_ty), mask=m2 & (tok < tokens)[:, None])


def decode(raw: torch.Tensor, host: np.ndarray, table: ChunkTable, serializer: object, storage_kind: int,
           out: torch.Tensor, chunk_shape: tuple[int, ...], tokens: int, layer0: int, label: str,
           which: str) -> None:
    """Decode every rotq chunk of ``table`` (bytes in ``raw`` on the device, the same bytes in ``host``)."""
    _, G, T, D = chunk_shape
    n = len(table)
    if not n:
        return
    meta = parse_headers(host, table, chunk_shape, label, which)
    if (meta["mean"] % 2).any():
        raise CorruptCardError("a rotq chunk's float16 means are not 2-byte aligned", card=label, part=which)
    dev = raw.device
    ints = np.stack([meta[k] for k in ("bits", "a", "r0", "r1", "centered", "mean", "pcodes", "codes",
                                        "scales")]).astype(np.int64)
    pos = np.stack([table.layers - layer0, table.token_chunks]).astype(np.int64)
    mi = torch.from_numpy(ints.reshape(-1)).pin_memory().to(dev, non_blocking=True)
    mf = torch.from_numpy(meta["ref"]).pin_memory().to(dev, non_blocking=True)
    mp = torch.from_numpy(pos).pin_memory().to(dev, non_blocking=True)
    lv, sig, hmat, frac, pow2 = tables(serializer.config.seed, D, dev)  # type: ignore[attr-defined]
    padded = raw if raw.numel() % 2 == 0 else torch.nn.functional.pad(raw, (0, 1))
    grid = (n, triton.cdiv(G * T, VECTORS))
    _rotq_kernel[grid](padded, padded.view(torch.int8), padded.view(torch.int16), mi, mf, mp[0], mp[1], lv, sig,
                       hmat, frac, pow2, out, *out.stride(), tokens, n, G=G, T=T, D=D, STORAGE=storage_kind,
                       BV=VECTORS, num_warps=4, enable_fp_fusion=False)


__all__ = ["decode", "parse_headers", "tables"]
