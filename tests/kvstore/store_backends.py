"""Index backends the store contract suite runs against (imported by tests/kvstore/conftest.py and the state
machine). Each says where a store's index lives for a test, so one contract test runs on every backend."""

from __future__ import annotations

from pathlib import Path


class LmdbBackend:
    """The embedded LMDB index: ``tag`` "main" is the store's default ``<root>/index``; others a fresh one."""

    name = "lmdb"

    def available(self) -> str | None:
        return None

    def index(self, tmp: Path, tag: str = "main") -> str | None:
        return None if tag == "main" else str(tmp / f"index-{tag}")

    def close(self) -> None:
        pass


BACKENDS = {"lmdb": LmdbBackend()}
