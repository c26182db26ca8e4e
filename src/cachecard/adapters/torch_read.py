"""Read a card straight into torch tensors on a device: the restore path of torch runtimes (spec §10).

- To a GPU, a local card streams (:mod:`cachecard.card.stream`): each array's chunks are read by parallel
  workers in a few large pieces into pinned memory, every piece is copied to the device as soon as it lands
  (the copies overlap the reads); the device checks every chunk's crc32c (:mod:`cachecard.adapters.device_crc`)
  while one fused kernel (:mod:`cachecard.adapters.device_decode`) decodes, casts and lays out every chunk into
  the destination. Nothing is returned before every checksum has passed.
- On a CPU, the reader's fast path decodes straight into the destination (no copy for lossless cards).
- Anything else (remote or zip cards, compressed chunks, codecs without a device decoder) decodes on the host.

``into=(keys, values)`` fills preallocated ``[layers, heads, >= tokens, head_dim]`` tensors (a static
cache's buffers); otherwise the tensors are allocated here.
"""

from __future__ import annotations

import contextlib
import time

import ml_dtypes
import numpy as np
import torch

from cachecard.adapters import device_crc, device_decode
from cachecard.card import stream
from cachecard.card.reader import Card, ShardLayout
from cachecard.errors import UnsupportedCodecError

Layers = list[tuple[torch.Tensor, torch.Tensor]]
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_layers(card: Card, tokens: int, *, device: str | torch.device, dtype: torch.dtype,
                via_torch: bool | None = None) -> Layers:
    """K and V of the first ``tokens`` tokens, one ``(1, heads, tokens, head_dim)`` pair per layer (views of
    two ``[layers, heads, tokens, head_dim]`` tensors).

    ``via_torch`` forces (True) or forbids (False) the streamed, device-decoded path; by default it is taken
    for CUDA devices and local cards whose codec has a device decoder."""
    k, v = read_kv(card, tokens, device=device, dtype=dtype, via_torch=via_torch)
    return [(k[i:i + 1], v[i:i + 1]) for i in range(k.shape[0])]


