"""mlx-lm prompt-cache files (``mlx_lm.models.cache.save_prompt_cache``) from a card and back into one
(spec/cachecard-1.md §6 identity: the card's identity travels in the file's metadata). Re-exported by
:mod:`cachecard.adapters.mlx`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from cachecard.adapters._common import missing_extra

try:
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache
except ImportError as e:
    raise missing_extra("mlx", e) from e

from cachecard.adapters._common import open_if_location
from cachecard.adapters.mlx_cache import RUNTIME, cache_from_card, to_canonical
from cachecard.card.locations import Location
from cachecard.card.reader import Card
from cachecard.card.writer import write_card
from cachecard.identity import check_identity
from cachecard.kv import token_ids
from cachecard.manifest import CardManifest, ModelIdentity

# keys this adapter adds to a prompt-cache file's metadata (mlx-lm metadata is str -> str, and a "." in a key
# nests it on load: mlx's tree_unflatten splits there)
META_IDENTITY = "cachecard_identity"   # the card's ModelIdentity as JSON
META_TOKENS = "cachecard_tokens"       # the token ids as a JSON list (mlx-lm files do not record them)
META_CARD_ID = "cachecard_card_id"
_OWN_KEYS = (META_IDENTITY, META_TOKENS, META_CARD_ID)


def _safetensors_path(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if not p.endswith(".safetensors"):  # mx.save_safetensors would append the suffix and write elsewhere
        raise ValueError(f"mlx-lm prompt-cache files end in .safetensors; got {p!r}")
    return p


def export_prompt_cache(card: Card | Location, path: str | os.PathLike[str], *,
                        metadata: dict[str, str] | None = None, quantized: tuple[int, int] | None = None) -> None:
    """Write the card as an mlx-lm prompt-cache file (``mlx_lm.models.cache.save_prompt_cache``), loadable
    with ``load_prompt_cache``. ``metadata`` (str to str, e.g. mlx-lm's ``model`` and ``chat_template``) is
    written as given, plus the card's identity, token ids and id under ``cachecard_*`` keys so the file can
    come back as a card. ``quantized=(group_size, bits)`` writes ``QuantizedKVCache`` state (directly from
    ``cachecard.mlx_affine`` cards of that configuration)."""
    card = open_if_location(card)
    meta = dict(metadata or {})
    bad = {k: v for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"prompt-cache metadata maps str to str; got {bad!r}")
    dotted = sorted(k for k in meta if "." in k)
    if dotted:
        raise ValueError(f"metadata keys {dotted} hold a '.', which mlx-lm's load_prompt_cache turns into nested "
                         "dicts; use keys without dots")
    clash = sorted(set(meta) & set(_OWN_KEYS))
    if clash:
        raise ValueError(f"metadata keys {clash} are written by export_prompt_cache itself; remove them")
    meta[META_IDENTITY] = card.manifest.model.model_dump_json()
    meta[META_TOKENS] = json.dumps(card.token_ids().tolist())
    meta[META_CARD_ID] = card.manifest.card_id
    save_prompt_cache(_safetensors_path(path), cache_from_card(card, quantized=quantized), meta)


def import_prompt_cache(path: str | os.PathLike[str], location: Location, identity: ModelIdentity, *,
                        tokens: Sequence[int] | np.ndarray | None = None,
                        **write_kwargs: Any) -> tuple[CardManifest, dict[str, str]]:
    """Write an mlx-lm prompt-cache file as a card; returns the card's manifest and the file's metadata
    (without this adapter's ``cachecard_*`` keys).

    ``identity`` is the model's (:func:`model_identity`); when the file was exported from a card, the
    identity recorded in it must match. mlx-lm's own files do not record token ids: pass ``tokens`` then.
    A ``QuantizedKVCache`` file is dequantized (the card holds float KV; write it with a codec preset, e.g.
    ``codec="q4"``, to store it quantized again). ``write_kwargs`` go to ``cachecard.write_card``.
    """
    cache, metadata = load_prompt_cache(_safetensors_path(path), return_metadata=True)
    metadata = dict(metadata)
    if META_IDENTITY in metadata:
        recorded = ModelIdentity.model_validate_json(metadata[META_IDENTITY])
        check_identity(recorded, identity, what=f"prompt-cache file {os.fspath(path)!r}")
    if tokens is None:
        if META_TOKENS not in metadata:
            raise ValueError(f"{os.fspath(path)!r} does not record its token ids (mlx-lm files do not); pass "
                             "tokens= with the ids the cache was computed from")
        tokens = json.loads(metadata[META_TOKENS])
    kv = to_canonical(cache)
    write_kwargs.setdefault("runtime", RUNTIME)
    manifest = write_card(location, kv, token_ids(tokens), identity.model_copy(update={"kv_dtype": kv.dtype}),
                          **write_kwargs)
    return manifest, {k: v for k, v in metadata.items() if k not in _OWN_KEYS}
