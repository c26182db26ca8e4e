"""The objects of a store (spec/store-1.md §1): where cards and references live, how they are written, read
back, deleted and listed, on a local directory or any fsspec URL (``s3://bucket/prefix``, ``memory://…``)::

    cachecard-store.json            {"cachecard_store": 1, "block_tokens": B, ...}: written once, at creation
    cards/<id[:2]>/<id>/            one card (spec/cachecard-1.md), immutable, named by its card_id
    refs/<agent>/<id>               an agent's reference to a card (tiny JSON object; its existence counts)

These objects are the source of truth of a store; its index is derived from them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import fsspec
import numpy as np
from zarr.errors import ContainsArrayError, ContainsGroupError

from cachecard.card import layout
from cachecard.card.reader import Card, open_card
from cachecard.card.shard_write import Payloads
from cachecard.card.writer import write_card
from cachecard.errors import CacheCardError, CardExistsError, CorruptCardError, StoreError
from cachecard.kv import CanonicalKV
from cachecard.kvstore.card_cache import CardCache
from cachecard.kvstore.index import CardRecord
from cachecard.kvstore.names import (
    AGENT_RE, CARD_ID_RE, DEFAULT_BLOCK_TOKENS, STORE_FILE, STORE_VERSION, check_card_id, os_error, unlink_quietly,
)
from cachecard.kvstore.prefix import model_key
from cachecard.kvstore.remote import CreateOnlyFsspecStore, create_only, service_error
from cachecard.manifest import CardManifest, ModelIdentity, ParentRef


@dataclass
class ObjectScan:
    """What a store holds: its cards ({id: committed?, newest mtime}), junk (staging or trash paths with their
    mtime) and references ((agent, card id) pairs)."""

    cards: dict[str, CardObject] = field(default_factory=dict)
    junk: list[tuple[str, float]] = field(default_factory=list)
    refs: set[tuple[str, str]] = field(default_factory=set)


@dataclass
class CardObject:
    committed: bool
    mtime: float


@dataclass(frozen=True)
class StoreInfo:
    """What the store marker says: the block size ``B`` and the store's id ("" for a store made before ids)."""

    block_tokens: int
    store_id: str