def read_kv(card: Card, tokens: int, *, device: str | torch.device, dtype: torch.dtype,
            via_torch: bool | None = None, into: tuple[torch.Tensor, torch.Tensor] | None = None,
            direct: bool = False, timings: dict[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first ``tokens`` tokens as ``[layers, heads, tokens, head_dim]`` tensors (or written into
    ``into``, returned as views of it). ``direct`` reads cold cards with O_DIRECT on the streamed path;
    ``timings`` (a dict) receives the streamed path's phases in seconds (plan, read, device) for benchmarks."""
    device = torch.device(device)
    m = card.manifest.model
    if not 0 <= tokens <= card.manifest.tokens.count:
        raise IndexError(f"card {card.label} holds {card.manifest.tokens.count} tokens; cannot read {tokens}")
    layouts = _streamable(card) if tokens and via_torch is not False else None
    streamed = layouts is not None and (bool(via_torch) or device.type == "cuda")
    if into is None and not streamed:  # host decode: the reader's arrays are the tensors (no copy on a CPU)
        kv = card.read(tokens=tokens)
        return tuple(_host(a).to(device=device, dtype=dtype, non_blocking=True) for a in (kv.k, kv.v))
    if into is not None:
        k_out, v_out = into
        want = (m.num_layers, m.num_kv_heads, m.head_dim)
        for t in into:
            if (t.shape[0], t.shape[1], t.shape[3]) != want or t.shape[2] < tokens:
                raise ValueError(f"into tensors must be [layers, heads, >= {tokens}, head_dim] = {want}; got "
                                 f"{tuple(t.shape)}")
        device, dtype = k_out.device, k_out.dtype
    else:
        shape = (m.num_layers, m.num_kv_heads, tokens, m.head_dim)
        k_out = torch.empty(shape, dtype=dtype, device=device)
        v_out = torch.empty(shape, dtype=dtype, device=device)
    if streamed:
        _stream(card, layouts, tokens, (k_out, v_out), direct, timings)
    elif tokens and k_out.device.type == "cpu" and k_out.dtype == _TORCH_DTYPES[m.kv_dtype]:
        card.read(tokens=tokens, out=(_numpy(k_out[:, :, :tokens]), _numpy(v_out[:, :, :tokens])))  # in place
    elif tokens:
        kv = card.read(tokens=tokens)
        for arr, out in ((kv.k, k_out), (kv.v, v_out)):
            out[:, :, :tokens].copy_(_host(arr), non_blocking=True)
    return k_out[:, :, :tokens], v_out[:, :, :tokens]


def _streamable(card: Card) -> tuple[ShardLayout, ShardLayout] | None:
    """K and V layouts when both can be streamed and decoded on a device, else None."""
    try:
        layouts = (card.shard_layout("k"), card.shard_layout("v"))
    except UnsupportedCodecError:  # compressed chunks or a format 1.0 card
        return None
    ok = all(stream.local_path(lay) is not None and device_decode.kind_of(lay.serializer, lay.storage)
             for lay in layouts)
    return layouts if ok else None


def _stream(card: Card, layouts: tuple[ShardLayout, ShardLayout], tokens: int,
            outs: tuple[torch.Tensor, torch.Tensor], direct: bool, timings: dict[str, float] | None) -> None:
    t0 = time.perf_counter()
    layers = range(card.manifest.model.num_layers)
    cuda = outs[0].device.type == "cuda"
    copy_stream = torch.cuda.Stream(outs[0].device) if cuda else None
    staged = []
    for lay in layouts:  # plan and check both arrays before reading anything
        table = stream.chunk_table(lay, layers, tokens)
        kind = device_decode.kind_of(lay.serializer, lay.storage)
        device_decode.check_payloads(table, int(np.prod(lay.chunk_shape)), kind, lay.label, lay.which)
        staged.append((lay, table))
    t1 = time.perf_counter()
    jobs, raws = [], []
    for lay, table in staged:
        host = torch.empty(table.length, dtype=torch.uint8, pin_memory=cuda)
        dev = torch.empty(table.length, dtype=torch.uint8, device=outs[0].device) if cuda else host

        def copy(a: int, b: int, dev: torch.Tensor = dev, host: torch.Tensor = host) -> None:
            dev[a:b].copy_(host[a:b], non_blocking=True)  # overlaps the reads still going on

        jobs.append(stream.Job(lay, table, host.numpy(), copy if cuda else None))
        raws.append(dev)
    # K and V read by one pool. On a CPU each worker checks the chunks it read; on a GPU the device checks
    # them after the copies (a host core manages a few GB/s of crc32c), while it decodes.
    with torch.cuda.stream(copy_stream) if cuda else contextlib.nullcontext():
        stream.read_spans(jobs, direct=direct, verify=not cuda)
    t2 = time.perf_counter()
    crcs = []
    if cuda:
        torch.cuda.current_stream(outs[0].device).wait_stream(copy_stream)
        crcs = [device_crc.crc32c_chunks(raw, table.payload_offsets(), table.nbytes - 4)
                for (_, table), raw in zip(staged, raws)]
    for (lay, table), raw, out, job in zip(staged, raws, outs, jobs):
        device_decode.decode_chunks(raw, table, lay.serializer, lay.storage, out, lay.chunk_shape, tokens,
                                    host=job.dest, label=lay.label, which=lay.which)
    for (lay, table), job, crc in zip(staged, jobs, crcs):  # waits for the device: nothing returns unchecked
        stream.check_crcs(lay, table, job.dest, crc.cpu().numpy().view(np.uint32))
    if timings is not None:
        if cuda:
            torch.cuda.synchronize(outs[0].device)
        timings.update(plan=t1 - t0, read=t2 - t1, device=time.perf_counter() - t2)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (bfloat16 through its bits)."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _host(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


__all__ = ["Layers", "read_kv", "read_layers"]
