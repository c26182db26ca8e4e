"""The verbs every runtime adapter offers, with the same names and keyword arguments (spec/cachecard-1.md §6).

``cachecard.adapters.hf`` (transformers), ``.mlx`` (mlx-lm) and ``.llamacpp`` (llama-cpp-python) are modules
that satisfy :class:`RuntimeAdapter` (a module can implement a protocol, PEP 544), as safetensors' torch,
numpy and mlx modules share ``save_file`` / ``load_file``. What "model" and "cache" are depends on the
runtime:

============  ==============================  ========================================================
adapter       model                           cache
============  ==============================  ========================================================
``hf``        a transformers causal LM        a ``DynamicCache``
``mlx``       an mlx-lm model                 a prompt cache (one ``KVCache`` / ``QuantizedKVCache`` per layer)
``llamacpp``  a ``llama_cpp.Llama``           the Llama itself (its sequence 0) or a sequence id
============  ==============================  ========================================================

Importing this module imports no framework.
"""

from __future__ import annotations

import os
from typing import AbstractSet, Any, Protocol, runtime_checkable

import numpy as np

from cachecard.card.locations import Location
from cachecard.card.reader import Card
from cachecard.kv import CanonicalKV
from cachecard.kvstore.store import Store
from cachecard.manifest import ModelIdentity

# The verbs of the contract, in the order the guide pages present them.
VERBS = ("save", "load", "restore", "capture", "model_identity", "identity_of", "bind", "to_canonical",
         "from_canonical")


@runtime_checkable
class RuntimeAdapter(Protocol):
    """One runtime's adapter module. Every runtime restores any card made by the same weights."""

    RUNTIME: str
    """The runtime and its version, recorded in the cards this adapter writes (``producer.runtime``)."""

    def save(self, where: Store | Location, model: Any, cache: Any, input_ids: Any, *, codec: Any = "lossless",
             agent: str | None = None, identity: ModelIdentity | None = None, tokenizer: Any = None,
             gguf: str | os.PathLike[str] | None = None, **write_kwargs: Any) -> str:
        """Save ``cache`` (computed from ``input_ids``: a list, an array or a ``(1, T)`` tensor) as a card at
        a location, or into a :class:`cachecard.Store` for ``agent``; return the card id."""

    def load(self, where: Store | Card | Location, model: Any, input_ids: Any = None, *, agent: str | None = None,
             identity: ModelIdentity | None = None, allow: AbstractSet[str] = frozenset(), tokenizer: Any = None,
             gguf: str | os.PathLike[str] | None = None) -> Any:
        """A cache for ``model`` ready for the runtime's generate: from a card (the whole card, or the part
        ``input_ids`` can reuse) or from a store (the longest cached prefix of ``input_ids``)."""

    def restore(self, card: Card | Location, model: Any, *, input_ids: Any = None, tokens: int | None = None,
                identity: ModelIdentity | None = None, allow: AbstractSet[str] = frozenset()) -> Any:
        """Restore one card (a :class:`cachecard.Card` or its location) into a cache for ``model``, after
        checking the card was made by this model (``identity``; fields named in ``allow`` are not checked)."""

    def capture(self, model: Any, cache: Any, input_ids: Any) -> tuple[CanonicalKV, np.ndarray]:
        """The cache's canonical KV and the token ids it holds."""

    def model_identity(self, model: Any, *, tokenizer: Any = None, gguf: str | os.PathLike[str] | None = None,
                       name: str | None = None, kv_dtype: str | None = None) -> ModelIdentity:
        """The identity a card of ``model`` binds to: the GGUF file's with ``gguf`` (the same in every
        runtime), else a hash of the runtime's weights and of ``tokenizer``."""

    def identity_of(self, model: Any, *, tokenizer: Any = None,
                    gguf: str | os.PathLike[str] | None = None) -> ModelIdentity:
        """The identity remembered for ``model``, or the one found for it (the GGUF it was loaded from when
        the runtime knows it, else ``gguf`` / ``tokenizer``), remembered for next time."""

    def bind(self, model: Any, identity: ModelIdentity) -> ModelIdentity:
        """Remember ``identity`` as ``model``'s."""

    def to_canonical(self, cache: Any) -> CanonicalKV:
        """The runtime's cache (one sequence) as canonical KV."""

    def from_canonical(self, kv: CanonicalKV) -> Any:
        """Canonical KV in the runtime's cache form."""


__all__ = ["RuntimeAdapter", "VERBS"]
