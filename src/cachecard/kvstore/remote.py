"""Card bytes on an object store (spec/store-1.md §1, §4): create-only writes, and failures of the service
said as such.

Objects of a store are immutable: a card's objects, its references and the store marker are written once.
On S3 (s3fs) a write is a conditional ``PUT`` with ``If-None-Match: *``, so a second writer of the same key is
refused by the service itself; elsewhere fsspec checks for the key first, and two writers racing on one key
between that check and the write can still both write (card ids are 128 random bits, so for card objects
that needs a bug, not bad luck; a reference object carries no data beyond its name).
"""

from __future__ import annotations

from typing import Any

from zarr.storage import FsspecStore, WrapperStore

from cachecard.errors import CacheCardError, StoreError


class CreateOnlyFsspecStore(WrapperStore[FsspecStore]):
    """A zarr store over fsspec whose writes never replace an existing object (conditional put on S3)."""

    @classmethod
    def at(cls, url: str, storage_options: dict[str, Any] | None) -> CreateOnlyFsspecStore:
        return cls(FsspecStore.from_url(url, storage_options=storage_options))

    async def set(self, key: str, value: Any) -> None:  # value: a zarr Buffer
        inner = self._store
        await inner.fs._pipe_file(f"{inner.path.rstrip('/')}/{key}", value.to_bytes(), mode="create")

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        try:
            await self.set(key, value)
        except FileExistsError:
            pass


def service_error(e: BaseException, label: str, what: str) -> BaseException:
    """``e``, raised by an object store's client while doing ``what``, as a :class:`StoreError` naming the
    service and saying what to do (errors of ours, and "not found", pass through unchanged)."""
    if isinstance(e, (CacheCardError, FileNotFoundError, FileExistsError, KeyboardInterrupt)):
        return e
    return StoreError(f"the object store at {label!r} failed while {what} ({type(e).__name__}: {e}). Check that "
                      "the service is reachable and the credentials and endpoint are right, then retry; nothing "
                      "committed before was lost")


def create_only(fs: Any, path: str, data: bytes) -> bool:
    """Write ``data`` to ``path`` unless an object is there already; False when one was."""
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


__all__ = ["CreateOnlyFsspecStore", "create_only", "service_error"]
