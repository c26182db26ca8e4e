"""The layout is the architecture (README "Layout"): imports only go down the floors, zarr internals stay in
card/_zarr.py, modules stay small, and ``import cachecard`` imports no ML framework."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cachecard

SRC = Path(cachecard.__file__).parent
# floors, lowest first: a module may import its own floor and those below, never one above
FLOORS = {"base": 0, "codecs": 1, "transforms": 1, "card": 2, "kvstore": 3, "adapters": 4, "pool": 5,
          "calibrate": 5, "cli": 6}
BASE = {"errors", "kv", "manifest", "identity", "_version", "__init__"}
# why a module is longer than ~400 lines
LONG_OK: dict[str, str] = {}


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "cachecard" or len(parts) < 2:
        return None
    top = parts[1]
    if top in BASE:
        return 0
    return FLOORS.get(top)


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path, ast.parse(path.read_text())


def _imports(tree: ast.AST, name: str) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if not node.level else ".".join(name.split(".")[:-node.level] + [node.module])
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


def test_imports_only_go_down():
    bad = []
    for name, path, tree in _modules():
        own = _floor(name)
        if own is None or name.startswith("cachecard.testing") or name == "cachecard":
            continue
        for target, line in _imports(tree, name):
            floor = _floor(target)
            if floor is not None and floor > own and not target.startswith("cachecard.testing"):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    assert not bad, "imports going up a floor:\n" + "\n".join(sorted(set(bad)))


def test_zarr_internals_only_in_the_shim():
    allowed = {"cachecard.card._zarr"}
    core_ok = {"cachecard.codecs.base"}  # zarr's codec ABC signatures use zarr.core.buffer / array_spec types
    bad = []
    for name, path, tree in _modules():
        if name in allowed:
            continue
        for target, line in _imports(tree, name):
            if target.startswith("zarr.core") and name not in core_ok:
                bad.append(f"{path.relative_to(SRC)}:{line} imports {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                src = ast.unparse(node.value)
                if src in ("self", "cls"):
                    continue  # our own private members
                if any(z in src for z in ("sharding", "ZipStore", "_zf")) or node.attr in {
                        "_zf", "_open", "_encode_single", "_encode_shard_dict", "_get_chunk_spec",
                        "_get_chunks_per_shard"}:
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno} uses {src}.{node.attr}")
    assert not bad, "zarr internals outside card/_zarr.py:\n" + "\n".join(bad)


def test_modules_are_small():
    long = [f"{name} ({len(path.read_text().splitlines())} lines)" for name, path, _ in _modules()
            if len(path.read_text().splitlines()) > 450 and name not in LONG_OK]
    assert not long, "modules over ~400 lines without a stated reason (LONG_OK): " + ", ".join(long)


def test_import_cachecard_imports_no_framework():
    code = "import sys, cachecard, cachecard.card, cachecard.kvstore, cachecard.codecs; " \
           "print(sorted(m for m in ('torch', 'mlx', 'llama_cpp', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
