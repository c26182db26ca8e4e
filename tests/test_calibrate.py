"""`cachecard calibrate` (src/cachecard/calibrate.py): one command measures a model's profile and saves it
where the planners find it by the model's card identity; bad input is refused with advice."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from cachecard.cli import app

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

runner = CliRunner()


@pytest.fixture
def model_folder(tmp_path):
    """A tiny Llama (2 layers, head_dim 8) and a word-level tokenizer, saved as a local transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(0, 64, 400)))
    return folder, text


def test_calibrate_saves_a_profile_the_planner_uses(model_folder, tmp_path, monkeypatch):
    from cachecard.adapters import hf
    from cachecard.codecs import allocation, profiles

    folder, text = model_folder
    out = tmp_path / "profiles"
    r = runner.invoke(app, ["calibrate", str(folder), "--text", str(text), "--windows", "2", "--prefix", "24",
                            "--continuation", "8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("CACHECARD_PROFILES", str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ident = hf.model_identity(model, tokenizer=transformers.AutoTokenizer.from_pretrained(folder))
    profile = profiles.lookup(ident.weights_hash)
    assert profile is not None and len(profile.k) == len(profile.v) == 2 and "1 user text" in profile.reference
    assert str(out) in r.output and ident.weights_hash in r.output
    assert allocation.sensitivities(ident, 2) is not None  # the gpu presets now plan from it


def test_calibrate_refuses_a_missing_model_and_too_little_text(model_folder, tmp_path):
    folder, text = model_folder
    r = runner.invoke(app, ["calibrate", str(tmp_path / "nope"), "--out", str(tmp_path / "p")])
    assert r.exit_code == 1 and "cannot load a transformers model" in r.output
    r = runner.invoke(app, ["calibrate", str(folder), "--text", str(text), "--windows", "9", "--prefix", "200",
                            "--out", str(tmp_path / "p")])
    assert r.exit_code == 1 and "more text" in r.output
    assert not (tmp_path / "p").exists()
