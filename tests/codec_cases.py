"""Configurations every codec is tested with, and its golden vector cases (spec/vectors/codecs/).

Each registered codec must appear in CONFIGS (tests/test_codecs.py fails otherwise). INVALID lists
configurations a codec must refuse. VECTORS are write-once golden cases: ``make vectors`` adds missing ones.
"""

from __future__ import annotations

# codec id -> configurations to test (each a zarr "configuration" object)
CONFIGS: dict[str, list[dict]] = {
    "cachecard.q8_0": [{}],
}

# codec id -> configurations that must be refused with UnsupportedCodecError
INVALID: dict[str, list[dict]] = {
}

# golden vectors: (case name, codec id, configuration, storage dtype, chunk shape (1, H, c, D), seed, context)
# context: {"layer": int, "token_start": int, "position_start": int} or None for a context-free encode
VECTORS: list[tuple[str, str, dict, str, tuple[int, int, int, int], int, dict | None]] = [
    ("q8_0-float16", "cachecard.q8_0", {}, "float16", (1, 2, 5, 64), 1, None),
]
