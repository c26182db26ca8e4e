"""Read a card straight into per-layer torch tensors on a device (the restore path of torch runtimes).

- Lossless cards go through the reader's fast path into one host array that torch shares without a copy,
  then one (pinned) copy to the device.
- Cards of a block codec whose payloads concatenate (``q8_0``, ``q4_0``, ``q4_1``: no header, blocks along
  head_dim) are read undecoded, CRC-checked by parallel workers into one staging buffer, copied to the device
  once and decoded there by the codec's ``decode_torch`` in a single call per K and V. A quantized card thus
  moves a quarter to a half of the bytes of fp16 and decodes at device speed.
- Anything else decodes on the host (numpy) and is copied.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from cachecard.kvstore.reader import Card

Layers = list[tuple[torch.Tensor, torch.Tensor]]
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Codecs whose chunk payloads are pure blocks of head_dim elements: N payloads back to back decode as one.
CONCATENABLE = {"cachecard.q8_0", "cachecard.q4_0", "cachecard.q4_1"}


def read_layers(card: Card, tokens: int, *, device: str | torch.device, dtype: torch.dtype) -> Layers:
    """K and V of the first ``tokens`` tokens, one ``(1, heads, tokens, head_dim)`` pair per layer."""
    device = torch.device(device)
    if tokens and all(getattr(c, "codec_id", None) in CONCATENABLE for c in _serializers(card)):
        k, v = (_decode_on_device(card, which, tokens, device, dtype) for which in ("k", "v"))
    else:
        kv = card.read(tokens=tokens)
        k, v = (_to_device(_host(a), device, dtype) for a in (kv.k, kv.v))
    return [(k[i:i + 1], v[i:i + 1]) for i in range(k.shape[0])]


def _serializers(card: Card) -> list[object]:
    from cachecard.kvstore import fastread

    if card.format == "1.0":
        return []
    return [fastread.encoded_serializer(card._stacked(which)) for which in ("k", "v")]


def _decode_on_device(card: Card, which: str, tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    pinned = device.type == "cuda"
    staging: list[torch.Tensor] = []

    def alloc(n: int) -> np.ndarray:
        staging.append(torch.empty(n, dtype=torch.uint8, pin_memory=pinned))
        return staging[-1].numpy()

    enc = card.read_encoded(which, tokens=tokens, alloc=alloc)
    _, heads, c, dim = enc.chunk_shape
    layers = card.manifest.model.num_layers
    per_layer = len(enc.chunks) // layers
    data = staging[0].to(device, non_blocking=True)
    x = enc.codec.decode_torch(data, (layers * per_layer, heads, c, dim))
    x = x.view(layers, per_layer, heads, c, dim).transpose(1, 2).reshape(layers, heads, per_layer * c, dim)
    storage = _TORCH_DTYPES[card.manifest.model.kv_dtype]  # round as the host decoder does: same values
    return x[:, :, :tokens].to(storage).to(dtype)


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device=device, dtype=dtype, non_blocking=True)


def _host(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
