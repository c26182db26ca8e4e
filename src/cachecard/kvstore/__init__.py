"""Cards on storage: writer, reader and store locations (spec/cachecard-1.md)."""

from cachecard.kvstore.reader import Card, VerifyReport, open_card, read_card, verify_card
from cachecard.kvstore.writer import write_card
from cachecard.kvstore.store import Match, Store, open_store

__all__ = ["Card", "Match", "Store", "VerifyReport", "open_card", "open_store", "read_card", "verify_card", "write_card"]
