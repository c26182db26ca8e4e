"""CacheCard: persistent, shareable LLM KV caches.

The normative format is spec/cachecard-1.md. ``import cachecard`` imports no ML framework; adapters in
``cachecard.adapters.<framework>`` do.
"""

from cachecard._version import __version__
from cachecard.errors import (
    CacheCardError, CardExistsError, CardNotFoundError, CorruptCardError, FormatVersionError, IdentityMismatchError,
    IncompleteCardError, KVShapeError, ManifestError, NotACardError, UnsupportedCodecError,
)
from cachecard.errors import AgentIdError, CardInUseError, StoreError, StoreFullError
from cachecard.errors import InvalidKeyError, ReadLimitError, TamperedCardError
from cachecard.kv import CanonicalKV
from cachecard.card import Card, VerifyReport, open_card, read_card, verify_card, write_card
from cachecard.kvstore import Match, Store, open_store
from cachecard.manifest import CardManifest, LayerKind, ModelIdentity, ParentRef, Rope
from cachecard.transforms import prune

__all__ = [
    "__version__", "CacheCardError", "CardExistsError", "CardNotFoundError", "CorruptCardError",
    "FormatVersionError", "IdentityMismatchError", "IncompleteCardError", "KVShapeError", "ManifestError",
    "NotACardError", "UnsupportedCodecError", "CanonicalKV", "Card", "VerifyReport", "open_card", "read_card",
    "verify_card", "write_card", "CardManifest", "LayerKind", "ModelIdentity", "ParentRef", "Rope",
    "AgentIdError", "CardInUseError", "StoreError", "StoreFullError", "Match", "Store", "open_store", "prune",
    "InvalidKeyError", "ReadLimitError", "TamperedCardError",
]
