"""Resident codecs of the block pool (DESIGN.md §4 "Hot tier"): how one K or V vector is held in RAM or on a GPU.

A *row* is the bytes of one vector (``head_dim`` values of one token, one head, one layer, K or V). Every
codec's row is exactly what its card serializer stores for that vector, so card chunks and pool rows convert
into each other by slicing bytes, never by re-quantizing:

- ``fp32`` / ``fp16`` / ``bf16``: the raw little-endian values (card preset ``lossless`` in that type);
- ``q8_0`` / ``q4_0``: the vector's ggml blocks, 34 / 18 bytes per 32 values (presets ``q8`` / ``q4_0``);
- ``q4`` / ``mlx8``: MLX affine groups of 64 (presets ``q4`` / ``mlx8``): the packed codes (uint32 words),
  then the scale and then the bias of each group, in ``scale_dtype``. A card chunk holds the same three parts
  as sections (spec/codecs/mlx_affine.md: header, every packed word, every scale, every bias).
- ``turbo4``: randomized Hadamard rotation + 4-bit Lloyd-Max codes + one float16 gain per vector (preset
  ``turbo4``, 4.25 bits per value): the gain, then the packed codes. A card chunk holds every gain, then every
  vector's codes (spec/codecs/turbo.md). The rotation spreads a K head's outlier channels over the vector, so
  at fewer bits it errs half as much on K as ``q4`` (SmolLM2: relative MSE 0.0085 against 0.018).

numpy encoding and decoding are the card codecs' own (``cachecard.codecs``); the torch decoders run on the
device and are held equal to them by tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cachecard.codecs import presets
from cachecard.codecs.base import NO_CONTEXT, KVCodec, to_float32
from cachecard.codecs.mlx_affine import HEADER, MLXAffineCodec, scale_type_of
from cachecard.codecs.q4_0 import Q4_0Codec
from cachecard.codecs.q8_0 import Q8_0Codec
from cachecard.errors import KVShapeError, UnsupportedCodecError
from cachecard.kv import NUMPY_DTYPES

if TYPE_CHECKING:
    import torch

# name -> (kind, card preset)
RESIDENT_CODECS: dict[str, tuple[str, str]] = {
    "fp32": ("float", "lossless"), "fp16": ("float", "lossless"), "bf16": ("float", "lossless"),
    "q8_0": ("ggml", "q8"), "q4_0": ("ggml", "q4_0"),
    "q4": ("affine", "q4"), "mlx8": ("affine", "mlx8"),
    "turbo4": ("turbo", "turbo4"),
}
_FLOAT_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_AFFINE_BITS = {"q4": 4, "mlx8": 8}
AFFINE_GROUP = 64
TURBO_GAIN_BYTES = 2  # one float16 gain per vector


@dataclass(frozen=True)
class ResidentCodec:
    """One resident codec for vectors of ``head_dim`` values.

    Parameters
    ----------
    name
        ``fp32``, ``fp16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4`` (MLX affine 4-bit, group 64), ``mlx8`` or
        ``turbo4`` (rotation + 4-bit Lloyd-Max).
    head_dim
        Values per vector.
    scale_dtype
        Element type of the MLX affine scales and biases (``float16`` gives 4.5 bits per value at 4 bits;
        mlx-lm's own ``QuantizedKVCache`` uses the model's type). Ignored by the other codecs.
    """

    name: str
    head_dim: int
    scale_dtype: str = "float16"
    _serializer: KVCodec | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.name not in RESIDENT_CODECS:
            raise UnsupportedCodecError(f"unknown resident codec {self.name!r}; choose one of "
                                        f"{sorted(RESIDENT_CODECS)}")
        if self.scale_dtype not in NUMPY_DTYPES:
            raise UnsupportedCodecError(f"scale_dtype must be one of {sorted(NUMPY_DTYPES)}; got {self.scale_dtype!r}")
        ser: KVCodec | None = None
        if self.kind == "ggml":
            ser = Q8_0Codec() if self.name == "q8_0" else Q4_0Codec()
        elif self.kind == "affine":
            ser = MLXAffineCodec(bits=_AFFINE_BITS[self.name], group_size=AFFINE_GROUP)
        elif self.kind == "turbo":  # the preset's own codec (its seed), so its cards hold these rows
            ser = presets.preset(self.card_preset).k(None, None).serializer
        if ser is not None:
            ser.check_head_dim(self.head_dim)  # KVShapeError naming the constraint
        object.__setattr__(self, "_serializer", ser)

    # -- what it is -----------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return RESIDENT_CODECS[self.name][0]

    @property
    def card_preset(self) -> str:
        """The card codec preset whose chunks hold exactly these rows."""
        return RESIDENT_CODECS[self.name][1]

    @property
    def card_dtype(self) -> str:
        """The KV element type of cards written from this pool: the values decode to it exactly."""
        if self.kind == "float":
            return _FLOAT_NAMES[self.name]
        return self.scale_dtype if self.kind == "affine" else "float32"

    @property
    def lossy(self) -> bool:
        return self.kind != "float"

    @property
    def serializer(self) -> KVCodec | None:
        """The card codec (None for the raw float codecs)."""
        return self._serializer

    @property
    def bits(self) -> int:
        return _AFFINE_BITS[self.name]

    @property
    def row_bytes(self) -> int:
        d = self.head_dim
        if self.kind == "float":
            return d * NUMPY_DTYPES[self.card_dtype].itemsize
        if self.kind == "ggml":
            return d // 32 * (34 if self.name == "q8_0" else 18)
        if self.kind == "turbo":
            return TURBO_GAIN_BYTES + d * self._serializer.config.bits // 8
        return d * self.bits // 8 + 2 * (d // AFFINE_GROUP) * self._scale_np.itemsize

    @property
    def _scale_np(self) -> np.dtype:
        return NUMPY_DTYPES[self.scale_dtype]

    def describe(self) -> str:
        extra = f", {self.scale_dtype} scales" if self.kind == "affine" else ""
        return f"{self.name} ({self.row_bytes * 8 / self.head_dim:.2f} bits/value{extra})"

    # -- numpy --------------------------------------------------------------------------------------------
    def encode_np(self, x: np.ndarray) -> np.ndarray:
        """Vectors ``(..., head_dim)`` (any float type) -> rows ``(..., row_bytes)`` uint8: what a card writer
        stores for them in the card's element type (``card_dtype``)."""
        lead = x.shape[:-1]
        if x.shape[-1] != self.head_dim:
            raise KVShapeError(f"vectors of {x.shape[-1]} values for a codec of head_dim {self.head_dim}")
        if not x.size:
            return np.zeros((*lead, self.row_bytes), np.uint8)
        if self.kind == "float":
            dt = NUMPY_DTYPES[self.card_dtype]
            return np.ascontiguousarray(x.astype(dt)).view(np.uint8).reshape(*lead, self.row_bytes)
        # the values in the card's element type first: a row is what a card writer stores for them
        x32 = to_float32(np.asarray(x).astype(NUMPY_DTYPES[self.card_dtype])).reshape(-1, self.head_dim)
        if self.kind == "ggml":
            raw = self._serializer.encode_array(x32, NO_CONTEXT)
            return np.frombuffer(raw, np.uint8).reshape(*lead, self.row_bytes)
        if self.kind == "turbo":
            raw = self._serializer.encode_array(x32, NO_CONTEXT)
            return self.payload_to_rows(np.frombuffer(raw, np.uint8), x32.shape[0]).reshape(*lead, self.row_bytes)
        raw = self._serializer.encode_array(x32, NO_CONTEXT, scale_type=scale_type_of(self._scale_np))
        return self.payload_to_rows(np.frombuffer(raw, np.uint8), x32.shape[0]).reshape(*lead, self.row_bytes)

    def decode_np(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``(..., row_bytes)`` -> float32 vectors ``(..., head_dim)``, as the card reader decodes them."""
        lead = rows.shape[:-1]
        flat = np.ascontiguousarray(rows).reshape(-1, self.row_bytes)
        if self.kind == "float":
            return flat.view(NUMPY_DTYPES[self.card_dtype]).astype(np.float32).reshape(*lead, self.head_dim)
        payload = self.rows_to_payload(flat)
        return self._serializer.decode_array(payload, (flat.shape[0], self.head_dim)).reshape(*lead, self.head_dim)

    def zero_row(self) -> np.ndarray:
        """The row of a zero vector (what a card writer stores in a chunk's padding rows)."""
        return self.encode_np(np.zeros((1, self.head_dim), np.float32))[0]

    # -- card chunk payloads <-> rows ----------------------------------------------------------------------
    def rows_to_payload(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``(M, row_bytes)`` in (head, token) order -> the card chunk payload of those M vectors."""
        rows = np.ascontiguousarray(rows)
        if self.kind == "turbo":  # every gain, then every vector's codes
            return np.concatenate([rows[:, :TURBO_GAIN_BYTES].reshape(-1), rows[:, TURBO_GAIN_BYTES:].reshape(-1)])
        if self.kind != "affine":
            return rows.reshape(-1)
        p, s = self._affine_split()
        header = np.array([scale_type_of(self._scale_np), self.bits, AFFINE_GROUP & 0xFF, AFFINE_GROUP >> 8],
                          np.uint8)
        return np.concatenate([header, rows[:, :p].reshape(-1), rows[:, p:p + s].reshape(-1),
                               rows[:, p + s:].reshape(-1)])

    def payload_to_rows(self, payload: np.ndarray, m: int) -> np.ndarray | None:
        """A card chunk payload of ``m`` vectors -> rows ``(m, row_bytes)``; None when the payload is not this
        codec's (another scale type, size or configuration): decode such chunks instead."""
        payload = np.asarray(payload, dtype=np.uint8).reshape(-1)
        if self.kind == "turbo":
            if payload.size != m * self.row_bytes:
                return None
            g = m * TURBO_GAIN_BYTES
            return np.concatenate([payload[:g].reshape(m, -1), payload[g:].reshape(m, -1)], axis=1)
        if self.kind != "affine":
            return payload.reshape(m, self.row_bytes) if payload.size == m * self.row_bytes else None
        p, s = self._affine_split()
        want = np.array([scale_type_of(self._scale_np), self.bits, AFFINE_GROUP & 0xFF, AFFINE_GROUP >> 8],
                        np.uint8)
        if payload.size != HEADER + m * self.row_bytes or not np.array_equal(payload[:HEADER], want):
            return None
        body = payload[HEADER:]
        return np.concatenate([body[:m * p].reshape(m, p), body[m * p:m * (p + s)].reshape(m, s),
                               body[m * (p + s):].reshape(m, s)], axis=1)

    def _affine_split(self) -> tuple[int, int]:
        """Bytes of packed codes and of scales (= of biases) in one affine row."""
        return self.head_dim * self.bits // 8, (self.head_dim // AFFINE_GROUP) * self._scale_np.itemsize

    def matches_card(self, serializer: Any, kv_dtype: str) -> bool:
        """Whether a card array stored with ``serializer`` in element type ``kv_dtype`` holds these rows."""
        if self.kind == "float":
            from zarr.codecs import BytesCodec

            return isinstance(serializer, BytesCodec) and kv_dtype == self.card_dtype
        return serializer == self._serializer

    # -- MLX affine triples (mlx-lm QuantizedKVCache state) --------------------------------------------------
    def rows_from_affine(self, packed: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
        """``mx.quantize`` output as numpy ``(..., words)``, ``(..., groups)`` x2 -> rows ``(..., row_bytes)``."""
        lead = packed.shape[:-1]
        parts = [np.ascontiguousarray(a).view(np.uint8).reshape(*lead, -1)
                 for a in (packed, scales.astype(self._scale_np), biases.astype(self._scale_np))]
        return np.concatenate(parts, axis=-1)

    def affine_from_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``(..., row_bytes)`` -> (packed uint32, scales, biases) in ``scale_dtype``."""
        p, s = self._affine_split()
        lead = rows.shape[:-1]
        rows = np.ascontiguousarray(rows)
        packed = np.ascontiguousarray(rows[..., :p]).view("<u4").reshape(*lead, -1)
        scales = np.ascontiguousarray(rows[..., p:p + s]).view(self._scale_np).reshape(*lead, -1)
        biases = np.ascontiguousarray(rows[..., p + s:]).view(self._scale_np).reshape(*lead, -1)
        return packed, scales, biases

    # -- torch (cachecard.pool.torch_rows) ------------------------------------------------------------------
    def encode_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors ``(..., head_dim)`` -> rows ``(..., row_bytes)`` uint8 on ``x.device`` (``encode_np``'s bytes)."""
        from cachecard.pool import torch_rows

        return torch_rows.encode(self, x)

    def decode_torch(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``(..., row_bytes)`` -> vectors ``(..., head_dim)`` in ``dtype`` on ``rows.device``
        (``decode_np``'s values)."""
        from cachecard.pool import torch_rows

        return torch_rows.decode(self, rows, dtype)


__all__ = ["AFFINE_GROUP", "RESIDENT_CODECS", "TURBO_GAIN_BYTES", "ResidentCodec"]
