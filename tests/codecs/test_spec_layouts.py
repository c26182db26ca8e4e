"""The struct listings of spec/codecs/*.md are true to the golden vectors' bytes: each chunk has the size its
page's listing gives for its shape, and fields read at the documented offsets (packed, little-endian, no
alignment) hold what the page says they hold."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import numpy as np
import pytest

from cachecard.codecs.base import to_float32
from cachecard.testing import frontier_reference as ref
from cachecard.testing.codec_cases import VECTORS

GOLDEN = Path(__file__).parents[2] / "spec" / "vectors" / "codecs"


def load(name: str) -> tuple[dict, np.ndarray, bytes]:
    folder = GOLDEN / name
    meta = json.loads((folder / "case.json").read_text())
    return meta["codec"]["configuration"], np.load(folder / "input.npy"), (folder / "encoded.bin").read_bytes()


def f16(data: bytes, offset: int, count: int = 1) -> np.ndarray:
    return np.frombuffer(data, "<f2", count, offset).astype(np.float32)


def check_blocks(cfg, x, data, block_bytes):            # q8_0.md, q4_0.md, q4_1.md
    *_, d = x.shape
    n = x.size // d
    assert len(data) == n * d // 32 * block_bytes
    blocks = np.frombuffer(data, np.uint8).reshape(-1, block_bytes)
    d_scale = blocks[:, :2].copy().view("<f2").astype(np.float32).ravel()   # d at offset 0 of every block
    amax = np.abs(to_float32(x).reshape(-1, 32)).max(axis=1)
    assert np.all(np.abs(d_scale) >= amax / 127 * (1 - 2**-10)) and np.all(np.abs(d_scale) <= amax * (1 + 2**-10) / 7.5)


def check_mlx_affine(cfg, x, data):
    n, d = x.size // x.shape[-1], x.shape[-1]
    size = {np.dtype("<f4"): 4}.get(x.dtype, 2)
    scale_type = {np.dtype("<f4"): 0, np.dtype("<f2"): 1, np.dtype("<u2"): 2}[x.dtype]
    w, g = n * d * cfg["bits"] // 8, d // cfg["group_size"]
    assert len(data) == 4 + w + 2 * n * g * size
    assert (data[0], data[1], int.from_bytes(data[2:4], "little")) == (scale_type, cfg["bits"], cfg["group_size"])


def check_nf4(cfg, x, data):
    n = x.size
    assert len(data) == n // 2 + 4 * (n // cfg["block_size"])
    absmax = np.frombuffer(data, "<f4", n // cfg["block_size"], n // 2)
    assert np.array_equal(absmax, np.abs(to_float32(x).reshape(-1, cfg["block_size"])).max(axis=1))


def check_kivi(cfg, x, data):
    m, c, d = math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1]
    g = cfg["group_size"]
    groups = m * c * (d // g) if cfg["axis"] == "token" else m * d * -(-c // g)
    assert len(data) == 4 * groups + -(-m * c * d * cfg["bits"] // 8)
    assert np.all(f16(data, 0, groups) >= 0), "step[] (float16) comes first"


def turbo_size(vectors: int, d: int, bits: int) -> int:
    return vectors * (2 + -(-d * bits // 8))


def check_turbo(cfg, x, data):
    n, d = x.size // x.shape[-1], x.shape[-1]
    assert len(data) == turbo_size(n, d, cfg["bits"])
    assert np.all(f16(data, 0, n) > 0), "scale[N] (float16 gains, positive here) comes first"


def check_mixed(cfg, x, data):
    m, c, d = math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1]
    classes = np.unpackbits(np.frombuffer(data[: -(-c // 4)], np.uint8), bitorder="little")
    classes = (classes[0::2] | classes[1::2] << 1)[:c]          # 2-bit little-endian fields
    assert set(classes.tolist()) == {0, 1, 2}, "the golden vector exercises all three classes"
    p, s, b = (m * int(np.sum(classes == k)) for k in (2, 1, 0))
    a = -(-c // 4)
    z = a + 2 * p + p * d + turbo_size(s, d, cfg["salient_bits"])
    assert len(data) == z + turbo_size(b, d, cfg["base_bits"])
    assert np.all(f16(data, a, p) > 0), "p_scale[P] follows the rate map"


def check_frontier(cfg, x, data):
    m, c, d = math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1]
    chunk = ref.parse(data, x.shape)
    assert (data[0], data[1] & 1, data[2:4]) == (1, int(cfg["center"]), b"\0\0")
    p = m * int(chunk.protected.sum())
    e_vectors = m * c - p
    a = 12 + -(-c // 8)
    b = a + (2 * m * d if cfg["center"] else 0)
    e = b + 2 * p + p * d
    qmin, nsym, nwords = (int(np.frombuffer(data, t, 1, e + e_vectors + o)[0]) for t, o in
                          (("<i2", 0), ("<u2", 2), ("<u4", 4)))
    assert (qmin, nsym, nwords) == (chunk.qmin, len(chunk.counts), len(chunk.words))
    assert len(data) == e + e_vectors + 8 + 4 * nsym + 4 * nwords
    assert np.frombuffer(data, "<f4", 1, 4)[0] == np.float32(cfg["step"])


def check_rotq(cfg, x, data):                          # rotq.md: 24-byte header, then four sections
    g, t, d = math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1]
    version, flags, bits, reserved = data[0], data[1], data[2], data[3]
    a, r0, r1 = (int.from_bytes(data[o:o + 4], "little") for o in (4, 8, 12))
    ref_ = np.frombuffer(data, "<f4", 1, 16)[0]
    assert (version, flags & ~1, reserved, int.from_bytes(data[20:24], "little")) == (1, 0, 0, 0)
    assert 1 <= bits <= 4 and a <= r0 <= r1 <= t and np.isfinite(ref_) and ref_ >= 0
    assert bool(flags & 1) == cfg["center"]
    p = a + r1 - r0
    assert len(data) == 24 + 2 * g * d * (flags & 1) + g * p * d + g * (t - p) * d * bits // 8 + g * t


CHECKS = {"cachecard.q8_0": lambda *a: check_blocks(*a, 34), "cachecard.q4_0": lambda *a: check_blocks(*a, 18),
          "cachecard.q4_1": lambda *a: check_blocks(*a, 20), "cachecard.mlx_affine": check_mlx_affine,
          "cachecard.nf4": check_nf4, "cachecard.kivi": check_kivi, "cachecard.turbo": check_turbo,
          "cachecard.mixed": check_mixed, "cachecard.frontier": check_frontier, "cachecard.rotq": check_rotq}


def test_every_codec_has_a_layout_check():
    assert {v[1] for v in VECTORS} == set(CHECKS)


@pytest.mark.parametrize("case", VECTORS, ids=[v[0] for v in VECTORS])
def test_golden_chunk_matches_its_struct_listing(case):
    cfg, x, data = load(case[0])
    CHECKS[case[1]](cfg, x, data)


# sizes the pages' Examples sections state
STATED = {"q8_0-float16": 680, "q4_0-float16": 360, "q4_1-bfloat16": 240, "mlx_affine4-g64-bfloat16": 580,
          "mlx_affine3-g32-float16": 100, "mlx_affine8-g64-float32": 148, "nf4-b64-float16": 432,
          "turbo3-float16": 312}


@pytest.mark.parametrize(("name", "size"), sorted(STATED.items()))
def test_sizes_stated_in_the_examples(name, size):
    assert len(load(name)[2]) == size


def spec_rows(page: str, header: str) -> dict[int, list[int]]:
    """Rows `| bits | ... 0x........ ... |` of the markdown table under ``header``: bits -> bit patterns."""
    text = (GOLDEN.parents[1] / "codecs" / page).read_text()
    table = text[text.index(header):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and cells[1].strip().isdigit():
            rows[int(cells[1])] = [int(h, 16) for h in re.findall(r"0x([0-9a-f]{8})", line)]
    return rows


def test_turbo_tables_in_the_spec_are_the_codec_tables_exactly():
    from cachecard.codecs import _lloyd_max as lloyd_max

    centroids = spec_rows("turbo.md", "| bits | positive centroids")
    thresholds = spec_rows("turbo.md", "| bits | positive thresholds")
    text = (GOLDEN.parents[1] / "codecs" / "turbo.md").read_text()
    decimals = {int(row[1]): [float(v) for v in re.findall(r"(\d\.\d+) = `0x", row[0])]
                for row in re.findall(r"^(\| (\d) \| \d\.\d+ = .*)$", text, re.M)}
    assert sorted(centroids) == sorted(thresholds) == [1, 2, 3, 4]
    for bits in range(1, 5):
        c, t = lloyd_max.centroids(bits), lloyd_max.boundaries(bits)
        assert c[2 ** (bits - 1):].view(np.uint32).tolist() == centroids[bits]
        assert np.array_equal(c[: 2 ** (bits - 1)], -c[2 ** (bits - 1):][::-1]), "the negative half mirrors"
        assert t[2 ** (bits - 1):].view(np.uint32).tolist() == thresholds[bits]
        assert t[2 ** (bits - 1) - 1].view(np.uint32) == 0, "the middle threshold is +0"
        # each centroid is the float32 nearest the decimal the spec shows beside it
        assert np.array_equal(np.float32(decimals[bits]), c[2 ** (bits - 1):])


def test_frontier_scale_table_in_the_spec_is_the_codec_table():
    from cachecard.codecs.frontier import FRAC

    text = (GOLDEN.parents[1] / "codecs" / "frontier.md").read_text()
    table = text[text.index("| j | 0 | 1 |"):].split("\n\n")[0]
    bits = [int(h, 16) for h in re.findall(r"`([0-9a-f]{8})`", table)]
    assert bits == FRAC.view(np.uint32).tolist() == ref.F.view(np.uint32).tolist()
