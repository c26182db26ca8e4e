"""The root document of a card (spec/cachecard-1.md §5.6, §7.2, §7.4, §8): the commit point, the manifest and
its checksum, the optional HMAC, version dispatch and migration of older minors."""

from __future__ import annotations

import json
from typing import Any

import pydantic
from zarr.abc.store import Store
from zarr.storage import LocalStore

from cachecard.card import keyed
from cachecard.card._zarr import RangeByteRequest, get_bytes, sync
from cachecard.card.locations import ROOT_KEY, describe_folder
from cachecard.card.zipcheck import MAX_DOCUMENT_BYTES
from cachecard.errors import (
    CardNotFoundError, CorruptCardError, FormatVersionError, IncompleteCardError, ManifestError, NotACardError,
)
from cachecard.manifest import FORMAT_MAJOR, FORMAT_MINOR, CardManifest, manifest_digest

MANIFEST_ATTR = "cachecard"
DIGEST_ATTR = "cachecard_sha256"


def read_root(store: Store, label: str) -> dict[str, Any]:
    """The root group's attributes; refuses a missing, oversized, non-JSON or foreign root document."""
    raw = get_bytes(store, ROOT_KEY, RangeByteRequest(0, MAX_DOCUMENT_BYTES + 1))
    if raw is None:
        if sync(_any_key(store)):
            other = describe_folder(store.root) if isinstance(store, LocalStore) else None
            if other is not None:  # a store, a folder of cards, ...: not data to delete
                raise other
            raise IncompleteCardError("card data without a committed manifest: a write that did not finish. "
                                      "It holds nothing usable; delete it (or let gc collect it)", card=label)
        raise CardNotFoundError("nothing is stored here; check the location", card=label)
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ManifestError(f"the root zarr.json holds more than {MAX_DOCUMENT_BYTES} bytes; refusing an implausible "
                            "card", card=label, part="zarr.json")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCardError(f"the root zarr.json is not valid JSON ({e}); the card is corrupt",
                               card=label, part="zarr.json") from e
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise NotACardError("not a zarr v3 group, so not a CacheCard", card=label)
    attrs = doc.get("attributes")
    if not isinstance(attrs, dict) or MANIFEST_ATTR not in attrs:
        raise NotACardError(f"a zarr group without the {MANIFEST_ATTR!r} attribute: not a CacheCard", card=label)
    return attrs


async def _any_key(store: Store) -> bool:
    async for _ in store.list():
        return True
    return False


def parse_manifest(attrs: dict[str, Any], label: str, key: bytes | None = None) -> CardManifest:
    """Checksum, HMAC (with a store key), version, then strict validation of the (migrated) manifest."""
    raw = attrs[MANIFEST_ATTR]
    if not isinstance(raw, dict):
        raise ManifestError("the manifest must be a JSON object", card=label, part="manifest")
    try:
        digest = manifest_digest(raw)
    except Exception as e:  # noqa: BLE001 - rfc8785 refuses numbers I-JSON cannot carry (e.g. 2**64)
        raise ManifestError(f"the manifest cannot be canonicalized ({type(e).__name__}: {e})", card=label,
                            part="manifest") from e
    if attrs.get(DIGEST_ATTR) != digest:
        raise CorruptCardError(f"the manifest does not match its {DIGEST_ATTR} checksum; the card is corrupt or "
                               "was edited", card=label, part="manifest")
    if key is not None:
        keyed.check(attrs, digest, key, label)
    major, minor = raw.get("cachecard_format"), raw.get("format_minor")
    if (not isinstance(major, int) or not isinstance(minor, int) or isinstance(major, bool)
            or isinstance(minor, bool) or minor < 0):
        raise ManifestError(f"cachecard_format and format_minor must be integers; got {major!r}, {minor!r}",
                            card=label, part="manifest")
    if (major, minor) > (FORMAT_MAJOR, FORMAT_MINOR):
        raise FormatVersionError(f"written in CacheCard format {major}.{minor}; this reader implements up to "
                                 f"{FORMAT_MAJOR}.{FORMAT_MINOR}. Upgrade cachecard to read it", card=label)
    if major < FORMAT_MAJOR:
        raise FormatVersionError(f"format {major}.{minor} predates format 1 and cannot be read", card=label)
    try:  # strict JSON-mode validation: "2" is not an integer, a number is not a time
        return CardManifest.model_validate_json(json.dumps(MIGRATIONS[minor](raw)), strict=True)
    except pydantic.ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise ManifestError(f"invalid manifest ({problems})", card=label, part="manifest") from None


def _same(raw: dict[str, Any]) -> dict[str, Any]:
    return raw


# Manifest migrations per minor, to the current model. 1.0 and 1.1 manifests share fields, 1.2 adds the
# optional `pruning`, 1.3 the object table `objects`; 1.0 differs in array layout, which Card dispatches on.
MIGRATIONS = {0: _same, 1: _same, 2: _same, 3: _same}

__all__ = ["DIGEST_ATTR", "MANIFEST_ATTR", "MIGRATIONS", "parse_manifest", "read_root"]
