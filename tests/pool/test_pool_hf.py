"""Batched transformers inference over the pool: each agent attends only to its own blocks."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from _tiny import CODECS, ids, make_pool, run_turns, tiny_llama  # noqa: E402
from cachecard.errors import IdentityMismatchError, PoolError  # noqa: E402
from cachecard.adapters import hf  # noqa: E402
from cachecard.pool.hf import PoolCache  # noqa: E402

AGENTS = ["a", "b", "c"]
# three agents of different lengths, three turns of different lengths
TURNS = [{"a": ids(37, 1), "b": ids(20, 2), "c": ids(53, 3)},
         {"a": ids(5, 4), "b": ids(11, 5), "c": ids(1, 6)},
         {"a": ids(9, 7), "b": ids(2, 8), "c": ids(16, 9)}]


def fresh(identity, codec, **kw):
    pool = make_pool(identity, codec, **kw)
    for a in AGENTS:
        pool.add(a)
    return pool


@pytest.mark.parametrize("codec", CODECS)
def test_batched_equals_each_agent_alone(tiny, codec):
    model, ident = tiny
    turns = TURNS if codec == "q4" else TURNS[:2]
    batched = run_turns(fresh(ident, codec), model, AGENTS, turns, batched=True)
    alone = run_turns(fresh(ident, codec), model, AGENTS, turns, batched=False)
    assert batched == alone
    assert len({tuple(x) for t in batched for x in t}) > 3  # the continuations differ between agents


@pytest.mark.parametrize("workspace", ["layer", "batch"])
def test_fresh_tokens_quantized_first_is_also_batch_invariant(tiny, workspace):
    """exact_fresh=False (mlx-lm's semantics: a forward attends to its own tokens already quantized)."""
    model, ident = tiny
    got = []
    for batched in (True, False):
        pool = fresh(ident, "q4")
        out = []
        for turn in TURNS[:2]:
            groups = [AGENTS] if batched else [[a] for a in AGENTS]
            row = []
            for g in groups:
                with PoolCache(pool, g, model, workspace=workspace, exact_fresh=False) as c:
                    row += c.generate(model, [turn[a] for a in g], max_new_tokens=6)
            out.append(row)
        got.append(out)
    assert got[0] == got[1]
    assert got[0] != run_turns(fresh(ident, "q4"), model, AGENTS, TURNS[:2], batched=True)  # semantics differ


def test_lossless_resident_codec_equals_a_full_precision_run(tiny):
    model, ident = tiny
    got = run_turns(fresh(ident, "fp32"), model, AGENTS, TURNS, batched=True)
    for a_i, a in enumerate(AGENTS):  # the same turns through plain transformers generate, one agent alone
        seq: list[int] = []
        for t, turn in enumerate(TURNS):
            seq += turn[a]
            out = model.generate(torch.tensor([seq]), max_new_tokens=6, do_sample=False)[0, len(seq):].tolist()
            assert got[t][a_i] == out
            seq += out


@pytest.mark.parametrize("workspace", ["layer", "batch"])
def test_model_calls_and_generate_agree_and_logits_match_alone(tiny, workspace):
    """model(**cache.feed(...)) step by step == cache.generate == model.generate(**feed) + record; the
    batched logits equal each agent's alone."""
    model, ident = tiny
    pool = fresh(ident, "q4")
    with torch.no_grad(), PoolCache(pool, AGENTS, model, workspace=workspace) as c:
        out = model(**c.feed([TURNS[0][a] for a in AGENTS]))
        steps = [out.logits[:, -1].argmax(-1)]
        for _ in range(4):
            out = model(**c.feed([[int(t)] for t in steps[-1]]))
            steps.append(out.logits[:, -1].argmax(-1))
        by_model = torch.stack(steps, 1).tolist()
        last_logits = out.logits[:, -1]
    pool2 = fresh(ident, "q4")
    with PoolCache(pool2, AGENTS, model) as c:
        assert c.generate(model, [TURNS[0][a] for a in AGENTS], max_new_tokens=5) == by_model
    pool3 = fresh(ident, "q4")
    with PoolCache(pool3, AGENTS, model) as c:
        inputs = c.feed([TURNS[0][a] for a in AGENTS], reserve=5)
        seqs = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        c.record(seqs[:, inputs["input_ids"].shape[1]:])
    assert seqs[:, -5:].tolist() == by_model
    for i, a in enumerate(AGENTS):
        solo = make_pool(ident, "q4")
        solo.add(a)
        with torch.no_grad(), PoolCache(solo, [a], model) as c:
            o = model(**c.feed([TURNS[0][a]]))
            for t in by_model[i][:4]:
                o = model(**c.feed([[t]]))
        torch.testing.assert_close(o.logits[0, -1], last_logits[i], rtol=1e-4, atol=1e-4)
    # after generate + record, every pool ends in the same state: the last generated id is pending
    assert [pool3.tokens(a).tolist() for a in AGENTS] == [pool2.tokens(a).tolist() for a in AGENTS]


def test_the_model_must_be_the_pools(tiny):
    model, ident = tiny
    pool = fresh(ident, "q4")
    other = tiny_llama(seed=1)
    from _tiny import _Tok

    hf.bind(other, hf.model_identity(other, tokenizer=_Tok()))
    with pytest.raises(IdentityMismatchError, match="weights_hash"):
        PoolCache(pool, ["a"], other)
    with pytest.raises(IdentityMismatchError, match="weights_hash"):
        pool.add("d", identity=hf.identity_of(other))
    assert pool.info("a").pinned is False  # the refused batch pinned nothing


def test_batch_misuse_is_refused_clearly(tiny):
    model, ident = tiny
    pool = fresh(ident, "q4")
    with PoolCache(pool, ["a", "b"], model) as c:
        with pytest.raises(PoolError, match="one token list per agent"):
            c.feed([[1, 2]])
        with pytest.raises(PoolError, match="feed the batch"):
            model(input_ids=torch.tensor([[1], [2]]), past_key_values=c)
        inputs = c.feed([[1, 2], [3]])
        with pytest.raises(PoolError, match="were not run"):
            c.feed([[1], [2]])
        with pytest.raises(PoolError, match="beam search"):
            model.generate(**inputs, max_new_tokens=2, num_beams=2)
    with pytest.raises(PoolError, match="distinct agents"):
        PoolCache(pool, ["a", "a"], model)
    assert pool.tokens("a").tolist() == [1, 2]  # fed but never run: still pending, nothing lost
    assert pool.info("a").tokens == 0 and pool.info("a").pending == 2


def test_a_forward_that_fails_midway_is_rolled_back(tiny):
    model, ident = tiny
    pool, ref = fresh(ident, "q8_0"), fresh(ident, "q8_0")
    with PoolCache(ref, ["a"], model) as c:
        want = c.generate(model, [TURNS[0]["a"]], max_new_tokens=4)

    def boom(*_):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_pre_hook(boom)
    try:
        with PoolCache(pool, ["a"], model) as c, pytest.raises(RuntimeError, match="boom"):
            c.generate(model, [TURNS[0]["a"]], max_new_tokens=4)
    finally:
        handle.remove()
    assert pool.info("a").tokens == 0 and pool.tokens("a").tolist() == TURNS[0]["a"]
    with PoolCache(pool, ["a"], model) as c:
        assert c.generate(model, [[]], max_new_tokens=4) == want
