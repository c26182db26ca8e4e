"""The card manifest: pydantic models that are the machine form of spec/cachecard-1.md §5.

Models are frozen and reject unknown keys. :func:`schema_text` is the JSON Schema kept in
spec/schemas/manifest.schema.json (``make schema`` writes it; a test fails if the two drift).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import numpy as np
import rfc8785
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from cachecard.kv import KVDType

FORMAT_MAJOR = 1
FORMAT_MINOR = 3  # the newest minor this library reads and the one it writes (spec §8)

# Bounds keep a hostile manifest from declaring absurd shapes (spec §5.6).
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_TOKENS = 2**31 - 1

Digest = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,31}:[0-9a-f]{16,128}$", max_length=161)]
Name = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
CardId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
CodecName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# RFC 3339 date-time in UTC with the `Z` suffix, whole seconds or 1-6 fraction digits (spec §5.6)
CREATED_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z$"
# The key of an object of a card relative to its root (spec §5.1): one of the four arrays' metadata document
# or one of their chunk objects. The pattern leaves no room for `..`, absolute names or other objects.
ObjectKey = Annotated[str, Field(pattern=r"^(k|v|tokens|positions)/(zarr\.json|c(/(0|[1-9][0-9]{0,9}))+)$")]
MAX_SIZE = 2**53 - 1  # I-JSON integers


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class LayerKind(_Model):
    """How a layer attends: over every earlier token, or over a sliding window of them."""

    attention: Literal["full", "sliding"] = "full"
    window: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _window_iff_sliding(self) -> LayerKind:
        if (self.attention == "sliding") != (self.window is not None):
            raise ValueError("'window' is required for sliding layers and forbidden for full ones")
        return self


class Rope(_Model):
    """Rotary position embedding parameters, as the model applies them before K is cached."""

    theta: float = Field(gt=0)
    rotary_dim: int = Field(ge=0, le=MAX_HEAD_DIM, description="leading channels of each head rotated")
    scaling: dict[str, JsonValue] | None = Field(default=None, description="rope scaling, as in the model config")


class ModelIdentity(_Model):
    """Everything a KV cache depends on; restoring into a different identity is refused (spec §6)."""

    name: Name | None = Field(default=None, description="display name; not part of the identity check")
    architecture: Name
    num_layers: int = Field(ge=1, le=MAX_LAYERS)
    num_kv_heads: int = Field(ge=1, le=MAX_KV_HEADS)
    head_dim: int = Field(ge=1, le=MAX_HEAD_DIM)
    layer_kinds: tuple[LayerKind, ...]
    rope: Rope
    kv_dtype: KVDType
    weights_hash: Digest
    tokenizer_hash: Digest

    @model_validator(mode="after")
    def _consistent(self) -> ModelIdentity:
        if len(self.layer_kinds) != self.num_layers:
            raise ValueError(f"layer_kinds has {len(self.layer_kinds)} entries for {self.num_layers} layers")
        if self.rope.rotary_dim > self.head_dim or self.rope.rotary_dim % 2:
            raise ValueError(f"rope.rotary_dim {self.rope.rotary_dim} must be even and <= head_dim")
        return self

    def mismatches(self, other: ModelIdentity) -> list[str]:
        """Names and values of identity fields that differ (``name`` is display-only)."""
        a, b = self.model_dump(exclude={"name"}), other.model_dump(exclude={"name"})
        return [f"{key}: card has {a[key]!r}, model has {b[key]!r}" for key in a if a[key] != b[key]]


class TokenBinding(_Model):
    """The token ids the KV was computed from; the ids themselves are the ``tokens`` array."""

    count: int = Field(ge=0, le=MAX_TOKENS)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the ids as little-endian int32")


class ParentRef(_Model):
    """This card continues the first ``tokens`` tokens of another card (whose KV it does not repeat)."""

    card_id: CardId
    tokens: int = Field(ge=1, le=MAX_TOKENS)


class Pruning(_Model):
    """The card keeps only some tokens of a longer sequence (spec §5.6, spec/codecs/pruning.md): lossy and
    irreversible, never a default. The kept tokens' positions are the ``positions`` array."""

    method: Literal["value_norm", "front", "back"]
    keep: float = Field(gt=0, le=1, description="fraction of the source tokens asked to be kept")
    source_tokens: int = Field(ge=1, le=MAX_TOKENS, description="tokens of the sequence before pruning")
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the source token ids (int32 LE)")


class ObjectEntry(_Model):
    """One object of a format 1.3 card in the manifest's object table (spec §7.2): its size and SHA-256, and
    for the shard of ``k`` or ``v`` the SHA-256 of its index and the CRC-32C of every inner chunk."""

    size: int = Field(ge=1, le=MAX_SIZE, description="bytes")
    sha256: Sha256Hex
    index_sha256: Sha256Hex | None = Field(default=None, description="k/v shards: SHA-256 of the 16n+4 index bytes")
    chunk_crc32c: str | None = Field(
        default=None, pattern=r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$", max_length=1 << 26,
        description="k/v shards: base64 (RFC 4648, no line breaks) of one little-endian uint32 per inner chunk, the "
                    "chunk's CRC-32C as stored, in C order of the inner-chunk grid (layer, token chunk)")

    @model_validator(mode="after")
    def _shard_fields_together(self) -> ObjectEntry:
        if (self.index_sha256 is None) != (self.chunk_crc32c is None):
            raise ValueError("'index_sha256' and 'chunk_crc32c' are given together (a k/v shard) or not at all")
        return self


