"""Codec presets: the zarr codec pipeline a card's K or V array is written with (spec/cachecard-1.md §5.5).

A preset name is recorded in the manifest; the pipeline itself is recorded in each array's zarr.json and is
what a reader decodes with. Every pipeline ends in crc32c so each stored chunk is checksummed.
"""

from cachecard.codecs.presets import PRESETS, Pipeline, pipeline

__all__ = ["PRESETS", "Pipeline", "pipeline"]