class StoreObjects:
    """Object I/O of one store: ``root`` is a local directory or an fsspec URL; with ``cache``, cards of a remote
    store are read through that local cache."""

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
                 cache: CardCache | None = None) -> None:
        self.label = str(root)
        self.options = dict(storage_options or {})
        url = str(root)
        self.remote = "://" in url and not url.startswith("file://")
        self.cache = cache if self.remote else None
        if self.remote:
            self.fs, base = fsspec.core.url_to_fs(url, **self.options)
            self.base = base.rstrip("/")
        else:
            self.fs = fsspec.filesystem("file")
            self.base = str(Path(url.removeprefix("file://")).absolute())

    @contextmanager
    def service(self, what: str) -> Iterator[None]:
        """Say a failure of the object store's client as a :class:`StoreError` naming the service."""
        try:
            yield
        except Exception as e:
            err = service_error(e, self.label, what) if self.remote else e
            if err is e:
                raise
            raise err from e

    # -- paths -------------------------------------------------------------------------------------------
    def path_of(self, *parts: str) -> str:
        """The path of ``parts`` under the store's root. On a local store, refuse (:class:`StoreError`) when a
        component below the root is a symbolic link: a store never follows a link out of its root, so no put,
        delete or gc writes or removes anything elsewhere. (A process that swaps a directory for a link between
        this check and the write still races it; it needs write access to the store to do so.)"""
        path = self.base
        for part in parts:
            path = f"{path}/{part}"
            if self.remote:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                break  # nothing deeper exists either
            except NotADirectoryError:
                raise StoreError(f"{self.label!r} is a file; a store is a directory (or a URL prefix). Give a new "
                                 "or empty directory to create one") from None
            if stat.S_ISLNK(st.st_mode):
                raise StoreError(f"{path!r} is a symbolic link inside the store at {self.label!r}; a store never "
                                 "follows links out of its root. Remove the link (move the real data into the "
                                 "store, or open the store at the real directory)")
        return f"{self.base}/{'/'.join(parts)}"

    # -- the store marker ----------------------------------------------------------------------------------
    def _read_marker(self) -> dict[str, Any] | None:
        marker = self.path_of(STORE_FILE)
        try:
            with self.service("reading the store marker"):
                doc = json.loads(self.fs.cat_file(marker))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise StoreError(f"{self.label!r} is a file; a store is a directory (or a URL prefix). Give a new or "
                             "empty directory to create one") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{marker!r} is not valid JSON ({e}); this is not a cachecard store") from e
        if not isinstance(doc, dict) or doc.get("cachecard_store") != STORE_VERSION:
            raise StoreError(f"{marker!r} is not a version {STORE_VERSION} cachecard store "
                             f"(cachecard_store={doc.get('cachecard_store') if isinstance(doc, dict) else doc!r}); "
                             "upgrade cachecard")
        return doc

    def open_root(self, create: bool, block_tokens: int | None) -> StoreInfo:
        """Read (or, with ``create``, write once) the store marker."""
        doc = self._read_marker()
        if doc is None:
            if not create:
                raise StoreError(f"no cachecard store at {self.label!r} (no {STORE_FILE}); create it with "
                                 "Store(..., create=True)")
            if not self.remote and os.path.isdir(self.base) and os.listdir(self.base):
                held = ", ".join(sorted(os.listdir(self.base))[:5])
                raise StoreError(f"{self.label!r} holds other data ({held}), not a store: a store takes a new or "
                                 "empty directory (its cards live under it by id; cards written elsewhere are not "
                                 "in its index)")
            b = DEFAULT_BLOCK_TOKENS if block_tokens is None else block_tokens
            if not isinstance(b, int) or not 1 <= b <= 1 << 16:
                raise StoreError(f"block_tokens must be an integer in [1, 65536]; got {b!r}")
            new = {"cachecard_store": STORE_VERSION, "block_tokens": b, "store_id": uuid.uuid4().hex,
                   "layout": "cards/<id[:2]>/<id>, refs/<agent>/<id>", "hash": "blake2b-128 chained, int32 LE"}
            self.write_small(self.path_of(STORE_FILE), json.dumps(new, indent=1).encode(), create=True)
            doc = self._read_marker()  # a node that created the store at the same moment may have won
            assert doc is not None
        b = doc.get("block_tokens")
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 1 << 16:
            raise StoreError(f"{self.path_of(STORE_FILE)!r} has an invalid block_tokens {b!r}")
        if block_tokens is not None and block_tokens != b:
            raise StoreError(f"the store at {self.label!r} uses block_tokens={b}, not {block_tokens}; "
                             "leave block_tokens unset to use the store's")
        sid = doc.get("store_id", "")
        if not isinstance(sid, str) or (sid and not CARD_ID_RE.fullmatch(sid)):
            raise StoreError(f"{self.path_of(STORE_FILE)!r} has an invalid store_id {sid!r}")
        return StoreInfo(b, sid)

    def give_store_id(self) -> str:
        """Give a store made before store ids one (a shared index binds to it): the marker is rewritten once,
        with ``store_id`` added. Two nodes doing this at the same moment can each write their own; the marker
        read back afterwards decides, and a node bound to the loser is refused by the index on its next start."""
        doc = self._read_marker()
        if doc is None:
            raise StoreError(f"no cachecard store at {self.label!r}")
        if not doc.get("store_id"):
            doc["store_id"] = uuid.uuid4().hex
            self.write_small(self.path_of(STORE_FILE), json.dumps(doc, indent=1).encode())
        return self.open_root(False, None).store_id

    # -- cards ---------------------------------------------------------------------------------------------
    def card_path(self, card_id: str) -> str:
        return self.path_of("cards", card_id[:2], card_id)

    def card_location(self, card_id: str) -> str:
        """Where card ``card_id`` lives: a local path or a URL (readable with ``open_card``)."""
        path = self.card_path(check_card_id(card_id))
        return self.fs.unstrip_protocol(path) if self.remote else path

    def write_card(self, card_id: str, kv: CanonicalKV, tokens: np.ndarray, model: ModelIdentity, *,
                   codec: str | tuple[str, str], chunk_tokens: int = layout.DEFAULT_CHUNK_TOKENS,
                   parent: ParentRef | None, payloads: Payloads | None = None) -> CardManifest:
        """Write a new card (data first, manifest last; on an object store every object create-only)."""
        where: Any = self.card_location(card_id)
        if self.remote:
            where = CreateOnlyFsspecStore.at(where, self.options or None)
        with self.service(f"writing card {card_id}"):
            try:
                return write_card(where, kv, tokens, model, codec=codec, chunk_tokens=chunk_tokens, parent=parent,
                                  card_id=card_id, storage_options=self.options or None, payloads=payloads)
            except (FileExistsError, ContainsArrayError, ContainsGroupError) as e:
                if isinstance(e, CacheCardError):
                    raise
                raise CardExistsError(f"an object of this card exists already ({e}); card objects are written "
                                      "once (a conditional create refused to replace it)", card=card_id) from e

    def _open(self, card_id: str) -> Card:
        location = self.card_location(card_id)
        with self.service(f"reading card {card_id}"):
            if self.cache is None:
                return open_card(location, storage_options=self.options or None)
            local = self.cache.get(card_id, lambda stage: self._fetch(card_id, stage))
            return open_card(str(local))

    def _fetch(self, card_id: str, stage: Path) -> None:
        """Copy a remote card's objects into the local directory ``stage`` (for the card cache)."""
        src = self.card_path(card_id)
        files = self.fs.find(src)
        stage.mkdir(parents=True)
        for f in files:
            (stage / f[len(src) + 1:]).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get(files, [str(stage / f[len(src) + 1:]) for f in files])

    def open_card(self, card_id: str) -> Card:
        """Open the card stored under ``card_id``; refuse one whose manifest names another id."""
        card = self._open(card_id)
        if card.manifest.card_id != card_id:
            raise CorruptCardError(f"its manifest says card_id {card.manifest.card_id}", card=card_id)
        return card

    def open_indexed(self, rec: CardRecord) -> Card:
        """Open a card and check it is the one the index describes (so a card copied in under another card's
        name is never served as that card's KV)."""
        card = self._open(rec.card_id)
        m = card.manifest
        problems = []
        if m.card_id != rec.card_id:
            problems.append(f"its manifest says card_id {m.card_id}")
        if model_key(m.model).hex() != rec.model:
            problems.append("its model identity differs from the one indexed")
        if (m.parent.card_id if m.parent else None) != rec.parent or m.start_position != rec.start \
                or m.tokens.count != rec.tokens:
            problems.append("its parent or token count differs from the index")
        if problems:
            raise CorruptCardError("the card stored under this id does not match the index (" + "; ".join(problems)
                                   + "); run `cachecard verify` and `cachecard reindex`", card=rec.card_id)
        return card

    def forget_cached(self, card_id: str) -> None:
        if self.cache is not None:
            self.cache.drop(card_id)

    def card_bytes(self, card_id: str) -> int:
        path = self.card_path(card_id)
        if not self.remote:
            return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)
        with self.service(f"listing card {card_id}"):
            return sum(info["size"] for info in self.fs.find(path, detail=True).values())

    def delete_card(self, card_id: str) -> None:
        """Remove a card's objects. Locally the card is renamed to trash first, so it disappears at once (a
        crash leaves trash that gc removes); elsewhere its root document goes first (it reads as incomplete)."""
        path = self.card_path(card_id)
        self.forget_cached(card_id)
        if not self.remote:
            p = Path(path)
            if not p.exists():
                return
            trash = p.parent / f".{card_id}.trash-{uuid.uuid4().hex}"
            os.rename(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return
        with self.service(f"deleting card {card_id}"):
            for target, rm in ((f"{path}/zarr.json", self.fs.rm_file), (path, partial(self.fs.rm, recursive=True))):
                try:
                    rm(target)
                except FileNotFoundError:
                    pass

    # -- references ----------------------------------------------------------------------------------------
    def ref_path(self, agent: str, card_id: str) -> str:
        return self.path_of("refs", agent, card_id)

    def write_ref(self, agent: str, card_id: str) -> None:
        """Write ``agent``'s reference to a card (create-only: an existing reference already says it)."""
        self.write_small(self.ref_path(agent, card_id),
                         json.dumps({"agent": agent, "card_id": card_id, "time": time.time()}).encode(), create=True)

    def delete_ref(self, agent: str, card_id: str) -> None:
        with self.service(f"deleting {agent!r}'s reference to card {card_id}"):
            try:
                self.fs.rm_file(self.ref_path(agent, card_id))
            except FileNotFoundError:
                pass

    def write_small(self, path: str, data: bytes, *, create: bool = False) -> bool:
        """Write a small object atomically (locally: a hidden temporary file, fsync, rename). With ``create``,
        leave an existing object as it is and return False (locally a hard link, which refuses to replace)."""
        try:
            if self.remote:
                with self.service(f"writing {path!r}"):
                    if create:
                        return create_only(self.fs, path, data)
                    self.fs.pipe_file(path, data)
                    return True
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if not create:
                os.replace(tmp, p)
                return True
            try:
                os.link(tmp, p)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except OSError as e:
            raise os_error(e, f"cannot write {path!r}") from e

    # -- scanning ------------------------------------------------------------------------------------------
    def remove_junk(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else unlink_quietly(path)

    def scan(self) -> ObjectScan:
        """Every card, piece of junk and reference the store holds (the objects, not the index)."""
        with self.service("listing the store's objects"):
            return self._scan_local() if not self.remote else self._scan_remote()

    def _scan_local(self) -> ObjectScan:
        out = ObjectScan()
        root = Path(self.path_of("cards"))
        if root.is_dir():
            for sub in os.scandir(root):
                if not sub.is_dir(follow_symlinks=False):
                    continue
                for e in os.scandir(sub.path):
                    st = e.stat(follow_symlinks=False)
                    if CARD_ID_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False):
                        out.cards[e.name] = CardObject(os.path.exists(os.path.join(e.path, "zarr.json")), st.st_mtime)
                    elif e.name.startswith("."):
                        out.junk.append((e.path, st.st_mtime))
        rroot = Path(self.path_of("refs"))
        if rroot.is_dir():
            for a in os.scandir(rroot):
                if a.is_dir(follow_symlinks=False) and AGENT_RE.fullmatch(a.name):
                    for r in os.scandir(a.path):
                        if CARD_ID_RE.fullmatch(r.name):
                            out.refs.add((a.name, r.name))
                        elif r.name.startswith("."):
                            out.junk.append((r.path, r.stat(follow_symlinks=False).st_mtime))
        return out

    def _scan_remote(self) -> ObjectScan:
        out = ObjectScan()
        base = self.base
        for path, info in self.fs.find(f"{base}/cards", detail=True).items():
            parts = path[len(base) + 1:].split("/")
            if len(parts) < 4 or not CARD_ID_RE.fullmatch(parts[2]):
                continue
            c = out.cards.setdefault(parts[2], CardObject(False, 0.0))
            if parts[3:] == ["zarr.json"]:
                c.committed = True
            mtime = info.get("LastModified") or info.get("mtime") or info.get("created")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            c.mtime = max(c.mtime, float(mtime or 0.0))
        for path in self.fs.find(f"{base}/refs"):
            parts = path[len(base) + 1:].split("/")
            if len(parts) == 3 and AGENT_RE.fullmatch(parts[1]) and CARD_ID_RE.fullmatch(parts[2]):
                out.refs.add((parts[1], parts[2]))
        return out


__all__ = ["CardObject", "ObjectScan", "StoreInfo", "StoreObjects"]
