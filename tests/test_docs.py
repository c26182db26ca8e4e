"""`make docs` builds the API reference from the docstrings (scripts/build_docs.py, pdoc); pdoc's warnings
about docstrings fail the build here (pytest runs with -W error)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("pdoc")
ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_builds_with_every_adapter_verb(tmp_path):
    spec = importlib.util.spec_from_file_location("build_docs", ROOT / "scripts" / "build_docs.py")
    build_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_docs)
    index = build_docs.build(tmp_path)
    assert index.is_file()
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    assert {"cachecard.html", "cachecard/kvstore.html", "cachecard/adapters/protocol.html"} <= pages
    for name in ("hf", "mlx", "llamacpp"):
        if importlib.util.find_spec({"hf": "transformers", "mlx": "mlx_lm", "llamacpp": "llama_cpp"}[name]):
            html = (tmp_path / "cachecard" / "adapters" / f"{name}.html").read_text()
            assert 'id="save"' in html and 'id="load"' in html, name


def test_every_runtime_has_a_guide_page():
    for name in ("transformers", "mlx", "llamacpp"):
        text = (ROOT / "docs" / f"{name}.md").read_text()
        assert "save(" in text and "load(" in text
