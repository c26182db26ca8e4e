"""Writes spec/vectors/codecs/ — once per case. Existing cases are never rewritten (write-once, like numcodecs'
fixtures); run with CACHECARD_REGEN_VECTORS=1 (``make vectors``) to add the cases of tests/codec_cases.py
that do not exist yet. Each case: case.json (codec and context), input.npy, encoded.bin, decoded.npy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cachecard.codecs import CODECS  # noqa: E402
from cachecard.codecs.base import NO_CONTEXT, ChunkContext  # noqa: E402
from cachecard.testing.codec_cases import VECTORS  # noqa: E402
from cachecard.testing.codec_data import kv_like, stored  # noqa: E402

OUT = Path(__file__).parent.parent / "spec" / "vectors" / "codecs"


def main() -> None:
    if os.environ.get("CACHECARD_REGEN_VECTORS") != "1":
        raise SystemExit("set CACHECARD_REGEN_VECTORS=1 to add missing golden vectors")
    for name, cid, cfg, dtype, shape, seed, ctx in VECTORS:
        folder = OUT / name
        if folder.exists():
            continue
        codec = CODECS[cid](**cfg)
        x = stored(kv_like(shape, seed), dtype)
        c = shape[2]
        context = NO_CONTEXT if ctx is None else ChunkContext(
            layer=ctx["layer"], which=ctx.get("which"), token_start=ctx["token_start"], valid_tokens=c,
            card_tokens=ctx["token_start"] + c, positions=np.arange(ctx["position_start"], ctx["position_start"] + c))
        encoded = codec.encode_chunk(x, context)
        decoded = codec.decode_chunk(np.frombuffer(encoded, np.uint8), x.shape, x.dtype)
        folder.mkdir(parents=True)
        (folder / "case.json").write_text(json.dumps({"codec": codec.to_dict(), "dtype": dtype, "shape": list(shape),
                                                      "context": ctx}, indent=2) + "\n")
        np.save(folder / "input.npy", x)
        (folder / "encoded.bin").write_bytes(encoded)
        np.save(folder / "decoded.npy", decoded)
        print("wrote", folder)


if __name__ == "__main__":
    main()
