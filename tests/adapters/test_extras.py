"""A missing framework: importing its adapter raises an ImportError that names the extra to install."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize("adapter,framework", [("hf", "transformers"), ("mlx", "mlx_lm"),
                                               ("llamacpp", "llama_cpp")])
def test_missing_framework_names_the_extra(monkeypatch, adapter, framework):
    monkeypatch.setitem(sys.modules, framework, None)  # as if not installed
    monkeypatch.delitem(sys.modules, f"cachecard.adapters.{adapter}", raising=False)
    with pytest.raises(ImportError, match=rf'pip install "cachecard\[{adapter}\]"'):
        importlib.import_module(f"cachecard.adapters.{adapter}")
