"""Read a card straight into per-layer torch tensors on a device (the restore path of torch runtimes).

- Lossless cards go, on the CPU, through the reader's fast path into one host array that torch shares
  without a copy; to a GPU, they are read into pinned memory and copied once.
- For a GPU, cards of a block codec whose payloads concatenate (``q8_0``, ``q4_0``, ``q4_1``: no header,
  blocks along head_dim) are read undecoded, CRC-checked by parallel workers into one staging buffer, copied
  to the device once and decoded there by the codec's ``decode_torch`` in a single call per K and V. A
  quantized card thus moves a quarter to a half of the bytes of fp16 and decodes at device speed.
- Anything else decodes on the host (numpy) and is copied.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import torch
from zarr.codecs import BytesCodec

from cachecard.errors import CacheCardError, CorruptCardError, UnsupportedCodecError
from cachecard.card.reader import Card

Layers = list[tuple[torch.Tensor, torch.Tensor]]
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Codecs whose chunk payloads are pure blocks of head_dim elements: N payloads back to back decode as one.
CONCATENABLE = {"cachecard.q8_0", "cachecard.q4_0", "cachecard.q4_1"}


def read_layers(card: Card, tokens: int, *, device: str | torch.device, dtype: torch.dtype,
                via_torch: bool | None = None) -> Layers:
    """K and V of the first ``tokens`` tokens, one ``(1, heads, tokens, head_dim)`` pair per layer.

    ``via_torch`` picks the undecoded read + torch decode path; by default it is taken for CUDA only (on a
    CPU, the reader's parallel numpy decode into the final array is faster than torch's extra passes)."""
    device = torch.device(device)
    if not 0 <= tokens <= card.manifest.tokens.count:
        raise IndexError(f"card {card.label} holds {card.manifest.tokens.count} tokens; cannot read {tokens}")
    serializers = _serializers(card)
    blocks = bool(serializers) and all(getattr(c, "codec_id", None) in CONCATENABLE for c in serializers)
    # Plain (lossless) bytes go the same way to a GPU: read into pinned memory, one copy, no extra host pass.
    plain = bool(serializers) and all(isinstance(c, BytesCodec) for c in serializers)
    if via_torch is None:
        via_torch = device.type == "cuda"
    if tokens and via_torch and (blocks or plain):
        with ThreadPoolExecutor(1) as pool:  # read V while K is copied and decoded
            v_future = pool.submit(_decode_on_device, card, "v", tokens, device, dtype)
            k = _decode_on_device(card, "k", tokens, device, dtype)
            v = v_future.result()
    else:
        kv = card.read(tokens=tokens)
        k, v = (_to_device(_host(a), device, dtype) for a in (kv.k, kv.v))
    return [(k[i:i + 1], v[i:i + 1]) for i in range(k.shape[0])]


def _serializers(card: Card) -> list[object]:
    """The K and V serializers when both arrays can be read undecoded, else ``[]``."""
    try:
        return [card.read_encoded(which, layers=range(0)).codec for which in ("k", "v")]
    except UnsupportedCodecError:  # compressed chunks or a format 1.0 card
        return []


def _decode_on_device(card: Card, which: str, tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    staging: list[torch.Tensor] = []

    def alloc(n: int) -> np.ndarray:
        # Pinned for a GPU: PyTorch's host allocator caches freed pinned blocks and keeps one alive until the
        # copy out of it is done, so repeated restores neither pay the pinning nor race on a shared buffer.
        staging.append(torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda"))
        return staging[-1].numpy()

    enc = card.read_encoded(which, tokens=tokens, alloc=alloc)
    _, heads, c, dim = enc.chunk_shape
    layers = card.manifest.model.num_layers
    per_layer = len(enc.chunks) // layers
    storage = _TORCH_DTYPES[card.manifest.model.kv_dtype]
    sizes = {ch.payload.nbytes for ch in enc.chunks}
    plain = isinstance(enc.codec, BytesCodec)
    want = heads * c * dim * storage.itemsize if plain else None
    if len(sizes) != 1 or (want is not None and sizes != {want}) or per_layer * layers != len(enc.chunks):
        raise CorruptCardError(f"the {which!r} chunks hold {sorted(sizes)} bytes each (expected one size"
                               + (f", {want}" if want else "") + "); the card is damaged: delete it and save again",
                               card=card.label, part=which)
    data = staging[0].to(device, non_blocking=True)
    shape = (layers * per_layer, heads, c, dim)
    try:
        x = data.view(storage).view(shape) if plain else enc.codec.decode_torch(data, shape).to(storage)
    except (ValueError, RuntimeError, CacheCardError) as e:  # a payload size the codec does not accept
        raise CorruptCardError(f"the {which!r} chunks do not decode ({e}); the card is damaged: delete it and "
                               "save it again", card=card.label, part=which) from e
    x = x.view(layers, per_layer, heads, c, dim).transpose(1, 2).reshape(layers, heads, per_layer * c, dim)
    return x[:, :, :tokens].to(dtype).contiguous()  # contiguous: do not keep the padded rows alive


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device=device, dtype=dtype, non_blocking=True)


def _host(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
