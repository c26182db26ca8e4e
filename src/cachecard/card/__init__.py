"""The card format (spec/cachecard-1.md): layout, locations, writer, reader, shard encode and shard read.

Data flows one way: canonical KV -> codec per K/V (``cachecard.codecs``) -> card (this package) -> agent
store (``cachecard.kvstore``). Only ``_zarr.py`` here touches zarr's private API.
"""

from cachecard.card.reader import Card, VerifyReport, open_card, read_card, verify_card
from cachecard.card.writer import write_card

__all__ = ["Card", "VerifyReport", "open_card", "read_card", "verify_card", "write_card"]
