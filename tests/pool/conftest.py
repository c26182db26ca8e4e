import pytest


@pytest.fixture(scope="session")
def tiny():
    """(model, identity) of a tiny random llama, identity bound (tests/pool/_tiny.py)."""
    pytest.importorskip("transformers")
    from _tiny import tiny_bound

    return tiny_bound()
