"""``cachecard.frontier``: what storage alone allows (spec/codecs/frontier.md).

Per chunk: optional per-channel centering (keys carry a large per-channel bias, the KIVI/KVQuant
observation), a randomized Hadamard rotation, then two token classes:

- protected tokens (attention sinks, the recent window, the most salient tokens: codecs/tokens.py) keep
  8 bits: int8 codes of the rotated vector with an fp16 absmax scale;
- every other vector gets an 8-bit log-coded RMS and a uniform scalar quantizer of step ``step · rms``
  (entropy-coded scalar quantization), whose integer codes are entropy coded with rANS (the ``constriction``
  package) under the chunk's own histogram. The RMS is quantized first and the coordinates are quantized
  against the quantized RMS, so the scale's rounding costs no accuracy.

Rate is set by ``step`` (one per layer, from ``layer_steps`` when the planner chose them): entropy coding
lets every chunk spend only what its values need.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import constriction
import numpy as np
from pydantic import Field

from cachecard.codecs import _hadamard as hadamard, _tokens as tokens
from cachecard.codecs.base import ChunkContext, CodecConfig, KVCodec, require_power_of_two
from cachecard.errors import KVShapeError, UnsupportedCodecError

if TYPE_CHECKING:
    import torch

VERSION = 1
HEADER = struct.Struct("<BBHff")          # version, flags, reserved, step, ref_rms
SYMBOLS = struct.Struct("<hHI")           # qmin, nsym, nwords (after the counts)
SCALE_STEPS = 16                          # log-scale codes per octave
FRAC = np.asarray([2 ** (j / SCALE_STEPS) for j in range(SCALE_STEPS)], dtype=np.float32)  # spec table
MAX_SYMBOLS = (1 << 16) - 1               # nsym is a uint16; codes with |q| <= 32767 need at most 65535


class FrontierConfig(CodecConfig):
    step: float = Field(gt=0, le=4, description="quantizer step relative to each vector's RMS")
    layer_steps: list[float] | None = Field(default=None, description="per-layer steps (override step)")
    center: bool = Field(description="subtract a per-channel mean over the chunk's unprotected tokens")
    sinks: int = Field(ge=0, le=1 << 20, description="positions < sinks are protected")
    recent: int = Field(ge=0, le=1 << 20, description="the card's last `recent` tokens are protected")
    salient: float = Field(ge=0, le=1, description="fraction of the other tokens protected, by vector norm")
    seed: int = Field(ge=0, lt=2**63)


def rms_from_code(code: np.ndarray, ref: np.float32) -> np.ndarray:
    """Decoded RMS of log-scale codes (0 = zero vector): ref · 2^((code - 255) / 16), exact in float32."""
    e = code.astype(np.int32) - 255
    out = np.ldexp(ref * FRAC[e % SCALE_STEPS], e // SCALE_STEPS).astype(np.float32)
    return np.where(code == 0, np.float32(0), out)


def model_of(counts: np.ndarray) -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(counts.astype(np.float64) / counts.sum(), perfect=False)


class FrontierCodec(KVCodec):
    codec_id = "cachecard.frontier"
    Config = FrontierConfig
    config: FrontierConfig

    def check_config(self) -> None:
        steps = self.config.layer_steps
        if steps is not None and (not steps or any(not 0 < s <= 4 for s in steps)):
            raise UnsupportedCodecError(f"{self.codec_id}: layer_steps must be non-empty, each in (0, 4]")

    def check_head_dim(self, head_dim: int) -> None:
        require_power_of_two(self, head_dim)

    def step_of(self, layer: int) -> float:
        steps = self.config.layer_steps
        if steps is None:
            return self.config.step
        if layer >= len(steps):
            raise KVShapeError(f"{self.codec_id}: layer_steps has {len(steps)} entries; no step for layer {layer}")
        return steps[layer]

    # -- encode ---------------------------------------------------------------------------------------------
    def _prepare(self, x: np.ndarray, ctx: ChunkContext) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(protected-token mask, per-channel mean or None, rotated vectors (G, T, D))."""
        cfg = self.config
        *_, t, d = x.shape
        x = x.reshape(-1, t, d)
        valid = t if ctx.valid_tokens is None else ctx.valid_tokens
        mask = tokens.protected(x, ctx, sinks=cfg.sinks, recent=cfg.recent, salient=cfg.salient)
        mu = None
        z = x
        if cfg.center:
            body = ~mask
            body[valid:] = False
            if not body.any():
                body[:valid] = True
            mu = (x[:, body].mean(axis=1) if body.any() else np.zeros(x.shape[::2], np.float32)).astype("<f2")
            z = x - mu.astype(np.float32)[:, None, :]
            z[:, valid:] = 0
        y = hadamard.forward(z.reshape(-1, d), cfg.seed).reshape(z.shape)
        return mask, mu, y

    def encode_array(self, x: np.ndarray, ctx: ChunkContext) -> bytes:
        mask, mu, y = self._prepare(x, ctx)
        step = np.float32(self.step_of(ctx.layer if ctx.known else 0))
        ecsq, ref = self._encode_ecsq(y[:, ~mask].reshape(-1, y.shape[-1]), step)
        head = HEADER.pack(VERSION, int(mu is not None), 0, float(step), float(ref)) + tokens.pack_mask(mask)
        protected = tokens.encode_protected(y[:, mask].reshape(-1, y.shape[-1]))
        return b"".join([head, b"" if mu is None else mu.tobytes(), protected, ecsq])

    def prepare_estimate(self, x: np.ndarray, ctx: ChunkContext) -> tuple[int, np.ndarray]:
        """What ``estimate_bits`` needs of a chunk: its fixed bytes and its ECSQ vectors in units of their RMS."""
        mask, mu, y = self._prepare(x, ctx)
        rows = y[:, ~mask].reshape(-1, y.shape[-1])
        fixed = HEADER.size + (mask.size + 7) // 8 + (0 if mu is None else mu.nbytes) + SYMBOLS.size
        fixed += y[:, mask].size + 2 * y[:, mask].size // y.shape[-1] + rows.shape[0]
        rms = np.sqrt(np.einsum("nd,nd->n", rows, rows, dtype=np.float32) / np.float32(rows.shape[-1]))
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(rms[:, None] > 0, rows / rms[:, None], 0)
        return fixed, u

    @staticmethod
    def estimate_bits(prepared: tuple[int, np.ndarray], step: float) -> float:
        """Stored bits of a prepared chunk at ``step``, with the entropy of the codes in place of the rANS
        stream (within a few bytes of it): cheap enough for a planner to search steps."""
        fixed, u = prepared
        if not u.size:
            return 8.0 * (fixed + 4)
        q = np.rint(u / np.float32(step)).astype(np.int64)
        counts = np.bincount((q - q.min()).ravel())
        p = counts[counts > 0] / q.size
        return 8.0 * (fixed + 4 * len(counts)) - float(q.size * np.sum(p * np.log2(p)))

    def _encode_ecsq(self, rows: np.ndarray, step: np.float32) -> tuple[bytes, np.float32]:
        n, d = rows.shape
        rms = np.sqrt(np.einsum("nd,nd->n", rows, rows, dtype=np.float32) / np.float32(d))
        ref = np.float32(rms.max()) if n else np.float32(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            code = np.where(rms > 0, np.clip(np.rint(np.log2(rms / ref) * SCALE_STEPS) + 255, 1, 255), 0)
        code = code.astype(np.uint8)
        delta = step * rms_from_code(code, ref)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(delta[:, None] > 0, np.rint(rows / delta[:, None]), 0)
        if q.size and np.abs(q).max() > 32767:
            raise KVShapeError(f"{self.codec_id}: step {step} is too fine for int16 codes; raise it")
        q = q.astype(np.int32).ravel()
        qmin = int(q.min()) if q.size else 0
        sym = q - qmin
        counts = np.bincount(sym, minlength=1).astype(np.uint32) if q.size else np.ones(1, np.uint32)
        if len(counts) > 1:  # one symbol needs no stream (and constriction refuses a one-symbol model)
            coder = constriction.stream.stack.AnsCoder()
            coder.encode_reverse(sym.astype(np.int32), model_of(counts))
            words = coder.get_compressed()
        else:
            words = np.zeros(0, np.uint32)
        out = code.tobytes() + SYMBOLS.pack(qmin, len(counts), len(words)) + counts.tobytes() + words.tobytes()
        return out, ref

    # -- decode ---------------------------------------------------------------------------------------------
    def decode_array(self, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        y, mu = self._decode_rotated(data, shape)
        *_, t, d = shape
        x = hadamard.inverse(y.reshape(-1, d), self.config.seed).reshape(-1, t, d)
        if mu is not None:
            x = x + mu[:, None, :]
        return x.reshape(shape)

    def _decode_rotated(self, data: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        """The rotated vectors (G, T, D) float32 and the per-channel mean (G, D) or None."""
        *_, t, d = shape
        g = int(np.prod(shape[:-2], dtype=np.int64))
        r = _Reader(self, data)
        version, flags, _, step, ref = HEADER.unpack(r.take(HEADER.size))
        if version != VERSION or flags & ~1:
            raise self.payload_error(f"unknown chunk version {version} or flags {flags}")
        mask = tokens.unpack_mask(r.array(np.uint8, (t + 7) // 8), t)
        mu = r.array("<f2", g * d).astype(np.float32).reshape(g, d) if flags & 1 else None
        y = np.zeros((g, t, d), np.float32)
        npro = g * int(mask.sum())
        s = r.array("<f2", npro).astype(np.float32)
        q = r.array(np.int8, npro * d).reshape(npro, d).astype(np.float32)
        y[:, mask] = (q * s[:, None]).reshape(g, -1, d)
        ne = g * (t - int(mask.sum()))
        code = r.array(np.uint8, ne)
        qmin, nsym, nwords = SYMBOLS.unpack(r.take(SYMBOLS.size))
        if not 1 <= nsym <= MAX_SYMBOLS:
            raise self.payload_error(f"symbol table of {nsym} entries")
        counts = r.array("<u4", nsym)
        words = r.array("<u4", nwords)
        r.done()
        if ne:
            if counts.sum() != ne * d:
                raise self.payload_error("symbol counts do not add up to the chunk's coordinates")
            if nsym == 1:
                if nwords:
                    raise self.payload_error("a one-symbol chunk carries an entropy-coded stream")
                sym = np.zeros(ne * d, np.int32)
            else:
                coder = constriction.stream.stack.AnsCoder(words.astype(np.uint32))
                sym = coder.decode(model_of(counts), ne * d)
                if not coder.is_empty():
                    raise self.payload_error("the entropy-coded stream has bytes left over")
            delta = np.float32(step) * rms_from_code(code, np.float32(ref))
            y[:, ~mask] = ((sym.astype(np.int32) + qmin).astype(np.float32).reshape(ne, d)
                           * delta[:, None]).reshape(g, -1, d)
        return y, mu

    def decode_torch(self, data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Entropy decoding runs on the CPU (rANS is sequential); the rotation runs on ``data.device``."""
        import torch

        y, mu = self._decode_rotated(data.cpu().numpy(), shape)
        *_, t, d = shape
        x = hadamard.inverse_torch(torch.from_numpy(y).to(data.device).reshape(-1, d), self.config.seed)
        x = x.reshape(-1, t, d)
        if mu is not None:
            x = x + torch.from_numpy(mu).to(data.device)[:, None, :]
        return x.reshape(shape)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        # Each rotated coordinate is off by at most min(|y_i|, step·rms_q/2), so the vector error is at most
        # ||z|| (z = x minus the chunk mean, ||mean|| <= the largest vector norm of the chunk).
        *_, t, d = x.shape
        v = x.reshape(-1, t, d).astype(np.float64)
        norms = np.sqrt((v**2).sum(-1, keepdims=True))
        m = norms.max(axis=1, keepdims=True) if self.config.center else 0
        return np.broadcast_to((norms + m) * (1 + 2.0**-8) + 1e-30, v.shape).reshape(x.shape).astype(np.float32)


class _Reader:
    """Bounds-checked sequential reads of a chunk payload."""

    def __init__(self, codec: KVCodec, data: np.ndarray) -> None:
        self.codec, self.data, self.pos = codec, np.asarray(data, np.uint8), 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.data.size:
            raise self.codec.payload_error(f"payload ends at byte {self.data.size}, needed {self.pos + n}")
        out = self.data[self.pos:self.pos + n].tobytes()
        self.pos += n
        return out

    def array(self, dtype: str | type, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        return np.frombuffer(self.take(count * dt.itemsize), dtype=dt)

    def done(self) -> None:
        if self.pos != self.data.size:
            raise self.codec.payload_error(f"{self.data.size - self.pos} bytes left over after the chunk")
