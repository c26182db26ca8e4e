"""What a ``.zip`` card may hold (spec/cachecard-1.md §5.1, "ZIP containers"), checked on its central directory
before any member is read: a damaged or hostile container is refused with a :class:`CorruptCardError`
naming the card and the member, never read as something else.

Refused: duplicate member names (zipfile would silently read the later one), names that are absolute, hold
``..``, ``.``, empty components, backslashes or control characters, symbolic links, encrypted members,
compression methods other than stored and deflate, members whose declared size their compressed data cannot
produce (a stored member's two sizes differ; a deflated one claims more than deflate's maximum ratio: a zip
bomb), documents (``zarr.json``) larger than :data:`MAX_DOCUMENT_BYTES`, and members whose data overlap.
"""

from __future__ import annotations

import re
import stat
import zipfile

from cachecard.errors import CorruptCardError

MAX_DOCUMENT_BYTES = 1 << 26  # 64 MiB: a root or array document (a 1M-token, 80-layer card's root is ~4 MiB)
DEFLATE_MAX_RATIO = 1032      # deflate cannot expand data more than about 1032:1
_LOCAL_HEADER = 30            # fixed part of a ZIP local file header
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f\\]")


def check_members(zf: zipfile.ZipFile, label: str) -> None:
    """Raise CorruptCardError unless every member of ``zf`` is one a card may hold (module docstring)."""
    infos = zf.infolist()
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        _check_name(name, label)
        if name in seen:
            raise _bad(label, name, "appears twice in the zip (a reader would see only one of them)")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise _bad(label, name, "is encrypted")
        if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16):
            raise _bad(label, name, "is a symbolic link")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise _bad(label, name, f"is stored uncompressed but declares {info.file_size} bytes for "
                                        f"{info.compress_size} stored")
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            if info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
                raise _bad(label, name, f"declares {info.file_size} bytes from {info.compress_size} deflated "
                                        "bytes, more than deflate can produce (a zip bomb)")
        else:
            raise _bad(label, name, f"uses compression method {info.compress_type}; cards use stored (0) or "
                                    "deflate (8)")
        if name.rsplit("/", 1)[-1] == "zarr.json" and info.file_size > MAX_DOCUMENT_BYTES:
            raise _bad(label, name, f"declares {info.file_size} bytes; a document is at most {MAX_DOCUMENT_BYTES} "
                                    "(a damaged or hostile zip: refused before inflating)")
    _check_no_overlap(infos, getattr(zf, "start_dir", None), label)


def _check_name(name: str, label: str) -> None:
    parts = name.rstrip("/").split("/")
    if (not name or name.startswith("/") or _BAD_NAME.search(name) or re.match(r"^[A-Za-z]:", name)
            or any(p in ("", ".", "..") for p in parts)):
        raise _bad(label, name, "is not a relative name of plain path components (absolute, '..', '.', empty "
                                "components, backslashes or control characters)")


def _check_no_overlap(infos: list[zipfile.ZipInfo], start_dir: int | None, label: str) -> None:
    """Members' data must not overlap each other or the central directory (overlapping members let a few
    bytes decompress into many members: the non-recursive zip bomb)."""
    spans = sorted((i.header_offset, i.header_offset + _LOCAL_HEADER + len(i.filename.encode()) + i.compress_size,
                    i.filename) for i in infos)
    for (_, end, name), (start, _, _) in zip(spans, spans[1:]):
        if start < end:
            raise _bad(label, name, "overlaps the next member in the zip")
    if spans and start_dir is not None and spans[-1][1] > start_dir:
        raise _bad(label, spans[-1][2], "overlaps the zip's central directory")


def _bad(label: str, name: str, why: str) -> CorruptCardError:
    return CorruptCardError(f"zip member {name!r} {why}; the card is damaged or hostile: delete it (or restore it "
                            "from a replica)", card=label, part=name)


__all__ = ["MAX_DOCUMENT_BYTES", "check_members"]
