"""Configurations every codec is tested with, and its golden vector cases (spec/vectors/codecs/).

Each registered codec must appear in CONFIGS (tests/test_codecs.py fails otherwise). INVALID lists
configurations a codec must refuse. VECTORS are write-once golden cases: ``make vectors`` adds missing ones.
"""

from __future__ import annotations

# codec id -> configurations to test (each a zarr "configuration" object)
CONFIGS: dict[str, list[dict]] = {
    "cachecard.q8_0": [{}],
    "cachecard.mixed": [
        {"base_bits": 2, "salient_bits": 4, "salient": 0.2, "sinks": 4, "recent": 8, "seed": 1},
        {"base_bits": 3, "salient_bits": 3, "salient": 0.0, "sinks": 0, "recent": 0, "seed": 2},
        {"base_bits": 1, "salient_bits": 2, "salient": 1.0, "sinks": 1, "recent": 3, "seed": 3},
    ],
    "cachecard.frontier": [
        {"step": 0.5, "center": True, "sinks": 4, "recent": 8, "salient": 0.0, "seed": 1},
        {"step": 1.5, "center": False, "sinks": 0, "recent": 0, "salient": 0.25, "seed": 3},
        {"step": 0.1, "layer_steps": [0.3, 0.7] * 21, "center": True, "sinks": 1, "recent": 0, "salient": 0.5, "seed": 5},
    ],
    "cachecard.kivi": [{"bits": 2, "group_size": 32, "axis": "channel"}, {"bits": 2, "group_size": 2, "axis": "token"},
                       {"bits": 4, "group_size": 7, "axis": "channel"}, {"bits": 8, "group_size": 1, "axis": "token"}],
    "cachecard.q4_0": [{}],
    "cachecard.q4_1": [{}],
    "cachecard.mlx_affine": [{"bits": 4, "group_size": 64}, {"bits": 8, "group_size": 64},
                             {"bits": 2, "group_size": 32}, {"bits": 3, "group_size": 32},
                             {"bits": 5, "group_size": 128}, {"bits": 6, "group_size": 64}],
    "cachecard.nf4": [{"block_size": 32}, {"block_size": 64}, {"block_size": 128}],
    "cachecard.turbo": [{"bits": 2, "seed": 1}, {"bits": 3, "seed": 0}, {"bits": 4, "seed": 2**62}],
    "cachecard.rotq": [
        {"bits": 3, "center": True, "sinks": 4, "recent": 8, "seed": 1},
        {"bits": 1, "center": False, "sinks": 0, "recent": 0, "seed": 2},
        {"bits": 2, "layer_bits": [2, 4, 3, 1] * 11, "center": True, "sinks": 1, "recent": 3, "seed": 2**62},
    ],
}

# codec id -> configurations that must be refused with UnsupportedCodecError
INVALID: dict[str, list[dict]] = {
    "cachecard.mixed": [{"base_bits": 5, "salient_bits": 4, "salient": 0.2, "sinks": 4, "recent": 8, "seed": 1},
                        {"base_bits": 2, "salient_bits": 4, "salient": -0.1, "sinks": 4, "recent": 8, "seed": 1}],
    "cachecard.frontier": [{"step": 0, "center": True, "sinks": 4, "recent": 8, "salient": 0.0, "seed": 1},
                           {"step": 0.5, "center": 1, "sinks": 4, "recent": 8, "salient": 0.0, "seed": 1},
                           {"step": 0.5, "center": True, "sinks": 4, "recent": 8, "salient": 1.5, "seed": 1},
                           {"step": 0.5, "layer_steps": [], "center": True, "sinks": 4, "recent": 8, "salient": 0.0,
                            "seed": 1}],
    "cachecard.kivi": [{"bits": 5, "group_size": 32, "axis": "token"}, {"bits": 2, "group_size": 0, "axis": "token"},
                       {"bits": 2, "group_size": 32, "axis": "layer"}, {"bits": 2, "group_size": 32}],
    "cachecard.q4_0": [{"block_size": 32}],
    "cachecard.q4_1": [{"bits": 4}],
    "cachecard.mlx_affine": [{}, {"bits": 4}, {"group_size": 64}, {"bits": 7, "group_size": 64},
                             {"bits": 4, "group_size": 16}, {"bits": 4, "group_size": 256},
                             {"bits": "4", "group_size": 64}, {"bits": 4.0, "group_size": 64},
                             {"bits": True, "group_size": 64}],
    "cachecard.nf4": [{}, {"block_size": 16}, {"block_size": 4096}, {"block_size": "64"},
                      {"block_size": 64.0}],
    "cachecard.turbo": [{"bits": 5, "seed": 1}, {"bits": 3}, {"bits": 3, "seed": -1}, {"bits": "3", "seed": 1}],
    "cachecard.rotq": [{"bits": 0, "center": True, "sinks": 4, "recent": 8, "seed": 1},
                       {"bits": 3, "center": True, "sinks": 4, "recent": 8},
                       {"bits": 3, "layer_bits": [2, 5], "center": True, "sinks": 4, "recent": 8, "seed": 1},
                       {"bits": 3, "layer_bits": [], "center": True, "sinks": 4, "recent": 8, "seed": 1},
                       {"bits": 3.0, "center": True, "sinks": 4, "recent": 8, "seed": 1},
                       {"bits": 3, "center": "yes", "sinks": 4, "recent": 8, "seed": 1}],
}

