"""What every CacheCard KV codec shares (spec/codecs/README.md).

A KV codec is a Zarr v3 array-to-bytes codec for the inner chunks of a card's ``k`` or ``v`` array (shape
``(1, H, c, D)``: one layer, every head, ``c`` tokens). Its configuration is a strict pydantic model (unknown
or invalid keys are refused), and its chunks are self-describing: decoding needs only the bytes and the
configuration, never the rest of the card.

Encoding may use a :class:`ChunkContext` (layer, token offset, positions) that the card writer passes; zarr's
own write path has none, and codecs then fall back to context-free choices. Decoding works in float32 and
casts to the array's element type (round to nearest even). bfloat16 arrays are stored as ``uint16`` bit
patterns (spec/cachecard-1.md §4), and a codec reads ``uint16`` elements as bfloat16.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import ml_dtypes
import numpy as np
import pydantic
from pydantic import BaseModel, ConfigDict
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer

from cachecard.errors import KVShapeError, UnsupportedCodecError

if TYPE_CHECKING:
    import torch
    from zarr.core.array_spec import ArraySpec

STORAGE_TO_FLOAT = {np.dtype("<f4"): np.float32, np.dtype("<f2"): np.float16, np.dtype("<u2"): ml_dtypes.bfloat16}


class CodecConfig(BaseModel):
    """Base of every codec configuration: frozen, strict types, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


@dataclass(frozen=True)
class ChunkContext:
    """Where an inner chunk sits in its card; given by the card writer, absent under plain zarr writes."""

    layer: int = 0
    which: Literal["k", "v"] | None = None
    token_start: int = 0                     # index of the chunk's first token in the card
    valid_tokens: int | None = None          # tokens of the chunk that are real (the rest is padding)
    card_tokens: int | None = None           # T of the card
    positions: np.ndarray | None = field(default=None, repr=False)  # RoPE position of each chunk token
    known: bool = True                       # False under plain zarr writes


NO_CONTEXT = ChunkContext(known=False)


def to_float32(x: np.ndarray) -> np.ndarray:
    """Chunk elements (float32, float16, or bfloat16 as uint16 bits) as float32."""
    dt = x.dtype.newbyteorder("<") if x.dtype.byteorder == ">" else x.dtype
    if dt == np.dtype("<u2"):
        return x.view(ml_dtypes.bfloat16).astype(np.float32)
    if dt == np.dtype(ml_dtypes.bfloat16):
        return x.astype(np.float32)
    if dt.kind != "f":
        raise KVShapeError(f"KV codecs take float32, float16 or bfloat16 (as uint16) elements; got {x.dtype}")
    return x.astype(np.float32, copy=False)


def from_float32(x: np.ndarray, storage: np.dtype) -> np.ndarray:
    """float32 values in a storage element type (round to nearest even; bfloat16 as uint16 bits)."""
    storage = np.dtype(storage)
    torch = sys.modules.get("torch")
    if torch is not None and storage.itemsize == 2 and x.size >= 4096:
        # numpy converts to float16 one element at a time (~0.6 GB/s); torch's vectorised conversion rounds
        # the same way (IEEE round to nearest even) ten times faster. Used only when the caller has torch.
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        out = t.half() if storage == np.dtype("<f2") else t.bfloat16()
        return out.view(torch.int16).numpy().view(storage)
    if storage == np.dtype("<u2"):
        return x.astype(ml_dtypes.bfloat16).view("<u2")
    return x.astype(storage, copy=False)


