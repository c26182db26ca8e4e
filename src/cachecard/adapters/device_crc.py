"""crc32c of a card's chunks on the device (spec/cachecard-1.md §10: the restore checks every chunk it uses).

A host core checks crc32c at a few GB/s, and a restore moves hundreds of MB to a GPU that is idle meanwhile,
so the GPU checks the chunks it received. CRC is linear over GF(2), which makes it parallel:

- the raw CRC (zero initial register, no final xor) of a message is the XOR of its bytes' contributions, and
  a byte ``v`` that has ``k`` bytes after it contributes ``shift_k(T[v])`` (``T`` the byte table,
  ``shift_k`` the register advanced over ``k`` zero bytes, a linear map);
- so a chunk's payload is cut into 64-byte blocks counted from its end (leading zero bytes do not change a raw
  CRC, so the first block is zero-padded); a block's raw CRC is the XOR of 64 lookups in ``POS[j][v]``
  (``shift_{63-j}(T[v])``), and block ``b`` (from the end) contributes ``M_b(raw)``, ``M_b`` the 32x32 bit
  matrix of ``shift_{64 b}``; the chunk's raw CRC is the XOR of all contributions (``atomic_xor``);
- ``crc32c(m) = raw(m) XOR crc32c(n zero bytes)`` for an ``n``-byte message (CRC is affine in the message).

The tables are built here with numpy; :func:`crc32c_blocks_numpy` computes the same decomposition on the host
(tested against ``crc32c`` in CI), and the Triton kernel is tested against it on a GPU.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs never call the kernel
    triton = None

POLY = 0x82F63B78   # crc32c (Castagnoli), reflected
BLOCK = 64          # bytes per block


@lru_cache(maxsize=1)
def byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(POLY), t >> 1).astype(np.uint32)
    return t


def _shift_bytes(state: np.ndarray, k: int) -> np.ndarray:
    """Registers advanced over ``k`` zero bytes (elementwise)."""
    t = byte_table()
    s = state.astype(np.uint32)
    for _ in range(k):
        s = (s >> np.uint32(8)) ^ t[s & np.uint32(0xFF)]
    return s


@lru_cache(maxsize=1)
def position_table() -> np.ndarray:
    """``POS[j][v]``: the raw-CRC contribution of byte ``v`` at offset ``j`` of a 64-byte block."""
    t = byte_table()
    return np.stack([_shift_bytes(t, BLOCK - 1 - j) for j in range(BLOCK)])  # (64, 256) uint32


def _apply(rows: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bit matrices (..., 32 rows) applied to vectors ``v`` (...): XOR of the rows of v's set bits."""
    out = np.zeros(v.shape, dtype=np.uint32)
    for k in range(32):
        out ^= np.where((v >> np.uint32(k)) & np.uint32(1), rows[..., k], np.uint32(0))
    return out


_MATS: list[np.ndarray] = []


def block_matrices(blocks: int) -> np.ndarray:
    """``M[b]`` for b < ``blocks``: rows ``shift_{64 b}(1 << k)`` (uint32, shape (blocks, 32)), by doubling
    (``M[m + i] = S^m o M[i]``); kept and grown on demand."""
    if not _MATS or len(_MATS[0]) < blocks:
        identity = np.uint32(1) << np.arange(32, dtype=np.uint32)
        m = identity[None, :]
        power = _shift_bytes(identity, BLOCK)  # S^len(m): rows of the shift by len(m) blocks
        while len(m) < blocks:
            m = np.concatenate([m, _apply(np.broadcast_to(power, (len(m), 32, 32)), m)])
            power = _apply(np.broadcast_to(power, (32, 32)), power)
        _MATS[:] = [m]
    return _MATS[0][:blocks]


@lru_cache(maxsize=64)
def crc_of_zeros(n: int) -> int:
    """crc32c of ``n`` zero bytes (the affine part of a crc32c of an ``n``-byte message)."""
    import crc32c

    return crc32c.crc32c(bytes(n))


def crc32c_blocks_numpy(data: np.ndarray) -> int:
    """crc32c of ``data`` (uint8) by the block decomposition the kernel uses (the host reference)."""
    n = len(data)
    nb = -(-n // BLOCK)
    padded = np.zeros(nb * BLOCK, dtype=np.uint8)
    padded[nb * BLOCK - n:] = data
    blocks = padded.reshape(nb, BLOCK)[::-1]  # block b counted from the end
    raw = np.bitwise_xor.reduce(position_table()[np.arange(BLOCK), blocks], axis=1)
    contrib = _apply(block_matrices(nb), raw)
    return int(np.bitwise_xor.reduce(contrib) if nb else 0) ^ crc_of_zeros(n)


if triton is not None:
    @triton.jit
    def _crc_kernel(raw8, starts, lens, pos, mats, out, G: tl.constexpr):
        c = tl.program_id(0)
        start = tl.load(starts + c)
        n = tl.load(lens + c)
        nb = (n + 63) // 64
        b = tl.program_id(1) * G + tl.arange(0, G)          # blocks counted from the payload's end
        live = b < nb
        j = tl.arange(0, 64)
        p = n - 64 * (b[:, None] + 1) + j[None, :]           # byte offsets; < 0 is the zero padding
        ok = live[:, None] & (p >= 0)
        byte = tl.load(raw8 + start + p, mask=ok, other=0).to(tl.int32)
        raw = tl.xor_sum(tl.load(pos + j[None, :] * 256 + byte, mask=ok, other=0), axis=1)
        k = tl.arange(0, 32)
        bit = ((raw[:, None] >> k[None, :]) & 1) != 0
        rows = tl.load(mats + b[:, None] * 32 + k[None, :], mask=live[:, None] & bit, other=0)
        contrib = tl.xor_sum(rows, axis=1)
        tl.atomic_xor(out + c, tl.xor_sum(tl.where(live, contrib, 0), axis=0))


_DEVICE_TABLES: dict = {}
GROUP = 32  # blocks per program


def crc32c_chunks(raw: torch.Tensor, starts: np.ndarray, lens: np.ndarray) -> torch.Tensor:
    """crc32c of ``raw[starts[i]:starts[i] + lens[i]]`` for every i, computed on ``raw``'s CUDA device;
    returns int32 values (the uint32 bits) on the device, without waiting for them."""
    dev = raw.device
    n = len(starts)
    out = torch.zeros(n, dtype=torch.int32, device=dev)
    if not n:
        return out
    nb = int(-(-int(lens.max()) // BLOCK))
    key = (dev, nb)
    if key not in _DEVICE_TABLES:
        mats = block_matrices(max(nb, 1))
        _DEVICE_TABLES.clear()  # one size at a time: the largest needed so far
        _DEVICE_TABLES[key] = (torch.from_numpy(position_table().view(np.int32).reshape(-1).copy()).to(dev),
                               torch.from_numpy(mats.view(np.int32).reshape(-1).copy()).to(dev))
    pos, mats = _DEVICE_TABLES[key]
    meta = torch.from_numpy(np.stack([starts, lens]).astype(np.int64)).pin_memory().to(dev, non_blocking=True)
    _crc_kernel[(n, triton.cdiv(nb, GROUP))](raw, meta[0], meta[1], pos, mats, out, G=GROUP)
    zeros = torch.from_numpy(np.array([crc_of_zeros(int(x)) for x in lens], dtype=np.uint32).view(np.int32))
    return out ^ zeros.pin_memory().to(dev, non_blocking=True)


__all__ = ["block_matrices", "crc32c_blocks_numpy", "crc32c_chunks", "crc_of_zeros", "position_table"]
