"""Errors raised by CacheCard (spec/cachecard-1.md §9, "Errors").

Every error says what was wrong, where (card, part), and what to do. All derive from
:class:`CacheCardError`, so callers can catch one type.
"""

from __future__ import annotations


class CacheCardError(Exception):
    """Base class of every error this package raises on purpose."""

    def __init__(self, message: str, *, card: str | None = None, part: str | None = None) -> None:
        self.card = card
        self.part = part
        where = ""
        if card is not None:
            where = f"card {card!r}" + (f", part {part!r}" if part else "") + ": "
        super().__init__(where + message)


class CardNotFoundError(CacheCardError, FileNotFoundError):
    """Nothing is stored at the location."""


class NotACardError(CacheCardError):
    """Something is stored there, but it is not a CacheCard (a foreign zarr group or other data)."""


class IncompleteCardError(CacheCardError):
    """Card data without a committed manifest: a write that never finished (an orphan for gc)."""


class CardExistsError(CacheCardError, FileExistsError):
    """A card already exists at the destination; cards are immutable."""


class CorruptCardError(CacheCardError):
    """Stored bytes fail a checksum, are truncated or missing, or disagree with the manifest."""


class TamperedCardError(CorruptCardError):
    """With a store key set, the card's HMAC is missing or does not verify: it was forged, altered, or written
    without (or with another) key (spec §7.4)."""


class InvalidKeyError(CacheCardError, ValueError):
    """The store key given (or in ``CACHECARD_KEY``) is unusable, e.g. too short."""


class ReadLimitError(CacheCardError, MemoryError):
    """A read would decode more bytes than this reader allows at once (``max_read_bytes``); read a layer or token
    range instead. Not a verdict on the card."""


class ManifestError(CacheCardError):
    """The manifest is not valid under the spec (unknown keys, bad values, implausible shapes)."""


class FormatVersionError(CacheCardError):
    """The card was written in a format version (major, or newer minor) this reader does not implement."""


class UnsupportedCodecError(CacheCardError):
    """The card names a codec this installation cannot decode (or a writer was asked for an unknown one)."""


class IdentityMismatchError(CacheCardError):
    """The card was made by a different model, tokenizer or layout than the one it is restored into."""


class MissingIdentityError(CacheCardError, TypeError):
    """An adapter cannot tell which model it was given (no GGUF file, no tokenizer, nothing bound): the
    message says which argument to pass."""


class KVShapeError(CacheCardError, ValueError):
    """KV arrays handed to the writer do not match each other, the tokens or the model identity."""


class StoreError(CacheCardError):
    """A card store (agent memory, ``cachecard.kvstore.store``) cannot do what was asked."""


class AgentIdError(StoreError, ValueError):
    """An agent id is empty, too long, or holds characters other than letters, digits and ``._@+-``."""


class StoreFullError(StoreError, OSError):
    """The disk holding the store or its index is full; nothing committed before was lost."""


class CardInUseError(StoreError):
    """A card cannot be removed because other cards continue it (their parent chain needs its data)."""


class UnsupportedStateError(CacheCardError, ValueError):
    """Bytes handed in as a runtime's KV state (a llama.cpp sequence state or slot file) are truncated,
    malformed, or in a layout this version of cachecard does not know."""


class ProfileError(CacheCardError, ValueError):
    """A model's sensitivity profile (``cachecard calibrate``) cannot be read, or calibration cannot run
    (a model path, a calibration text or a setting that does not work)."""


class PoolError(CacheCardError):
    """A block pool of resident agents (``cachecard.pool``) cannot do what was asked."""


class PoolBudgetError(PoolError, MemoryError):
    """The pool's byte budget cannot hold what was asked (an agent's active context, a batch, or any more
    tokens once every other agent is pinned or cannot be evicted). Nothing resident was lost."""


class UnknownAgentError(PoolError, KeyError):
    """The pool holds no agent of that name (add it, or attach it from the store)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return Exception.__str__(self)
