"""Build the API reference from the docstrings with pdoc (``make docs``): HTML in docs/api/ (or the folder
given), numpy-style docstrings, every public module of cachecard. The runtime adapters are documented when
their framework is installed (``pip install "cachecard[all]"``); a missing one is left out and named."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pdoc

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ("cachecard.adapters.hf", "cachecard.adapters.mlx", "cachecard.adapters.llamacpp",
            "cachecard.adapters.torch_read")


def modules() -> list[str]:
    """cachecard and its public submodules, without adapters whose framework is missing."""
    names = ["cachecard", "cachecard.adapters.protocol", "cachecard.adapters.ggsq", "cachecard.card",
             "cachecard.codecs", "cachecard.kvstore", "cachecard.transforms", "cachecard.identity",
             "cachecard.kv", "cachecard.manifest", "cachecard.errors", "cachecard.testing", "cachecard.cli"]
    for name in ADAPTERS:
        try:
            importlib.import_module(name)
        except ImportError as e:
            print(f"docs: leaving out {name} ({e.msg.split(';')[0]})", file=sys.stderr)
            continue
        names.append(name)
    return names


def build(out: Path) -> Path:
    pdoc.render.configure(docformat="numpy", footer_text="CacheCard", search=False)
    pdoc.pdoc(*modules(), output_directory=out)
    return out / "index.html"


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "api"))
