"""The identity a transformers model's cards bind to (spec/cachecard-1.md §6 identity): a hash of its weights
and tokenizer, or the GGUF file it was loaded from; remembered per model. Re-exported by
:mod:`cachecard.adapters.hf`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cachecard.adapters._common import missing_extra

try:
    from transformers import PreTrainedModel
except ImportError as e:
    raise missing_extra("hf", e) from e

from cachecard.adapters._common import Identities, check_gguf_shapes, deprecated_positional
from cachecard.errors import IdentityMismatchError, MissingIdentityError
from cachecard.identity import gguf_identity, tensors_hash, tokenizer_hash
from cachecard.kv import as_numpy
from cachecard.manifest import LayerKind, ModelIdentity, Rope

_IDENTITIES = Identities()


def weights_hash(model: PreTrainedModel) -> str:
    """Scheme ``sha256`` (spec §6) over every parameter and buffer of the state_dict."""
    return tensors_hash((name, as_numpy(t)) for name, t in model.state_dict().items())


def model_identity(model: PreTrainedModel, *args: object, tokenizer: object | None = None,
                   gguf: str | os.PathLike[str] | None = None, name: str | None = None,
                   kv_dtype: str | None = None) -> ModelIdentity:
    """The identity a card of this model binds to (spec §6).

    With ``gguf`` (the file the model was loaded from), the identity is the file's
    (:func:`cachecard.identity.gguf_identity`), shared by every runtime that loads that file; its shapes are
    checked against the model. Otherwise weights and ``tokenizer`` are hashed here (scheme ``sha256``), which
    takes about a second per GB of weights; such cards restore only into transformers with these weights.
    """
    if args:  # tokenizer was positional before 0.2
        deprecated_positional("hf.model_identity", "the tokenizer", "tokenizer=tok")
        tokenizer = args[0]
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = kv_dtype or str(model.dtype).removeprefix("torch.")
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    kinds = tuple(LayerKind(attention="sliding", window=window) if t == "sliding_attention" else LayerKind()
                  for t in layer_types)
    if gguf is not None:
        ident = gguf_identity(gguf, kv_dtype=dtype, name=name)
        check_gguf_shapes({"architecture": cfg.model_type, "num_layers": cfg.num_hidden_layers,
                           "num_kv_heads": cfg.num_key_value_heads, "head_dim": head_dim, "layer_kinds": kinds},
                          ident, gguf)
        return ident
    if tokenizer is None:
        raise MissingIdentityError("model_identity needs tokenizer= (its hash is part of the identity), or "
                                   "gguf=, the file the model was loaded from")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = float(rope.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    partial = float(rope.pop("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)))
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    return ModelIdentity(
        name=name or getattr(cfg, "name_or_path", None) or None, architecture=cfg.model_type,
        num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
        layer_kinds=kinds, rope=Rope(theta=theta, rotary_dim=int(head_dim * partial), scaling=scaling),
        kv_dtype=dtype, weights_hash=weights_hash(model), tokenizer_hash=tokenizer_hash(tokenizer),
    )


def source_gguf(model: PreTrainedModel) -> str | None:
    """The GGUF file a model was loaded from (``from_pretrained(folder, gguf_file=...)``), when it can be
    told: transformers records that the weights came from a GGUF and the folder, not the file name, so the
    folder must hold one GGUF file whose shapes are the model's."""
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        return None
    source = Path(str(getattr(model.config, "name_or_path", "") or ""))
    candidates = [source] if source.suffix == ".gguf" else sorted(source.glob("*.gguf")) if source.is_dir() else []
    fitting = []
    for path in candidates:
        try:
            model_identity(model, gguf=path)
        except (IdentityMismatchError, ValueError, OSError):
            continue
        fitting.append(str(path))
    return fitting[0] if len(fitting) == 1 else None


def bind(model: PreTrainedModel, identity: ModelIdentity) -> ModelIdentity:
    """Remember ``identity`` as ``model``'s, so :func:`restore` checks cards against it without rehashing."""
    return _IDENTITIES.put(model, identity)


def identity_of(model: PreTrainedModel, *, tokenizer: object | None = None,
                gguf: str | os.PathLike[str] | None = None) -> ModelIdentity:
    """The identity remembered for ``model`` (:func:`bind`, or found before), else the one found now and
    remembered: the GGUF file's when ``gguf`` is given or the model was loaded from a GGUF file
    (:func:`source_gguf`), else a hash of the weights and ``tokenizer``. MissingIdentityError (a TypeError)
    says what to pass when none can be found."""
    def derive() -> ModelIdentity | None:
        path = gguf or source_gguf(model)
        if path is not None:
            return model_identity(model, gguf=path)
        return model_identity(model, tokenizer=tokenizer) if tokenizer is not None else None

    return _IDENTITIES.of(model, derive, module="hf")
