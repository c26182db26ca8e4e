"""Per-layer sensitivity profiles: how much each layer's K and V quantization costs a model's predictions
(spec/codecs/frontier.md "Rate planning"). A planner gives sensitive layers finer steps.

A profile is keyed by the model's weights hash (spec/cachecard-1.md §6) and measured once per model
(``cachecard.adapters.hf.calibrate``). Built-in profiles are the JSON files beside this module; ``register``
adds others at run time.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

HERE = Path(__file__).parent


class SensitivityProfile(BaseModel):
    """KL cost of quantizing each layer alone at a reference step, for K and for V."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights_hash: str
    model: str | None = None
    k: list[float] = Field(min_length=1)
    v: list[float] = Field(min_length=1)
    reference: str = Field(description="how the costs were measured (codec, steps, windows, text)")


_REGISTERED: dict[str, SensitivityProfile] = {}


@lru_cache(maxsize=1)
def _builtin() -> dict[str, SensitivityProfile]:
    out = {}
    for path in sorted(HERE.glob("*.json")):
        p = SensitivityProfile.model_validate(json.loads(path.read_text()))
        out[p.weights_hash] = p
    return out


def register(profile: SensitivityProfile) -> None:
    """Use ``profile`` for cards of the model with its weights hash (replaces a built-in one)."""
    _REGISTERED[profile.weights_hash] = profile


def unregister(weights_hash: str) -> None:
    _REGISTERED.pop(weights_hash, None)


def lookup(weights_hash: str) -> SensitivityProfile | None:
    return _REGISTERED.get(weights_hash) or _builtin().get(weights_hash)
