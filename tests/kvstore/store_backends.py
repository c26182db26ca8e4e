"""Index backends the store contract suite runs against (imported by tests/kvstore/conftest.py and the state
machine). Each says where a store's index lives for a test, so one contract test runs on every backend."""

from __future__ import annotations

import atexit
import hashlib
from pathlib import Path

from cachecard.testing.services import RedisServer, redis_missing


class LmdbBackend:
    """The embedded LMDB index: ``tag`` "main" is the store's default ``<root>/index``; others a fresh one."""

    name = "lmdb"

    def available(self) -> str | None:
        return None

    def index(self, tmp: Path, tag: str = "main") -> str | None:
        return None if tag == "main" else str(tmp / f"index-{tag}")

    def close(self) -> None:
        pass


class RedisBackend:
    """A Redis index on one ``redis-server`` started for the test session (stopped at its end): each (test
    directory, tag) gets its own namespace, so tests never see each other's index."""

    name = "redis"

    def __init__(self) -> None:
        self.server: RedisServer | None = None

    def available(self) -> str | None:
        return redis_missing()

    def index(self, tmp: Path, tag: str = "main") -> str:
        if self.server is None:
            self.server = RedisServer().start()
            atexit.register(self.close)
        ns = hashlib.sha256(f"{tmp}|{tag}".encode()).hexdigest()[:16]
        return f"{self.server.url}?namespace=t{ns}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


BACKENDS = {"lmdb": LmdbBackend(), "redis": RedisBackend()}
