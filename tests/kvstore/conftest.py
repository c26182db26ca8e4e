"""The store contract suite's fixtures: every test asking for ``backend`` or ``store`` runs once per index
backend (tests/kvstore/store_backends.py)."""

from __future__ import annotations

import pytest

from cachecard import Store
from store_backends import BACKENDS


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    b = BACKENDS[request.param]
    why = b.available()
    if why:
        pytest.skip(why)
    return b


@pytest.fixture
def make_store(backend, tmp_path):
    """``make_store(root, tag="main", **kwargs)``: a Store at ``root`` whose index is the backend's index
    ``tag`` for this test (the same tag reopens the same index; another tag is a fresh, empty index)."""
    opened: list[Store] = []

    def make(root, tag: str = "main", **kwargs) -> Store:
        st = Store(root, index=backend.index(tmp_path, tag), **kwargs)
        opened.append(st)
        return st

    yield make
    for st in opened:
        st.close()


@pytest.fixture
def store(make_store, tmp_path):
    s = make_store(tmp_path / "store", block_tokens=16)
    s.atime_resolution_s = 0.0  # exact LRU order for the eviction tests
    return s


@pytest.fixture(scope="session", autouse=True)
def _stop_services():
    """Stop the servers the backends started, at the end of the session."""
    yield
    for b in BACKENDS.values():
        b.close()
