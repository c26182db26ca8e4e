"""``cachecard calibrate``: one command that measures a model's per-layer sensitivity profile and saves it where
the rate planners find it by model identity (spec/codecs/rotq.md and frontier.md, "Rate planning").

The profile is the KL cost of quantizing each layer's K (then V) alone, measured by
:func:`cachecard.adapters.hf.calibrate` (2·L + 1 forward passes; a few minutes on a CPU for a 135M model). It
is keyed by the weights hash of the identity cards of this model carry (the GGUF file's when the model is
loaded from one), so ``gpu3``, ``gpu2.5`` and the frontier presets pick it up for those cards; without a
profile they use a data-independent default. The default calibration text is the docstrings of standard-
library modules, which ship with Python; quality is reported on other text (the pydoc topics).
"""

from __future__ import annotations

import importlib
import inspect
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

from cachecard.errors import CacheCardError, ProfileError

if TYPE_CHECKING:
    from cachecard.codecs.profiles import SensitivityProfile

MODULES = ["json", "re", "os", "collections", "argparse", "logging", "pathlib", "functools", "itertools",
           "subprocess", "typing", "unittest", "asyncio", "http.client", "email.message", "csv", "datetime"]


def default_texts() -> list[str]:
    """The docstrings of a few standard-library modules and their public names (about 100K tokens)."""
    out = []
    for name in MODULES:
        mod = importlib.import_module(name)
        parts = [inspect.getdoc(mod) or ""]
        parts += [inspect.getdoc(getattr(mod, a)) or "" for a in sorted(dir(mod)) if not a.startswith("_")]
        out.append("\n\n".join(p for p in parts if p))
    return out


def calibrate_model(model_path: str, *, gguf_file: str | None = None, texts: list[str] | None = None, windows: int = 4,
                    prefix: int = 512, continuation: int = 128,
                    progress: Callable[[int, int], None] | None = None) -> SensitivityProfile:
    """Load a transformers model from a local folder (``gguf_file``: a GGUF file in it) in float32 on the CPU
    and measure its profile, keyed by the weights hash of its card identity."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cachecard.adapters import hf

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True, **kw)
        model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=torch.float32,
                                                     **kw).eval()
    except (OSError, ValueError) as e:
        raise ProfileError(f"cannot load a transformers model from {model_path!r}"
                           + (f" (GGUF file {gguf_file!r})" if gguf_file else "") + f": {e}. Give a local model "
                           "folder (config.json and weights, or --gguf-file with the file's name in it)") from None
    identity = hf.model_identity(model, tokenizer=tok, gguf=Path(model_path) / gguf_file if gguf_file else None)
    try:
        profile = hf.calibrate(model, tok, texts or default_texts(), windows=windows, prefix=prefix,
                               continuation=continuation, progress=progress)
    except ValueError as e:
        raise ProfileError(f"{e}: give more text (--text) or fewer or shorter windows") from None
    source = "stdlib module docstrings" if texts is None else f"{len(texts)} user text(s)"
    return profile.model_copy(update={"weights_hash": identity.weights_hash,
                                      "model": identity.name or Path(model_path).name,
                                      "reference": f"{profile.reference}; text: {source}"})


def command(
    model: Annotated[str, typer.Argument(help="local transformers model folder")],
    gguf_file: Annotated[Optional[str], typer.Option("--gguf-file", help="load this GGUF file of the folder")] = None,
    text: Annotated[Optional[list[Path]], typer.Option("--text", help="calibration text file (repeatable); "
                                                       "default: standard-library docstrings")] = None,
    windows: Annotated[int, typer.Option(min=1, help="windows of calibration text")] = 4,
    prefix: Annotated[int, typer.Option(min=1, help="tokens of each window's cached prefix")] = 512,
    continuation: Annotated[int, typer.Option(min=2, help="tokens scored after each prefix")] = 128,
    out: Annotated[Optional[Path], typer.Option(help="profile folder (default: $CACHECARD_PROFILES or "
                                                "$XDG_CACHE_HOME/cachecard/profiles)")] = None,
) -> None:
    """Measure a model's per-layer K/V sensitivity and save it for the gpu3/gpu2.5/frontier presets."""
    from cachecard.codecs import profiles

    try:
        texts = [p.read_text() for p in text] if text else None
    except OSError as e:
        typer.echo(f"cannot read calibration text: {e}", err=True)
        raise typer.Exit(2) from None
    start = time.time()

    def progress(i: int, n: int) -> None:
        typer.echo(f"\r{i}/{n} layer passes, {time.time() - start:.0f}s", nl=i == n)

    try:
        profile = calibrate_model(model, gguf_file=gguf_file, texts=texts, windows=windows, prefix=prefix,
                                  continuation=continuation, progress=progress)
        path = profiles.save(profile, out)
    except CacheCardError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    except OSError as e:
        typer.echo(f"cannot write the profile: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"saved the profile of {profile.model} ({profile.weights_hash}) to {path} in {time.time() - start:.0f}s")


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` to the ``cachecard`` command."""
    app.command("calibrate")(command)
