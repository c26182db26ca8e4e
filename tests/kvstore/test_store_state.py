"""Store contract, part 3: a hypothesis state machine runs the store (index + cards) against a dict model of
agents, cards and sequences, once per index backend (tests/kvstore/store_backends.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cachecard import CardNotFoundError, Store
from store_backends import BACKENDS
from store_worker import identity, kv_for

B = 8
BASE = list(range(100, 140))
SEQS = sorted({tuple(BASE[:n] + [x] * k) for n in (0, 5, 8, 13, 40) for x in (1, 2) for k in (0, 3, 9)} - {()})
AGENTS = ["ann", "bob", "cy"]
IDENT = identity()


def lcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class StoreModel(RuleBasedStateMachine):
    backend = BACKENDS["lmdb"]

    @initialize()
    def setup(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cc-state-")
        self.store = Store(self.dir, index=self.backend.index(Path(self.dir)), block_tokens=B)
        self.seq: dict[str, tuple[int, ...]] = {}      # card -> its whole token sequence
        self.agents: dict[str, set[str]] = {}          # card -> agents referencing it
        self.parent: dict[str, str | None] = {}

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def ordered(self, cards) -> list[str]:
        """Cards in an order that replays identically: card ids are random, so sort by token sequence."""
        return sorted(cards, key=lambda c: self.seq[c])

    def live(self) -> set[str]:
        """Cards with agents, and every card their parent chains need."""
        out: set[str] = set()
        for c, agents in self.agents.items():
            while agents and c is not None and c not in out:
                out.add(c)
                c = self.parent[c]
        return out

    def expected_match(self, query: tuple[int, ...], agent: str | None) -> int:
        best = 0
        for c in self.live():
            if agent is not None and agent not in self.agents[c]:
                continue
            s, common = self.seq[c], lcp(query, self.seq[c])
            best = max(best, len(s) if common == len(s) else common // B * B)
        return best

    @rule(agent=st.sampled_from(AGENTS), seq=st.sampled_from(SEQS))
    def put(self, agent: str, seq: tuple[int, ...]) -> None:
        toks = np.array(seq)
        expect_parent = self.expected_match(seq, None)
        cid = self.store.put(kv_for(toks), toks, IDENT, agent=agent)
        if cid in self.seq:
            assert self.seq[cid] == seq and cid in self.live()
        else:
            info = {c.card_id: c for c in self.store.cards()}[cid]
            assert info.parent_tokens == expect_parent  # reuses the longest cached prefix
            assert (info.parent is None) == (expect_parent == 0)
            if info.parent is not None:
                assert self.seq[info.parent][:expect_parent] == seq[:expect_parent]
            self.seq[cid], self.agents[cid], self.parent[cid] = seq, set(), info.parent
        self.agents[cid].add(agent)

    @rule(agent=st.sampled_from(AGENTS + [None]), seq=st.sampled_from(SEQS), extra=st.sampled_from([(), (1,), (7, 7)]))
    def match(self, agent: str | None, seq: tuple[int, ...], extra: tuple[int, ...]) -> None:
        query = seq + extra
        m = self.store.match(np.array(query), IDENT, agent=agent)
        want = self.expected_match(query, agent)
        assert (m.tokens if m else 0) == want, (m, want)
        if m is not None:
            assert self.seq[m.card_id][:m.tokens] == query[:m.tokens]
            assert self.store.load(m).equal(kv_for(np.array(query[:m.tokens])))

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        c = data.draw(st.sampled_from(self.ordered(self.live())))
        assert tuple(self.store.tokens_of(c).tolist()) == self.seq[c]
        assert self.store.load(c).equal(kv_for(np.array(self.seq[c])))

    @precondition(lambda self: any(self.agents.values()))
    @rule(data=st.data(), everyone=st.booleans())
    def delete(self, data: st.DataObject, everyone: bool) -> None:
        c = data.draw(st.sampled_from(self.ordered(c for c, a in self.agents.items() if a)))
        agent = None if everyone else data.draw(st.sampled_from(sorted(self.agents[c])))
        before = self.live()
        freed = self.store.delete(c, agent=agent)
        self.agents[c] = set() if agent is None else self.agents[c] - {agent}
        assert set(freed) == before - self.live()

    @precondition(lambda self: any(self.agents.values()))
    @rule(data=st.data(), to=st.sampled_from(AGENTS))
    def handoff(self, data: st.DataObject, to: str) -> None:
        c = data.draw(st.sampled_from(self.ordered(c for c, a in self.agents.items() if a)))
        self.store.handoff(c, to)
        self.agents[c].add(to)

    @rule(agent=st.sampled_from(AGENTS))
    def drop_agent(self, agent: str) -> None:
        before = self.live()
        freed = self.store.drop_agent(agent)
        for a in self.agents.values():
            a.discard(agent)
        assert set(freed) == before - self.live()

    @rule()
    def reindex(self) -> None:
        before = [(c.card_id, c.agents, c.total, c.parent) for c in self.store.cards()]
        self.store.reindex()
        assert [(c.card_id, c.agents, c.total, c.parent) for c in self.store.cards()] == before

    @rule()
    def gc(self) -> None:
        rep = self.store.gc(grace_s=0)
        assert not (rep.freed or rep.orphans_deleted or rep.adopted or rep.lost or rep.refs_fixed)

    @invariant()
    def index_matches_model(self) -> None:
        if not hasattr(self, "store"):
            return
        got = {c.card_id: set(c.agents) for c in self.store.cards()}
        assert got == {c: self.agents[c] for c in self.live()}
        for c in set(self.seq) - self.live():
            try:
                self.store.load(c)
                raise AssertionError(f"removed card {c} still loads")
            except CardNotFoundError:
                pass


def _machine(name: str) -> type:
    """The state machine's test case on backend ``name`` (skipped where the backend is not available)."""
    backend = BACKENDS[name]
    machine = type(f"StoreModel_{name}", (StoreModel,), {"backend": backend})
    case = machine.TestCase
    case.settings = settings(max_examples=20, stateful_step_count=15, deadline=None)
    why = backend.available()
    return pytest.mark.skipif(bool(why), reason=why or "")(case)


for _name in BACKENDS:
    globals()[f"test_store_model_{_name}"] = _machine(_name)
