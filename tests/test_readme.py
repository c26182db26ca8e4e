"""Every code block of README.md runs as written (issues 12 and 17): the Python blocks one after the other in
one namespace (they chain, as a reader would paste them), then each `cachecard` line of the shell blocks
that use what they wrote. The blocks load SmolLM2 in transformers, llama.cpp and MLX, so this is a ``model``
test; the checks that need no model run always."""

from __future__ import annotations

import glob
import re
import shlex
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_the_blocks_this_test_runs():
    assert len(blocks("python")) >= 5
    assert any("cachecard inspect" in b for b in blocks("sh"))


def test_pruning_is_where_the_readme_says_and_the_old_name_warns():
    import importlib
    import sys

    import cachecard

    assert callable(cachecard.prune) and "cachecard.prune(" in README.read_text()
    sys.modules.pop("cachecard.codecs.pruning", None)
    with pytest.warns(DeprecationWarning, match="cachecard.transforms.pruning"):
        old = importlib.import_module("cachecard.codecs.pruning")
    assert old.prune is cachecard.prune


@pytest.mark.model
def test_every_readme_block_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("llama_cpp")
    pytest.importorskip("mlx_lm")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, code in enumerate(blocks("python")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert "memory/planner.card" not in printed and printed.strip()

    from typer.testing import CliRunner

    import cachecard
    from cachecard.cli import app

    with cachecard.Store("agent-memory") as st:
        card_id = st.cards()[0].card_id
    for block in blocks("sh"):
        for line in block.splitlines():
            for command in line.split("#")[0].split(";"):
                words = shlex.split(command.replace("CARD_ID", card_id))
                if not words or words[0] != "cachecard":
                    continue
                args = [m for w in words[1:] for m in (sorted(glob.glob(w)) if "*" in w else [w])]
                if args[:2] == ["rm", "agent-memory"]:
                    args = ["rm", "agent-memory", "--agent", "coder", card_id]  # keep the planner's card
                r = CliRunner().invoke(app, args)
                assert r.exit_code == 0, (command, r.output)