# golden vectors: (case name, codec id, configuration, storage dtype, chunk shape (1, H, c, D), seed, context)
# context: {"layer": int, "token_start": int, "position_start": int} or None for a context-free encode
VECTORS: list[tuple[str, str, dict, str, tuple[int, int, int, int], int, dict | None]] = [
    ("q8_0-float16", "cachecard.q8_0", {}, "float16", (1, 2, 5, 64), 1, None),
    ("mixed-float16", "cachecard.mixed", {"base_bits": 2, "salient_bits": 4, "salient": 0.25, "sinks": 2, "recent": 3,
                                          "seed": 4}, "float16", (1, 2, 12, 16), 8,
     {"layer": 1, "which": "v", "token_start": 0, "position_start": 0}),
    ("frontier-k-float16", "cachecard.frontier", {"step": 0.5, "center": True, "sinks": 2, "recent": 3, "salient": 0.1,
                                                  "seed": 9}, "float16", (1, 2, 20, 16), 6,
     {"layer": 0, "which": "k", "token_start": 0, "position_start": 0}),
    ("frontier-v-bfloat16", "cachecard.frontier", {"step": 0.8, "center": False, "sinks": 0, "recent": 0,
                                                   "salient": 0.0, "seed": 9}, "bfloat16", (1, 1, 7, 8), 7, None),
    ("kivi2-channel-float16", "cachecard.kivi", {"bits": 2, "group_size": 4, "axis": "channel"}, "float16",
     (1, 2, 6, 8), 4, None),
    ("kivi4-token-bfloat16", "cachecard.kivi", {"bits": 4, "group_size": 8, "axis": "token"}, "bfloat16",
     (1, 1, 3, 16), 5, None),
    ("q4_0-float16", "cachecard.q4_0", {}, "float16", (1, 2, 5, 64), 4, None),
    ("q4_1-bfloat16", "cachecard.q4_1", {}, "bfloat16", (1, 2, 3, 64), 5, None),
    ("mlx_affine4-g64-bfloat16", "cachecard.mlx_affine", {"bits": 4, "group_size": 64}, "bfloat16",
     (1, 2, 4, 128), 6, None),
    ("mlx_affine3-g32-float16", "cachecard.mlx_affine", {"bits": 3, "group_size": 32}, "float16",
     (1, 1, 3, 64), 7, None),
    ("mlx_affine8-g64-float32", "cachecard.mlx_affine", {"bits": 8, "group_size": 64}, "float32",
     (1, 1, 2, 64), 8, None),
    ("nf4-b64-float16", "cachecard.nf4", {"block_size": 64}, "float16", (1, 2, 3, 128), 9, None),
    ("turbo3-float16", "cachecard.turbo", {"bits": 3, "seed": 7}, "float16", (1, 2, 6, 64), 2, None),
    ("turbo2-bfloat16", "cachecard.turbo", {"bits": 2, "seed": 8}, "bfloat16", (1, 1, 3, 16), 3, None),
    ("rotq-k-float16", "cachecard.rotq", {"bits": 3, "center": True, "sinks": 2, "recent": 3, "seed": 9}, "float16",
     (1, 2, 20, 16), 6, {"layer": 0, "which": "k", "token_start": 0, "position_start": 0}),
    ("rotq-v-bfloat16", "cachecard.rotq", {"bits": 2, "center": False, "sinks": 0, "recent": 0, "seed": 9},
     "bfloat16", (1, 1, 7, 8), 7, None),
    ("rotq-k-d128-float16", "cachecard.rotq", {"bits": 1, "layer_bits": [2, 4], "center": True, "sinks": 1,
                                               "recent": 2, "seed": 3}, "float16", (1, 2, 6, 128), 8,
     {"layer": 1, "which": "k", "token_start": 0, "position_start": 0}),
]