class Codecs(_Model):
    """Codec preset names for K and V; the zarr codec pipelines in the arrays are what decodes."""

    k: CodecName
    v: CodecName


class Producer(_Model):
    library: Name = "cachecard"
    version: Name
    runtime: Name | None = Field(default=None, description="e.g. 'transformers 5.23.0'")


class CardManifest(_Model):
    """The root group attribute ``cachecard`` of every card (spec §5)."""

    cachecard_format: Literal[1]
    format_minor: int = Field(ge=0)
    card_id: CardId
    created: Annotated[datetime, Field(json_schema_extra={"pattern": CREATED_PATTERN, "format": "date-time"})]
    producer: Producer
    model: ModelIdentity
    tokens: TokenBinding
    start_position: int = Field(default=0, ge=0, le=MAX_TOKENS)
    positions: Literal["contiguous", "explicit"] = "contiguous"
    parent: ParentRef | None = None
    k_layout: Literal["post_rope_neox"] = "post_rope_neox"
    codecs: Codecs
    pruning: Pruning | None = Field(default=None, description="format 1.2+: the card holds a pruned subset")
    objects: dict[ObjectKey, ObjectEntry] | None = Field(
        default=None, description="format 1.3+: every object of the card (but the root document), its size and digests")

    @field_validator("created", mode="before")
    @classmethod
    def _rfc3339_utc(cls, v: Any) -> Any:
        if isinstance(v, str):  # parsed here: strict mode takes no string for a datetime after a validator
            if not re.fullmatch(CREATED_PATTERN, v):
                raise ValueError(f"'created' must be an RFC 3339 time in UTC like 2026-11-22T06:19:29.986167Z; got {v!r}")
            v = datetime.fromisoformat(v)
        if isinstance(v, datetime) and (v.tzinfo is None or v.utcoffset() != timezone.utc.utcoffset(None)):
            raise ValueError("'created' must be a time in UTC")
        return v

    @model_validator(mode="after")
    def _fields_of_the_minor(self) -> CardManifest:
        if self.format_minor < 2 and "pruning" in self.model_fields_set:
            raise ValueError("'pruning' needs format 1.2 or later (a 1.0 or 1.1 manifest has no such key, not even null)")
        if self.format_minor < 3 and "objects" in self.model_fields_set:
            raise ValueError("'objects' needs format 1.3 or later")
        if self.format_minor >= 3 and self.objects is None:
            raise ValueError("a format 1.3 manifest holds the object table 'objects'")
        for key, entry in (self.objects or {}).items():
            shard = key.split("/")[0] in ("k", "v") and not key.endswith("/zarr.json")
            if shard != (entry.index_sha256 is not None):
                raise ValueError(f"objects[{key!r}]: 'index_sha256' and 'chunk_crc32c' are given for the shards of "
                                 "k and v, and only for them")
        return self

    @model_validator(mode="after")
    def _parent_offsets(self) -> CardManifest:
        if self.start_position + self.tokens.count > MAX_TOKENS + 1:
            raise ValueError("start_position + tokens.count must fit in int32 positions")
        if self.parent is not None and self.positions == "contiguous" and self.start_position != self.parent.tokens:
            raise ValueError(
                f"a card continuing {self.parent.tokens} parent tokens starts at position {self.parent.tokens}, "
                f"not {self.start_position}"
            )
        return self

    @model_validator(mode="after")
    def _pruning(self) -> CardManifest:
        p = self.pruning
        if p is None:
            return self
        if self.positions != "explicit" or self.parent is not None:
            raise ValueError("a pruned card has explicit positions and no parent")
        if self.tokens.count > p.source_tokens:
            raise ValueError(f"a pruned card keeps at most its {p.source_tokens} source tokens, not {self.tokens.count}")
        return self

    def to_json_dict(self) -> dict[str, Any]:
        """The manifest as JSON: every key of its format minor (1.0 and 1.1 manifests have no ``pruning``,
        1.0–1.2 no ``objects``)."""
        exclude = {"pruning"} if self.format_minor < 2 else set()
        if self.format_minor < 3:
            exclude.add("objects")
        return self.model_dump(mode="json", exclude=exclude or None)


def token_digest(tokens: np.ndarray) -> str:
    """SHA-256 (hex) of token ids as little-endian int32, the binding stored in the manifest."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 (hex) of the manifest's RFC 8785 canonical JSON (spec §7.2): reproducible in any language."""
    return hashlib.sha256(rfc8785.dumps(manifest)).hexdigest()


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a manifest: the models' own, plus what pydantic does not write for them: object
    table keys are the only properties of ``objects``, and the fields each format minor allows
    (spec §5.6 lists the cross-field rules only a reader can check)."""
    schema = CardManifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://cachecard.dev/spec/schemas/manifest.schema.json"
    table = next(a for a in schema["properties"]["objects"]["anyOf"] if a.get("type") == "object")
    table["additionalProperties"] = False
    minor = "format_minor"
    schema["allOf"] = [
        {"if": {"properties": {minor: {"maximum": 1}}}, "then": {"not": {"required": ["pruning"]}}},
        {"if": {"properties": {minor: {"maximum": 2}}}, "then": {"not": {"required": ["objects"]}}},
        {"if": {"properties": {minor: {"minimum": 3}}},
         "then": {"required": ["objects"], "properties": {"objects": {"type": "object"}}}},
    ]
    return schema


def schema_text() -> str:
    """spec/schemas/manifest.schema.json as written by `make schema`."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
