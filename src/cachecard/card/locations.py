"""Where a card lives, and how a write commits atomically (spec/cachecard-1.md §7.3, "Commit").

A location is a local directory path, a ``.zip`` path, an fsspec URL (``s3://…``, ``memory://…``) or any
zarr ``Store``. Local directories and zips are written under a hidden staging name and renamed into place,
so the final name only ever holds a complete card. Elsewhere the root ``zarr.json`` (which carries the
manifest) is written last, so a half-written card has no manifest and reads as incomplete, never as valid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
import zipfile
from pathlib import Path
from typing import Any, Iterator

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore, WrapperStore, ZipStore

from cachecard.card._zarr import open_zip, sync
from cachecard.errors import CardExistsError, CardNotFoundError, CorruptCardError, NotACardError

ROOT_KEY = "zarr.json"
Location = str | os.PathLike[str] | Store


def describe(location: Location) -> str:
    """A short name of a location for messages."""
    return str(location) if not isinstance(location, Store) else f"<{type(location).__name__}>"


def _is_url(location: Location) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


class _DeferRoot(WrapperStore[Store]):
    """Swallows zarr's implicit writes of the root ``zarr.json``: the writer writes it once, last."""

    async def set(self, key: str, value: Any) -> None:
        if key != ROOT_KEY:
            await self._store.set(key, value)

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        if key != ROOT_KEY:
            await self._store.set_if_not_exists(key, value)


def _root_exists(store: Store) -> bool:
    return sync(store.exists(ROOT_KEY))


