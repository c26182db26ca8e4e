"""Cards on storage: writer, reader and store locations (spec/cachecard-1.md)."""

from cachecard.kvstore.reader import Card, VerifyReport, open_card, read_card, verify_card
from cachecard.kvstore.writer import write_card

__all__ = ["Card", "VerifyReport", "open_card", "read_card", "verify_card", "write_card"]
