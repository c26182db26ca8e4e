"""The bytes of a block pool (DESIGN.md §4 "Hot tier"): one preallocated array of fixed-size token blocks.

Layout ``(layers, 2, kv_heads, blocks, block_tokens, row_bytes)`` uint8: block ``b`` holds ``block_tokens``
tokens of every layer, K (0) and V (1), as resident-codec rows (``cachecard.pool.codecs``). A block id is
the same in every layer, so one block table per agent serves all layers, and one layer's K (or V) of any
list of blocks is one gather that is already ``(kv_heads, tokens, row_bytes)`` in token order. ``TorchArena``
lives on a torch device (CPU RAM or a GPU); ``NumpyArena`` in host memory (the MLX path: MLX copies host
arrays in, and on Apple silicon host memory is the GPU's).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class NumpyArena:
    """Blocks in a numpy array (allocated lazily by the OS: untouched pages cost nothing)."""

    def __init__(self, layers: int, blocks: int, heads: int, block_tokens: int, row_bytes: int) -> None:
        self.shape = (layers, 2, heads, blocks, block_tokens, row_bytes)
        self.data = np.empty(self.shape, np.uint8)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def write(self, layer: int, which: int, blocks: np.ndarray, offsets: np.ndarray, rows: Any) -> None:
        """Rows ``(heads, n, row_bytes)`` of n tokens into (block, offset) slots of one layer's K or V."""
        self.data[layer, which][:, blocks, offsets] = rows

    def write_np(self, layer: int, which: int, blocks: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> None:
        self.write(layer, which, blocks, offsets, rows)

    def read_np(self, layer: int, which: int, blocks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Rows ``(heads, n, row_bytes)`` of n (block, offset) slots, as numpy."""
        return self.data[layer, which][:, blocks, offsets]

    def gather(self, layer: int, which: int, blocks: np.ndarray) -> np.ndarray:
        """One layer's K or V of some blocks, in order: ``(heads, n * block_tokens, row_bytes)``."""
        h, _, bt, r = self.data.shape[2:]
        return self.data[layer, which][:, blocks].reshape(h, len(blocks) * bt, r)

    def copy_block(self, src: int, dst: int) -> None:
        self.data[:, :, :, dst] = self.data[:, :, :, src]


class TorchArena:
    """Blocks in a torch tensor on ``device``."""

    def __init__(self, layers: int, blocks: int, heads: int, block_tokens: int, row_bytes: int,
                 device: Any = "cpu") -> None:
        import torch

        self.torch = torch
        self.shape = (layers, 2, heads, blocks, block_tokens, row_bytes)
        self.device = torch.device(device)
        self.data = torch.empty(self.shape, dtype=torch.uint8, device=self.device)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def _index(self, a: np.ndarray) -> Any:
        return self.torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)

    def write(self, layer: int, which: int, blocks: np.ndarray, offsets: np.ndarray, rows: Any) -> None:
        self.data[layer, which][:, self._index(blocks), self._index(offsets)] = rows

    def write_np(self, layer: int, which: int, blocks: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> None:
        rows = self.torch.from_numpy(np.require(rows, requirements=["C", "W"]))
        self.write(layer, which, blocks, offsets, rows.to(self.device, non_blocking=True))

    def read_np(self, layer: int, which: int, blocks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return self.data[layer, which][:, self._index(blocks), self._index(offsets)].cpu().numpy()

    def gather(self, layer: int, which: int, blocks: np.ndarray) -> Any:
        h, _, bt, r = self.data.shape[2:]
        return self.data[layer, which].index_select(1, self._index(blocks)).reshape(h, len(blocks) * bt, r)

    def copy_block(self, src: int, dst: int) -> None:
        self.data[:, :, :, dst] = self.data[:, :, :, src]


__all__ = ["NumpyArena", "TorchArena"]