def _retract(store: Store) -> None:
    """Un-publish a card before replacing it: the root first (readers then see an incomplete card, never
    old metadata over new chunks), then every other object, so none of the old card lingers."""

    async def run() -> None:
        await store.delete(ROOT_KEY)
        keys = [key async for key in store.list()]
        for key in keys:
            await store.delete(key)

    sync(run())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def writable(location: Location, *, overwrite: bool = False,
             storage_options: dict[str, Any] | None = None) -> Iterator[tuple[Store, Store]]:
    """Yield ``(data_store, root_store)``: write arrays through the first, the root document through the
    second, last. Leaving the block commits; an exception leaves nothing at the location."""
    if isinstance(location, Store) or _is_url(location):
        store = location if isinstance(location, Store) else FsspecStore.from_url(
            str(location), storage_options=storage_options)
        if _root_exists(store):
            if not overwrite:
                raise CardExistsError("a card already exists here; cards are immutable (pass overwrite=True "
                                      "to replace it)", card=describe(location))
            _retract(store)
        yield _DeferRoot(store), store
        return

    dest = Path(location)
    if dest.exists() and not overwrite:
        raise CardExistsError("a card already exists here; cards are immutable (pass overwrite=True to "
                              "replace it)", card=str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex}"
    is_zip = dest.suffix == ".zip"
    store: Store = ZipStore(stage, mode="w") if is_zip else LocalStore(stage)
    try:
        yield _DeferRoot(store), store
        store.close()
        if is_zip:
            with open(stage, "rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_tree(stage)
        _publish(stage, dest, overwrite=overwrite)
    except BaseException:
        store.close()
        _remove(stage)
        raise


def _publish(stage: Path, dest: Path, *, overwrite: bool) -> None:
    trash = None
    if overwrite and dest.exists():
        trash = dest.parent / f".{dest.name}.trash-{uuid.uuid4().hex}"
        os.rename(dest, trash)
    try:
        if dest.exists():  # lost a race with another writer; os.rename would replace a file silently
            raise CardExistsError("another writer committed a card here first", card=str(dest))
        os.rename(stage, dest)
    except OSError as e:
        raise CardExistsError(f"could not commit ({e.strerror}); another writer may have committed first",
                              card=str(dest)) from e
    finally:
        if trash is not None:
            _remove(trash)
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def readable(location: Location, *, storage_options: dict[str, Any] | None = None) -> Store:
    """Open a location read-only; CardNotFoundError if nothing is there. A ``.zip`` card's central directory
    and a directory card's entries are checked first (no symbolic links, no special files inside a card)."""
    if isinstance(location, Store):
        return location
    if _is_url(location):
        return FsspecStore.from_url(str(location), storage_options=storage_options, read_only=True)
    path = Path(location)
    if not path.exists():
        raise CardNotFoundError("nothing is stored here; check the path", card=str(path))
    if path.is_file():
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                if f.read(4) == b"PK\x03\x04":  # a zip archive whose end is damaged or cut off
                    raise CorruptCardError("a damaged or truncated zip archive (no readable central directory)",
                                           card=str(path))
            raise NotACardError("a file that is not a zip archive: a card is a directory or a .zip file",
                                card=str(path))
        return open_zip(path, str(path))
    if not path.is_dir():
        raise CorruptCardError("neither a directory nor a zip file (a special file); not a card", card=str(path))
    _refuse_links(path)
    return LocalStore(path, read_only=True)


STORE_MARKER = "cachecard-store.json"  # cachecard.kvstore.names.STORE_FILE (tests check they agree)


def folder_contents(path: Path) -> tuple[list[str], list[str]]:
    """Names of the cards (directories with a root ``zarr.json``, zip files) and of the stores directly in a
    local folder."""
    children = sorted(path.iterdir())
    cards = [c.name for c in children if (c / "zarr.json").is_file() or (c.is_file() and zipfile.is_zipfile(c))]
    return cards, [c.name for c in children if (c / STORE_MARKER).is_file()]


def held(path: Path, cards: list[str], stores: list[str]) -> str:
    """"2 cards (a, b.zip: `cachecard inspect path/a`) and 1 store (...)"."""
    def some(names: list[str], what: str, command: str) -> list[str]:
        if not names:
            return []
        listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return [f"{len(names)} {what}{'s' * (len(names) > 1)} ({listed}: `cachecard {command} {path / names[0]}`)"]

    return " and ".join(some(cards, "card", "inspect") + some(stores, "store", "ls"))


def describe_folder(path: Path) -> NotACardError | None:
    """What a local folder without a card's root ``zarr.json`` is, when it is no unfinished card write: a
    store, a folder of cards or stores, or something else. ``None`` when it holds a card's arrays."""
    if (path / STORE_MARKER).is_file():
        return NotACardError(f"this folder is a cachecard store, not a card: list its cards with `cachecard ls "
                             f"{path}` and inspect one with `cachecard inspect {path} CARD_ID`", card=str(path))
    if any((path / name).exists() for name in ("k", "v", "tokens")):
        return None  # a card's arrays without its root: an unfinished write
    cards, stores = folder_contents(path)
    if cards or stores:
        return NotACardError(f"this folder is not a card; it holds {held(path, cards, stores)}", card=str(path))
    return NotACardError("this folder is not a card: it has no zarr.json and none of a card's arrays "
                         "(k, v, tokens)", card=str(path))


CARD_ENTRIES = (ROOT_KEY, "k", "v", "tokens", "positions")  # every object of a card lies in one of these


def _refuse_links(root: Path) -> None:
    """A directory card holds directories and regular files only: a symbolic link would read (or, through
    a store, delete) data outside the card, and a FIFO or device would block or stream forever. Only the
    card's own entries are walked (readers ignore anything else there)."""
    for top in CARD_ENTRIES:
        _check_entry(root, os.path.join(root, top))
        if os.path.isdir(os.path.join(root, top)) and not os.path.islink(os.path.join(root, top)):
            for dirpath, dirs, files in os.walk(os.path.join(root, top), followlinks=False):
                for name in dirs + files:
                    _check_entry(root, os.path.join(dirpath, name))


def _check_entry(root: Path, full: str) -> None:
    try:
        mode = os.lstat(full).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "a special file"
        raise CorruptCardError(f"{os.path.relpath(full, root)!r} is {kind}; a card holds only directories and "
                               "regular files: refusing it (damaged or hostile)", card=str(root))


def stored_objects(store: Store) -> dict[str, int]:
    """Every object of a card with its size in bytes."""

    async def sizes() -> dict[str, int]:
        return {key: await store.getsize(key) async for key in store.list()}

    return sync(sizes())


__all__ = ["Location", "ROOT_KEY", "describe", "describe_folder", "folder_contents", "held", "readable",
           "stored_objects", "writable"]
