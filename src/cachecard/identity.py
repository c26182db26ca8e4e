"""Model identity shared by every runtime (spec/cachecard-1.md §6): the GGUF identity scheme and the
restore check.

One set of weights runs in transformers, MLX and llama.cpp with different in-memory tensors (HF dequantizes
a GGUF, llama.cpp keeps it quantized, names and Q/K row orders differ), so hashing a runtime's tensors
cannot give one identity for all three. A model that comes from a GGUF file is therefore identified by the
file itself: architecture and shapes from its metadata, ``gguf-sha256`` hashes of its tensors and of its
tokenizer metadata. Every adapter takes ``gguf=`` and gives the same identity for the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import rfc8785

from cachecard.errors import IdentityMismatchError
from cachecard.manifest import LayerKind, ModelIdentity, Rope

SCHEME = "gguf-sha256"


# -- scheme "sha256": a runtime's own tensors and tokenizer.json (spec §6) ---------------------------------------
def tensors_hash(named: Iterable[tuple[str, np.ndarray]]) -> str:
    """``sha256:`` over named arrays in name order: ``"<name>|<numpy dtype>|<shape tuple>\n"`` then the raw
    little-endian bytes. Adapters feed their runtime's parameters (transformers' state_dict, mlx-lm's
    parameter tree)."""
    h = hashlib.sha256()
    for name, a in sorted(named, key=lambda item: item[0]):
        h.update(f"{name}|{a.dtype}|{a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
    return "sha256:" + h.hexdigest()


def tokenizer_hash(tokenizer: object) -> str:
    """``sha256:`` of a fast tokenizer's tokenizer.json as RFC 8785 canonical JSON, so any language can
    reproduce it. Takes an HF fast tokenizer, mlx-lm's ``TokenizerWrapper``, a ``tokenizers.Tokenizer`` or the
    path of a tokenizer.json."""
    if isinstance(tokenizer, (str, os.PathLike)):
        spec = json.loads(Path(tokenizer).read_text(encoding="utf-8"))
    else:
        inner = getattr(tokenizer, "_tokenizer", tokenizer)       # mlx-lm's TokenizerWrapper
        backend = getattr(inner, "backend_tokenizer", inner)      # an HF fast tokenizer
        if not hasattr(backend, "to_str"):
            raise TypeError(f"need a fast (tokenizers-backed) tokenizer or a tokenizer.json path to compute the "
                            f"tokenizer hash; got {type(tokenizer).__name__}")
        spec = json.loads(backend.to_str())
    return "sha256:" + hashlib.sha256(rfc8785.dumps(spec)).hexdigest()


def check_identity(card: ModelIdentity, runtime: ModelIdentity, *, what: str = "the card",
                   allow: frozenset[str] | set[str] = frozenset()) -> None:
    """Raise :class:`IdentityMismatchError` naming every differing field, unless it is in ``allow``.

    ``kv_dtype`` never blocks a restore (spec §6): it records the card's element type, and a restore
    converts to the runtime's KV type."""
    diffs = [d for d in card.mismatches(runtime) if d.split(":")[0] not in {"kv_dtype", *allow}]
    if diffs:
        raise IdentityMismatchError(f"{what} was made by another model: " + "; ".join(diffs)
                                    + ". Restore it into the model it was made with, or pass allow={...} "
                                      "naming the fields to ignore if you know they do not matter.")


def gguf_identity(path: str | os.PathLike[str], *, kv_dtype: str, name: str | None = None) -> ModelIdentity:
    """The identity of the model in a GGUF file, with ``kv_dtype`` the element type its KV is stored in."""
    ident = _gguf_identity(str(Path(path).resolve()), *_stamp(path))
    return ident.model_copy(update={"kv_dtype": kv_dtype, "name": name or ident.name})


def _stamp(path: str | os.PathLike[str]) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@lru_cache(maxsize=8)
def _gguf_identity(path: str, _size: int, _mtime: int) -> ModelIdentity:
    import gguf  # optional dependency: the hf and llamacpp extras carry it

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:  # gguf raises ValueError for a bad magic or a truncated file
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from e
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{path} has no general.architecture; cannot identify the model")

    def get(key: str, default: object = None) -> object:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path} lacks metadata key {arch}.{key}; cannot identify the model")
        return value

    layers = int(get("block_count"))
    heads = int(get("attention.head_count"))
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer head counts (hybrid models): not one cache shape
        raise ValueError(f"{path}: per-layer KV head counts are not supported")
    head_dim = int(meta.get(f"{arch}.attention.key_length") or int(get("embedding_length")) // heads)
    window = meta.get(f"{arch}.attention.sliding_window")
    scaling = {k.removeprefix(f"{arch}.rope.scaling."): v for k, v in meta.items()
               if k.startswith(f"{arch}.rope.scaling.")} or None
    tokenizer = {k: v for k, v in meta.items() if k.startswith("tokenizer.ggml.")}
    return ModelIdentity(
        name=meta.get("general.name"), architecture=arch, num_layers=layers, num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        layer_kinds=(LayerKind(attention="sliding", window=int(window)) if window else LayerKind(),) * layers,
        rope=Rope(theta=float(get("rope.freq_base", 10000.0)), rotary_dim=int(get("rope.dimension_count", head_dim)),
                  scaling=scaling),
        kv_dtype="float16", weights_hash=f"{SCHEME}:{_tensors_hash(reader)}",
        tokenizer_hash=f"{SCHEME}:{hashlib.sha256(rfc8785.dumps(tokenizer)).hexdigest()}",
    )


def _tensors_hash(reader: object) -> str:
    """SHA-256 over tensors in name order: ``"<name>|<ggml type>|<shape>\\n"`` then the stored bytes."""
    h = hashlib.sha256()
    for t in sorted(reader.tensors, key=lambda t: t.name):
        shape = "x".join(str(int(d)) for d in t.shape)
        h.update(f"{t.name}|{t.tensor_type.name}|{shape}\n".encode())
        h.update(memoryview(t.data).cast("B"))
    return h.hexdigest()
