"""Per-layer sensitivity profiles: how much each layer's K and V quantization costs a model's predictions
(spec/codecs/frontier.md "Rate planning"). A planner gives sensitive layers finer steps.

A profile is keyed by the model's weights hash (spec/cachecard-1.md §6) and measured once per model
(``cachecard calibrate``, or ``cachecard.adapters.hf.calibrate``). Profiles are looked up in this order: those
``register``-ed at run time, the user's (``save`` writes them to ``$CACHECARD_PROFILES``, by default
``$XDG_CACHE_HOME/cachecard/profiles``, one ``<hash>.json`` each), then the built-in JSON files beside this
module.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cachecard.errors import ProfileError

HERE = Path(__file__).parent


class SensitivityProfile(BaseModel):
    """KL cost of quantizing each layer alone at a reference step, for K and for V."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights_hash: str
    model: str | None = None
    k: list[float] = Field(min_length=1)
    v: list[float] = Field(min_length=1)
    reference: str = Field(description="how the costs were measured (codec, steps, windows, text)")
    k_step: float = Field(default=0.6, gt=0, description="cachecard.frontier step the K costs were measured at")
    v_step: float = Field(default=1.0, gt=0, description="cachecard.frontier step the V costs were measured at")


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


def user_dir() -> Path:
    """Where ``save`` writes profiles and ``lookup`` finds them: ``$CACHECARD_PROFILES``, or
    ``$XDG_CACHE_HOME/cachecard/profiles`` (``~/.cache/cachecard/profiles``)."""
    if os.environ.get("CACHECARD_PROFILES"):
        return Path(os.environ["CACHECARD_PROFILES"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cachecard" / "profiles"


def _file_name(weights_hash: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", weights_hash) + ".json"


def save(profile: SensitivityProfile, folder: Path | None = None) -> Path:
    """Write ``profile`` where ``lookup`` finds it (``user_dir()`` unless ``folder``); returns the file."""
    folder = user_dir() if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _file_name(profile.weights_hash)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.model_dump(mode="json"), indent=1) + "\n")
    os.replace(tmp, path)  # readers never see half a file
    return path


def _user(weights_hash: str) -> SensitivityProfile | None:
    path = user_dir() / _file_name(weights_hash)
    if not path.is_file():
        return None
    try:
        p = SensitivityProfile.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise ProfileError(f"the sensitivity profile {path} cannot be read ({e}); delete it or run "
                           "`cachecard calibrate` again for this model") from None
    return p if p.weights_hash == weights_hash else None


def lookup(weights_hash: str) -> SensitivityProfile | None:
    return _REGISTERED.get(weights_hash) or _user(weights_hash) or _builtin().get(weights_hash)
