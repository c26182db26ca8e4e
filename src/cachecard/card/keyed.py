"""Keyed tamper evidence (spec/cachecard-1.md §7.4): an HMAC-SHA256 of the manifest checksum under a store key.

The manifest checksum and the object table stop accidents and misplaced objects, but anyone who can write to
the bucket can recompute them. With a store key (``CACHECARD_KEY`` in the environment, or passed explicitly;
never stored in a card) the writer adds ``cachecard_hmac_sha256`` to the root attributes, and a reader holding
the key refuses any card whose HMAC is missing or wrong, so a forger without the key cannot make a card that
verifies. Off by default.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from cachecard.errors import InvalidKeyError, TamperedCardError

KEY_ENV = "CACHECARD_KEY"
HMAC_ATTR = "cachecard_hmac_sha256"
MIN_KEY_BYTES = 16

StoreKey = bytes | str | None


def resolve_key(key: StoreKey) -> bytes | None:
    """The store key as bytes: ``key`` when given (a ``str`` is taken as UTF-8), else ``$CACHECARD_KEY``, else
    ``None`` (no keyed mode)."""
    if key is None:
        key = os.environ.get(KEY_ENV) or None
        if key is None:
            return None
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_KEY_BYTES:
        raise InvalidKeyError(f"a store key needs at least {MIN_KEY_BYTES} bytes, got {len(raw)}; use a random one, "
                              "e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    return raw


def tag(key: bytes, manifest_sha256: str) -> str:
    """HMAC-SHA256 (hex) under ``key`` of the ASCII bytes of the manifest checksum (64 lowercase hex digits)."""
    return hmac.new(key, manifest_sha256.encode("ascii"), "sha256").hexdigest()


def check(attrs: dict[str, Any], manifest_sha256: str, key: bytes, label: str) -> None:
    """Refuse a card whose HMAC is missing or does not verify under ``key``."""
    got = attrs.get(HMAC_ATTR)
    if got is None:
        raise TamperedCardError("the card carries no HMAC, but a store key is set: it was written without the key "
                                "(or its HMAC was removed). Refusing it; rewrite it with the key if you trust it",
                                card=label, part="zarr.json")
    if not isinstance(got, str) or not hmac.compare_digest(got.encode("utf-8"), tag(key, manifest_sha256).encode()):
        raise TamperedCardError("the card's HMAC does not verify under the store key: it was forged or altered, or "
                                "written with another key", card=label, part="zarr.json")


__all__ = ["HMAC_ATTR", "KEY_ENV", "StoreKey", "check", "resolve_key", "tag"]
