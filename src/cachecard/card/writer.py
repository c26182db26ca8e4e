"""Writing a card (spec/cachecard-1.md §4–7): data first, the manifest (with the object table) last, atomically."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import zarr

from cachecard._version import __version__
from cachecard.card import _zarr, keyed, layout, objects
from cachecard.codecs import pipeline
from cachecard.errors import KVShapeError
from cachecard.kv import CanonicalKV, token_ids
from cachecard.card.shard_write import Payloads, write_kv_shard
from cachecard.card.locations import ROOT_KEY, Location, writable
from cachecard.card.root import DIGEST_ATTR, MANIFEST_ATTR
from cachecard.manifest import (
    CardManifest, Codecs, ModelIdentity, ParentRef, Producer, Pruning, TokenBinding, manifest_digest,
    token_digest,
)



def write_card(
    location: Location,
    kv: CanonicalKV,
    tokens: Sequence[int] | np.ndarray,
    model: ModelIdentity,
    *,
    codec: str | tuple[str, str] = "lossless",
    chunk_tokens: int = layout.DEFAULT_CHUNK_TOKENS,
    parent: ParentRef | None = None,
    positions: Sequence[int] | np.ndarray | None = None,
    runtime: str | None = None,
    pruning: Pruning | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    card_id: str | None = None,
    key: keyed.StoreKey = None,
    payloads: Payloads | None = None,
) -> CardManifest:
    """Write ``kv`` for ``tokens`` as a new card at ``location`` and return its manifest.

    Parameters
    ----------
    location
        Local directory, ``.zip`` path, fsspec URL or zarr ``Store``. Must not hold a card yet.
    kv
        Canonical K and V; their shape and dtype must match ``model``.
    tokens
        The token ids the KV was computed from (this card's tokens only, when ``parent`` is given).
    chunk_tokens
        Largest chunk length along tokens (the unit of partial reads); the writer balances chunks below it.
    codec
        A preset name for both K and V, or a ``(k_preset, v_preset)`` pair.
    parent
        The card whose first ``parent.tokens`` tokens this card continues; positions then start there.
    positions
        Explicit token positions, for caches whose tokens are not contiguous (pruned caches).
    pruning
        The record of a pruned cache (``cachecard.transforms.pruning.prune`` makes it with the positions).
    card_id
        The new card's id (32 lowercase hex digits); a random UUID4 by default. The store picks ids itself
        so a card's location can be named after it.
    key
        The store key for keyed tamper evidence (spec §7.4): the card then carries an HMAC of its manifest
        that readers holding the key check. Default: ``$CACHECARD_KEY`` if set, else none.
    payloads
        ``(which, layer, token_start, valid_tokens, chunk_tokens) -> bytes``: every K/V inner chunk's
        serializer payload, already encoded (the write-side mirror of ``Card.read_encoded``, for runtimes that
        hold a codec's bytes and must not re-quantize). Rows past ``valid_tokens`` are padding. ``kv`` then only
        gives shapes and dtype; the caller vouches that the payloads are the preset's serializer bytes.

    The card is format 1.3: its manifest lists every object with its size and SHA-256 (the object table).
    """
    ids = _token_array(tokens, kv.num_tokens)
    pos = None if positions is None else _positions_array(positions, kv.num_tokens)
    _check_kv_matches_model(kv, model)
    k_codec, v_codec = (codec, codec) if isinstance(codec, str) else codec
    store_key = keyed.resolve_key(key)
    if not 1 <= chunk_tokens <= 1 << 20:
        raise ValueError(f"chunk_tokens must be in [1, 1048576]; got {chunk_tokens}.")

    manifest = CardManifest(
        card_id=card_id if card_id is not None else uuid.uuid4().hex,
        created=datetime.now(timezone.utc),
        producer=Producer(version=__version__, runtime=runtime),
        model=model,
        tokens=TokenBinding(count=len(ids), sha256=token_digest(ids)),
        start_position=parent.tokens if parent else 0,
        positions="explicit" if pos is not None else "contiguous",
        parent=parent,
        codecs=Codecs(k=k_codec, v=v_codec),
        cachecard_format=1,
        format_minor=3,
        pruning=pruning,
        objects={},  # filled in once every object is stored
    )
    # Unknown presets and codecs that cannot take this KV fail here, before anything is written.
    pipelines = {"k": pipeline(k_codec, "k", kv.k, model), "v": pipeline(v_codec, "v", kv.v, model)}
    pos_all = pos if pos is not None else np.arange(manifest.start_position,
                                                    manifest.start_position + kv.num_tokens, dtype=np.int64)

    with writable(location, overwrite=overwrite, storage_options=storage_options) as (deferred, root):
        data = objects.Recorder(deferred)
        storage = layout.STORAGE_DTYPES[kv.dtype]
        chunk = layout.balanced_chunk(kv.num_tokens, chunk_tokens)
        shape = layout.kv_shape(kv.num_layers, kv.num_kv_heads, kv.num_tokens, kv.head_dim)
        for which, arr in (("k", kv.k), ("v", kv.v)):
            p = pipelines[which]
            z = zarr.create_array(
                data, name=which, shape=shape, dtype=storage,
                chunks=layout.kv_chunks(kv.num_kv_heads, kv.head_dim, chunk),
                shards=layout.kv_shards(*shape, chunk_tokens=chunk),
                serializer=p.serializer, compressors=p.compressors, filters=None, fill_value=0,
                dimension_names=layout.KV_DIMENSIONS, zarr_format=3,
                config={"write_empty_chunks": True},  # a missing chunk must mean corruption, never zeros
            )
            if arr.size:
                data.expect_shard(objects.shard_key(which), kv.num_layers * (z.shards[2] // chunk))
                write_kv_shard(z, arr.view(storage), pos_all, which, payloads)
        _write_ids(data, "tokens", ids)
        if pos is not None:
            _write_ids(data, "positions", pos)
        manifest = CardManifest.model_validate(
            {**dict(manifest), "objects": objects.table_entries(data.recorded, data.shards)})
        _commit_root(root, manifest, store_key)
    return manifest


def _write_ids(store: Any, name: str, ids: np.ndarray) -> None:
    z = zarr.create_array(
        store, name=name, shape=ids.shape, dtype="<i4", chunks=(layout.id_chunk(len(ids)),),
        serializer=zarr.codecs.BytesCodec(endian="little"), compressors=[zarr.codecs.Crc32cCodec()],
        filters=None, fill_value=0, zarr_format=3, config={"write_empty_chunks": True},
    )
    if ids.size:
        z[...] = ids


def _commit_root(root: Any, manifest: CardManifest, key: bytes | None = None) -> None:
    """Write the root group document: the commit point of a card (with the HMAC when there is a store key)."""
    doc = manifest.to_json_dict()
    digest = manifest_digest(doc)
    attrs = {MANIFEST_ATTR: doc, DIGEST_ATTR: digest}
    if key is not None:
        attrs[keyed.HMAC_ATTR] = keyed.tag(key, digest)
    raw = _zarr.group_document(attrs)
    _zarr.sync(root.set(ROOT_KEY, _zarr.prototype().buffer.from_bytes(raw)))


def _token_array(tokens: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    ids = token_ids(tokens)  # also a (1, T) batch of one, as tokenizers and models return
    if ids.ndim != 1 or len(ids) != n:
        raise KVShapeError(f"need one token id per cached token: KV holds {n} tokens, got ids of shape {ids.shape}.")
    if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() > 2**31 - 1):
        raise KVShapeError("token ids must be integers in [0, 2**31-1].")
    return ids.astype("<i4")


def _positions_array(positions: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    pos = _token_array(positions, n)
    if pos.size and np.any(np.diff(pos) <= 0):
        raise KVShapeError("explicit positions must be strictly increasing.")
    return pos


def _check_kv_matches_model(kv: CanonicalKV, model: ModelIdentity) -> None:
    got = (kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.dtype)
    want = (model.num_layers, model.num_kv_heads, model.head_dim, model.kv_dtype)
    if got != want:
        raise KVShapeError(
            f"KV (layers, kv_heads, head_dim, dtype) = {got} does not match the model identity {want}; "
            "pass the identity of the model that produced this cache."
        )


__all__ = ["write_card"]
