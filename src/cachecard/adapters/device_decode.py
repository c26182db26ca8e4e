"""Decode, cast and relayout of a card's stored chunks in one pass on the device (spec/cachecard-1.md §10).

Input: the raw bytes of a K or V shard's chunks (as :mod:`cachecard.card.stream` read them, copied to the
device as they are) and the chunk table. Output: ``out[layer, head, token, channel]`` in the runtime's dtype,
any strides (a static cache's preallocated buffers, say). One Triton kernel does it for every chunk at once:
each program decodes a slice of one chunk's blocks (fp16/bf16/fp32 rows, ggml q8_0 / q4_0 / q4_1 blocks),
rounds to the card's storage dtype (what the host decoder returns), converts to the output dtype and writes
the rows where they belong — no intermediate tensor, no per-chunk launch.

:func:`decode_chunks_torch` is the same computation in plain torch ops (per-codec ``decode_torch``), used on
the CPU and wherever Triton is missing; the two agree bit for bit (tests/adapters/test_device_decode.py, run on
a GPU). Floating-point order: ``q * d`` (q8_0, q4_0 after ``q - 8``) and ``q * d`` then ``+ m`` (q4_1), each
rounded to float32, then to the storage dtype, then to the output dtype, all round-to-nearest-even; the kernel
is compiled without FMA contraction so it keeps that order.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from cachecard.card.stream import ChunkTable
from cachecard.errors import CorruptCardError

# codec id -> (kernel kind, block elements, block bytes); "plain" rows are the storage dtype itself
BLOCK_CODECS = {"cachecard.q8_0": (3, 32, 34), "cachecard.q4_0": (4, 32, 18), "cachecard.q4_1": (5, 32, 20)}
PLAIN_KINDS = {np.dtype("<f2"): 0, np.dtype("<u2"): 1, np.dtype("<f4"): 2}
_STORAGE_TORCH = {np.dtype("<f2"): torch.float16, np.dtype("<u2"): torch.bfloat16, np.dtype("<f4"): torch.float32}

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves
    triton = None


ROTQ = (6, 0, 0)  # cachecard.rotq: chunks of varying size, decoded by cachecard.adapters.device_rotq
# The fused rotq kernel has not run on GPU hardware yet (its first run failed before launching, on a renamed
# table; CI runs it under Triton's CPU interpreter, bit-exact for float16/float32: test_kernels_interpreted.py).
# Until tests/adapters/test_device_decode.py passes on a GPU, rotq cards decode on the device through the
# codec's own torch ops (bit-identical to numpy, tested) unless CACHECARD_ROTQ_KERNEL=1.
ROTQ_KERNEL = os.environ.get("CACHECARD_ROTQ_KERNEL") == "1"


def kind_of(serializer: object, storage: np.dtype) -> tuple[int, int, int] | None:
    """(kind, block elements, block bytes) of a serializer this module decodes, else None."""
    codec_id = getattr(serializer, "codec_id", None)
    if codec_id in BLOCK_CODECS:
        return BLOCK_CODECS[codec_id]
    if codec_id == "cachecard.rotq" and storage in PLAIN_KINDS:
        return ROTQ
    if type(serializer).__name__ == "BytesCodec" and storage in PLAIN_KINDS:
        return PLAIN_KINDS[storage], 1, storage.itemsize
    return None


def check_payloads(table: ChunkTable, chunk_elements: int, kind: tuple[int, int, int], label: str,
                   which: str) -> None:
    """Every chunk must hold exactly its blocks + crc32c, at an offset the kernel can load from aligned
    (checked before any launch: a hostile index must not make the kernel read outside its buffer)."""
    if kind == ROTQ:
        return  # sizes vary per chunk: device_rotq.parse_headers checks every header against its size
    _, block, block_bytes = kind
    want = chunk_elements // block * block_bytes + 4
    align = 4 if block_bytes % 4 == 0 else 2
    bad = np.flatnonzero((table.nbytes != want) | (table.payload_offsets() % align != 0))
    if len(bad):
        i = int(bad[0])
        raise CorruptCardError(f"the {which!r} chunk of layer {int(table.layers[i])}, token chunk "
                               f"{int(table.token_chunks[i])} holds {int(table.nbytes[i])} bytes at offset "
                               f"{int(table.offsets[i])}; its codec stores {want}: the card is damaged, delete it "
                               "and save it again", card=label, part=which)


def decode_chunks(raw: torch.Tensor, table: ChunkTable, serializer: object, storage: np.dtype,
                  out: torch.Tensor, chunk_shape: tuple[int, ...], tokens: int, layer0: int = 0, *,
                  host: np.ndarray | None = None, label: str = "", which: str = "") -> None:
    """Decode every chunk of ``table`` from ``raw`` (uint8, ``table.length`` bytes) into ``out`` (layers
    counted from ``layer0``, heads, >= ``tokens`` tokens, channels); tokens past ``tokens`` are not written.
    ``host``: the same bytes on the host (rotq chunk headers are read there)."""
    kind = kind_of(serializer, storage)
    if kind is None:
        raise ValueError(f"no device decoder for {serializer!r}")
    if kind == ROTQ and raw.is_cuda and triton is not None and chunk_shape[3] >= 16 and ROTQ_KERNEL:
        from cachecard.adapters import device_rotq

        buf = host if host is not None else raw.cpu().numpy()
        device_rotq.decode(raw, buf, table, serializer, _STORAGE_KIND[storage], out, chunk_shape, tokens, layer0,
                           label, which)
    elif kind == ROTQ:
        decode_chunks_torch(raw, table, serializer, storage, out, chunk_shape, tokens, layer0)
    elif raw.is_cuda and triton is not None:
        _decode_triton(raw, table, kind, storage, out, chunk_shape, tokens, layer0)
    else:
        decode_chunks_torch(raw, table, serializer, storage, out, chunk_shape, tokens, layer0)


def decode_chunks_torch(raw: torch.Tensor, table: ChunkTable, serializer: object, storage: np.dtype,
                        out: torch.Tensor, chunk_shape: tuple[int, ...], tokens: int, layer0: int = 0) -> None:
    """:func:`decode_chunks` in plain torch ops (the reference, and the CPU path)."""
    _, H, c, D = chunk_shape
    n = len(table)
    if not n:
        return
    kind = kind_of(serializer, storage)
    st = _STORAGE_TORCH[storage]
    if kind == ROTQ or len(set(table.nbytes.tolist())) > 1:  # rotq chunks (sizes vary): one at a time
        rel = table.payload_offsets().tolist()
        x = torch.stack([serializer.decode_torch(  # type: ignore[attr-defined]
            raw[a:a + int(nb) - 4], (1, H, c, D))[0] for a, nb in zip(rel, table.nbytes)]).to(st)
    else:
        size = int(table.nbytes[0]) - 4
        starts = torch.as_tensor(table.payload_offsets(), device=raw.device)
        payloads = raw[starts[:, None] + torch.arange(size, device=raw.device)]  # (n, size): one gather
        if kind is not None and kind[1] == 1:  # plain rows
            x = payloads.reshape(-1).view(st).reshape(n, H, c, D)
        else:
            x = serializer.decode_torch(payloads.reshape(-1), (n, H, c, D)).to(st)  # type: ignore[attr-defined]
    x = x.to(out.dtype)
    for i in range(n):  # one copy per chunk: rows land where they belong
        a = int(table.token_chunks[i]) * c
        b = min(a + c, tokens)
        if b > a:
            out[int(table.layers[i]) - layer0, :, a:b].copy_(x[i, :, :b - a])


if triton is not None:
    @triton.jit
    def _decode_kernel(raw8, raw_i8, raw16, raw32, offs, layers, jidx, out, s0, s1, s2, s3, tokens, layer0,
                       C: tl.constexpr, D: tl.constexpr, CHUNK_ELEMS: tl.constexpr, KIND: tl.constexpr,
                       BLOCK_BYTES: tl.constexpr, STORAGE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        off = tl.load(offs + pid)
        layer = tl.load(layers + pid) - layer0
        j = tl.load(jidx + pid)
        e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        h = e // (C * D)
        t = (e // D) % C
        d = e % D
        tok = j * C + t
        ok = (e < CHUNK_ELEMS) & (tok < tokens)
        if KIND == 0:    # plain float16 rows
            v = tl.load(raw16 + off // 2 + e, mask=ok).to(tl.float16, bitcast=True).to(tl.float32)
        elif KIND == 1:  # plain bfloat16 rows
            v = tl.load(raw16 + off // 2 + e, mask=ok).to(tl.bfloat16, bitcast=True).to(tl.float32)
        elif KIND == 2:  # plain float32 rows
            v = tl.load(raw32 + off // 4 + e, mask=ok).to(tl.float32, bitcast=True)
        else:
            b = e // 32
            i = e % 32
            blk = off + b * BLOCK_BYTES
            scale = tl.load(raw16 + blk // 2, mask=ok).to(tl.float16, bitcast=True).to(tl.float32)
            if KIND == 3:    # q8_0: fp16 d, 32 int8
                q = tl.load(raw_i8 + blk + 2 + i, mask=ok).to(tl.float32)
                v = q * scale
            elif KIND == 4:  # q4_0: fp16 d, 16 bytes: element i in the low nibble of byte i, i+16 in the high
                byte = tl.load(raw8 + blk + 2 + i % 16, mask=ok).to(tl.int32)
                q = tl.where(i < 16, byte & 15, byte >> 4).to(tl.float32)
                v = (q - 8.0) * scale
            else:            # q4_1: fp16 d, fp16 m, 16 bytes of nibbles
                m = tl.load(raw16 + blk // 2 + 1, mask=ok).to(tl.float16, bitcast=True).to(tl.float32)
                byte = tl.load(raw8 + blk + 4 + i % 16, mask=ok).to(tl.int32)
                q = tl.where(i < 16, byte & 15, byte >> 4).to(tl.float32)
                v = q * scale + m
            if STORAGE == 0:
                v = v.to(tl.float16).to(tl.float32)
            elif STORAGE == 1:
                v = v.to(tl.bfloat16).to(tl.float32)
        dest = out + layer * s0 + h * s1 + tok * s2 + d * s3
        tl.store(dest, v.to(dest.dtype.element_ty), mask=ok)


_STORAGE_KIND = {np.dtype("<f2"): 0, np.dtype("<u2"): 1, np.dtype("<f4"): 2}
BLOCK_ELEMS = 4096


def _decode_triton(raw: torch.Tensor, table: ChunkTable, kind: tuple[int, int, int], storage: np.dtype,
                   out: torch.Tensor, chunk_shape: tuple[int, ...], tokens: int, layer0: int) -> None:
    _, H, c, D = chunk_shape
    n = len(table)
    if not n:
        return
    dev = raw.device
    meta = torch.from_numpy(np.stack([table.payload_offsets(), table.layers, table.token_chunks]).astype(np.int64))
    meta = meta.pin_memory().to(dev, non_blocking=True)
    padded = raw if raw.numel() % 4 == 0 else torch.nn.functional.pad(raw, (0, 4 - raw.numel() % 4))
    elems = H * c * D
    grid = (n, triton.cdiv(elems, BLOCK_ELEMS))
    _decode_kernel[grid](padded, padded.view(torch.int8), padded.view(torch.int16), padded.view(torch.int32),
                         meta[0], meta[1], meta[2], out, *out.stride(), tokens, layer0,
                         C=c, D=D, CHUNK_ELEMS=elems, KIND=kind[0], BLOCK_BYTES=kind[2],
                         STORAGE=_STORAGE_KIND[storage], BLOCK=BLOCK_ELEMS, num_warps=8,
                         enable_fp_fusion=False)


__all__ = ["BLOCK_CODECS", "check_payloads", "decode_chunks", "decode_chunks_torch", "kind_of"]