def as_rows(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """A chunk as (vectors, head_dim) rows, and its shape to restore."""
    if x.ndim < 1:
        raise KVShapeError(f"a KV chunk needs a channel axis; got shape {x.shape}")
    return x.reshape(-1, x.shape[-1]), x.shape


class KVCodec(ArrayBytesCodec):
    """Base class: subclasses set ``codec_id``, ``Config`` and implement ``encode_array`` / ``decode_array``.

    ``decode_torch`` is the device path: it takes the encoded payload as a uint8 tensor on any device and
    decodes there (float32 out); the base falls back to the numpy decoder.
    """

    codec_id: ClassVar[str]
    Config: ClassVar[type[CodecConfig]]
    is_fixed_size = False
    lossy: ClassVar[bool] = True

    config: CodecConfig

    def __init__(self, config: CodecConfig | None = None, /, **configuration: Any) -> None:
        if config is None:
            try:
                config = self.Config.model_validate(configuration)
            except pydantic.ValidationError as e:
                problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(config)'}: {err['msg']}"
                                     for err in e.errors())
                raise UnsupportedCodecError(
                    f"codec {self.codec_id!r} cannot take configuration {configuration!r} ({problems}); "
                    "a newer cachecard may know these keys") from None
        elif not isinstance(config, self.Config):
            raise TypeError(f"{self.codec_id} takes a {self.Config.__name__}, got {type(config).__name__}")
        object.__setattr__(self, "config", config)
        self.check_config()

    # -- zarr plumbing ------------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.config == other.config  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVCodec:
        # zarr's own parse_named_configuration is internal API; the rule is this simple
        if not isinstance(data, dict) or data.get("name") != cls.codec_id or set(data) - {"name", "configuration"}:
            raise UnsupportedCodecError(f"expected a {{'name': {cls.codec_id!r}, 'configuration': {{...}}}} codec "
                                        f"document; got {data!r}")
        configuration = data.get("configuration") or {}
        if not isinstance(configuration, dict):
            raise UnsupportedCodecError(f"codec {cls.codec_id!r}: configuration must be an object; got "
                                        f"{configuration!r}")
        return cls(**configuration)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.codec_id, "configuration": self.config.model_dump(mode="json")}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        native = np.dtype(dtype.to_native_dtype())
        if native not in STORAGE_TO_FLOAT:
            raise UnsupportedCodecError(f"codec {self.codec_id!r} stores float32, float16 or bfloat16 KV; "
                                        f"got data type {native}")
        self.check_head_dim(shape[-1])

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        x = chunk_array.as_numpy_array()
        return chunk_spec.prototype.buffer.from_bytes(self.encode_chunk(x, NO_CONTEXT))

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        storage = np.dtype(chunk_spec.dtype.to_native_dtype())
        out = self.decode_chunk(chunk_bytes.as_numpy_array().view(np.uint8), chunk_spec.shape, storage)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(out)

    # -- numpy API ----------------------------------------------------------------------------------------
    def encode_chunk(self, x: np.ndarray, ctx: ChunkContext = NO_CONTEXT) -> bytes:
        """Encode one chunk (storage element type, any shape whose last axis is head_dim)."""
        self.check_head_dim(x.shape[-1])
        return self.encode_array(to_float32(x), ctx)

    def decode_chunk(self, data: np.ndarray, shape: tuple[int, ...], storage: np.dtype) -> np.ndarray:
        """Decode one chunk's payload to ``shape`` in the storage element type."""
        return from_float32(self.decode_array(np.asarray(data, dtype=np.uint8), tuple(shape)), storage)

    def encode_array(self, x: np.ndarray, ctx: ChunkContext) -> bytes:
        raise NotImplementedError

    def decode_array(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def decode_torch(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Decode on ``data.device`` (a uint8 tensor) to float32; subclasses override with tensor code."""
        import torch

        out = self.decode_array(data.cpu().numpy(), tuple(shape))
        return torch.from_numpy(out).to(data.device)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        """The largest ``|decode(encode(x)) - x|`` the codec's spec allows, per element of ``x`` (float32
        rows ``(..., D)``, the float32 decode before any cast to the storage type); ``inf`` where the spec
        states no bound. Property tests hold every codec to it."""
        return np.full(x.shape, np.inf, dtype=np.float32)

    # -- constraints ------------------------------------------------------------------------------------
    def check_config(self) -> None:
        """Cross-field checks of the configuration (raise UnsupportedCodecError)."""

    def check_head_dim(self, head_dim: int) -> None:
        """Raise KVShapeError if this codec cannot store vectors of ``head_dim`` channels."""

    # -- helpers for subclasses ------------------------------------------------------------------------
    def payload_error(self, what: str) -> ValueError:
        return ValueError(f"{self.codec_id}: {what}; the chunk is corrupt or was written by another codec")


def expect_size(codec: KVCodec, data: np.ndarray, size: int) -> None:
    if data.size != size:
        raise codec.payload_error(f"payload has {data.size} bytes, expected {size}")


def require_multiple(codec: KVCodec, head_dim: int, block: int) -> None:
    if head_dim % block:
        raise KVShapeError(f"codec {codec.codec_id!r} quantizes blocks of {block} channels, so head_dim must be a "
                           f"multiple of {block}; got {head_dim}. Use another preset for this model.")


def require_power_of_two(codec: KVCodec, head_dim: int) -> None:
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise KVShapeError(f"codec {codec.codec_id!r} rotates each vector with a Hadamard transform, so head_dim "
                           f"must be a power of two >= 2; got {head_dim}. Use another preset for this model.")


def num_elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
