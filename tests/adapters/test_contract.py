"""The adapter contract (cachecard.adapters.protocol.RuntimeAdapter), run against each runtime: the same verbs
and keywords, and the same behaviour — save then load continues like a prefill, into a card or a store;
another model is refused unless ``allow=`` names the differing fields; a store's child card is refused on its
own; another text is refused; batch-of-1 token tensors are accepted; identities are found once per model.

transformers and mlx-lm run tiny random models; llama.cpp needs a real GGUF (SmolLM2), so its part is
marked ``model``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

import cachecard
from cachecard.adapters.protocol import VERBS, RuntimeAdapter
from cachecard.testing import tiny


@dataclass
class Runtime:
    """One adapter with a model, and how to run that model: ``prefill(ids)`` gives a cache of ``ids``;
    ``next_after(loaded, ids)`` the greedy next token of ``ids`` given what ``load`` returned (``None``:
    a fresh prefill)."""

    module: Any
    model: Any
    prefill: Callable[[list[int]], Any]
    next_after: Callable[[Any, list[int]], int]
    batch_of_one: Callable[[list[int]], Any]


def _hf() -> Runtime:
    pytest.importorskip("transformers")
    import torch

    from cachecard.adapters import hf

    model = tiny.hf_llama()
    hf.bind(model, hf.model_identity(model, tokenizer=tiny.word_tokenizer()))

    def prefill(ids):
        with torch.no_grad():
            return model(torch.tensor([ids]), use_cache=True).past_key_values

    def next_after(cache, ids):
        n = 0 if cache is None else cache.get_seq_length()
        with torch.no_grad():
            out = model(torch.tensor([ids[n:]]), past_key_values=cache, use_cache=True)
        return int(out.logits[0, -1].argmax())

    return Runtime(hf, model, prefill, next_after, lambda ids: torch.tensor([ids]))


def _mlx() -> Runtime:
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx_lm.models.cache import make_prompt_cache

    from cachecard.adapters import mlx

    model = tiny.mlx_llama()
    mlx.bind(model, mlx.model_identity(model, tokenizer=tiny.mlx_tokenizer()))

    def prefill(ids):
        cache = make_prompt_cache(model)
        model(mx.array([ids]), cache=cache)
        return cache

    def next_after(cache, ids):
        n = 0 if cache is None else cache[0].offset
        cache = make_prompt_cache(model) if cache is None else cache
        return int(model(mx.array([ids[n:]]), cache=cache)[0, -1].argmax())

    return Runtime(mlx, model, prefill, next_after, lambda ids: mx.array([ids]))


def _llamacpp() -> Runtime:
    llama_cpp = pytest.importorskip("llama_cpp")
    from cachecard.adapters import llamacpp
    from cachecard.testing import smollm2

    llm = llama_cpp.Llama(smollm2.gguf_path(), n_ctx=256, n_batch=256, n_threads=1, verbose=False)

    def prefill(ids):
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # noqa: SLF001
        llm.eval(ids)
        return llm

    def next_after(n, ids):
        if n is None:
            prefill(ids)
        else:
            llm.eval(ids[n:])
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)  # noqa: SLF001
        return int(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).argmax())

    return Runtime(llamacpp, llm, prefill, next_after, lambda ids: np.asarray([ids]))


RUNTIMES = {"hf": _hf, "mlx": _mlx, "llamacpp": _llamacpp}


@pytest.fixture(scope="module", params=[
    "hf", "mlx", pytest.param("llamacpp", marks=pytest.mark.model)])
def rt(request) -> Runtime:
    return RUNTIMES[request.param]()


def _ids(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(1, 120, n).tolist()


# -- the verbs -------------------------------------------------------------------------------------------------
def test_module_offers_every_verb_with_the_contract_keywords(rt):
    assert isinstance(rt.module, RuntimeAdapter)
    assert isinstance(rt.module.RUNTIME, str) and rt.module.RUNTIME
    for verb in VERBS:
        want = list(inspect.signature(getattr(RuntimeAdapter, verb)).parameters.values())[1:]  # no self
        have = inspect.signature(getattr(rt.module, verb)).parameters
        positional = [q for q in have.values() if q.kind is q.POSITIONAL_OR_KEYWORD]
        where = f"{rt.module.__name__}.{verb}"
        for i, p in enumerate(want):
            if p.kind is p.POSITIONAL_OR_KEYWORD:  # the same place; each runtime names its own objects
                assert i < len(positional), f"{where} takes no argument {i} ({p.name})"
                q = positional[i]
            elif p.kind is p.KEYWORD_ONLY:
                assert p.name in have and have[p.name].kind is p.KEYWORD_ONLY, f"{where} lacks keyword {p.name}"
                q = have[p.name]
            else:
                continue
            if p.default is not p.empty:
                assert q.default == p.default, f"{where}({p.name}) defaults to {q.default!r}, not {p.default!r}"
        required = [q for q in have.values() if q.default is q.empty and q.kind in (q.POSITIONAL_OR_KEYWORD,
                                                                                         q.KEYWORD_ONLY)]
        assert len(required) <= len([p for p in want if p.default is p.empty]), f"{where} requires more"


def test_identity_is_found_once_per_model(rt):
    assert rt.module.identity_of(rt.model) is rt.module.identity_of(rt.model)


# -- behaviour ---------------------------------------------------------------------------------------------------
def test_save_then_load_continues_like_a_prefill(rt, tmp_path):
    prefix = _ids(40)
    prompt = prefix + _ids(5, seed=2)
    want = rt.next_after(None, prompt)
    card_id = rt.module.save(tmp_path / "c", rt.model, rt.prefill(prefix), prefix)
    assert cachecard.open_card(tmp_path / "c").manifest.card_id == card_id
    assert rt.next_after(rt.module.load(tmp_path / "c", rt.model, prompt), prompt) == want
    with cachecard.Store(tmp_path / "s") as store:
        assert rt.module.save(store, rt.model, rt.prefill(prefix), prefix, agent="a", codec="zstd")
        assert rt.next_after(rt.module.load(store, rt.model, prompt, agent="a"), prompt) == want


def test_batch_of_one_token_tensors_are_accepted(rt, tmp_path):
    prefix = _ids(20)
    rt.module.save(tmp_path / "c", rt.model, rt.prefill(prefix), rt.batch_of_one(prefix))
    assert cachecard.open_card(tmp_path / "c").token_ids().tolist() == prefix
    prompt = prefix + [7]
    assert rt.next_after(rt.module.load(tmp_path / "c", rt.model, rt.batch_of_one(prompt)), prompt) == \
        rt.next_after(None, prompt)


def test_another_model_is_refused_unless_allowed(rt, tmp_path):
    prefix = _ids(16)
    other = rt.module.identity_of(rt.model).model_copy(update={"weights_hash": "sha256:" + "0" * 64})
    rt.module.save(tmp_path / "c", rt.model, rt.prefill(prefix), prefix, identity=other)
    with pytest.raises(cachecard.IdentityMismatchError, match="weights_hash"):
        rt.module.restore(tmp_path / "c", rt.model)
    with pytest.raises(cachecard.IdentityMismatchError, match="weights_hash"):
        rt.module.load(tmp_path / "c", rt.model, prefix + [3])
    rt.module.restore(tmp_path / "c", rt.model, allow={"weights_hash"})
    rt.module.restore(tmp_path / "c", rt.model, identity=other)


def test_a_stores_child_card_is_refused_on_its_own(rt, tmp_path):
    shared = _ids(64)
    with cachecard.Store(tmp_path / "s", block_tokens=16) as store:
        rt.module.save(store, rt.model, rt.prefill(shared + _ids(8, 3)), shared + _ids(8, 3), agent="a")
        child = rt.module.save(store, rt.model, rt.prefill(shared + _ids(8, 4)), shared + _ids(8, 4), agent="b")
        card = store.parts(child)[-1][0]
        assert card.manifest.parent is not None
        with pytest.raises(cachecard.KVShapeError, match="through its store"):
            rt.module.restore(card, rt.model)
        prompt = shared + _ids(8, 4) + [5]
        assert rt.next_after(rt.module.load(store, rt.model, prompt, agent="b"), prompt) == \
            rt.next_after(None, prompt)


def test_another_text_is_refused(rt, tmp_path):
    prefix = _ids(16)
    rt.module.save(tmp_path / "c", rt.model, rt.prefill(prefix), prefix)
    with pytest.raises(cachecard.KVShapeError, match="another text"):
        rt.module.load(tmp_path / "c", rt.model, [prefix[0] + 1] + prefix[1:] + [3])
