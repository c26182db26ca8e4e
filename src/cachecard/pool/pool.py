"""A block pool of resident agents (DESIGN.md §4 "Hot tier").

Agents' KV lives in fixed-size token blocks of one resident codec under a byte budget; each agent has a block
table. Blocks of a prefix several agents share (same model, tokens and codec) are held once (``blocks.py``);
an agent that writes into a block others still reference gets its own copy first (copy on write). When the
budget is exceeded the least recently used agent that is not pinned (in use by a batch) is evicted: its
tokens that the store lacks are written there first (``persist.py``), then its blocks are released. A block
another resident agent references stays. An evicted agent comes back on its next use: shared blocks still
resident are referenced again, the rest is read from its cards; without a store (or for tokens the store
lacks) the tokens are recomputed, which a batch does by feeding them again ("re-prefill").

Every method takes the pool's lock, so one pool may be used from several threads; agents that a batch uses
are pinned for its lifetime and are never evicted under it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from cachecard.errors import CacheCardError, PoolBudgetError, PoolError, UnknownAgentError
from cachecard.identity import check_identity
from cachecard.kvstore import index as ix
from cachecard.kvstore.names import check_agent
from cachecard.manifest import ModelIdentity
from cachecard.pool import persist, residency
from cachecard.pool.arena import NumpyArena, TorchArena
from cachecard.pool.blocks import BlockAllocator, chain, root_hash
from cachecard.pool.codecs import ResidentCodec

UNKNOWN = -1  # a token whose id the pool has not been told yet (generated inside model.generate)


@dataclass
class _Agent:
    name: str
    ids: list[int] = field(default_factory=list)      # tokens whose KV the pool holds (or held, when evicted)
    pending: list[int] = field(default_factory=list)  # known tokens without KV yet: fed before the next ones
    blocks: list[int] = field(default_factory=list)   # block table, while resident
    resident: bool = True
    pins: int = 0
    busy: bool = False                                # in the middle of a forward (its KV is being written)
    used: int = 0                                     # LRU clock value of the last use
    card_id: str | None = None                        # the agent's latest card in the store
    stored: int = 0                                   # leading tokens of `ids` that card holds
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of its leading full blocks


@dataclass(frozen=True)
class AgentInfo:
    name: str
    tokens: int           # tokens with KV (resident or in the store)
    pending: int          # tokens to compute before the next ones
    resident: bool
    pinned: bool
    blocks: int
    bytes: float          # resident bytes, a shared block counted as its share (block bytes / references)
    card_id: str | None
    stored: int


@dataclass(frozen=True)
class PoolEvent:
    kind: str             # "evict", "reload", "reprefill", "evict_failed"
    agent: str
    tokens: int
    seconds: float = 0.0
    detail: str = ""


class BlockPool:
    """Agents' KV resident in quantized token blocks under a byte budget.

    Parameters
    ----------
    identity
        The model's identity (``hf.model_identity`` / ``mlx.model_identity``); agents and cards of another
        model are refused.
    budget_bytes
        Bytes of resident blocks (the arena is allocated once, at this size rounded down to whole blocks).
    codec
        Resident codec: ``q4`` (MLX affine 4-bit), ``turbo4`` (rotation + 4-bit Lloyd-Max), ``q4_0``, ``q8_0``,
        ``mlx8``, ``fp16``, ``bf16``, ``fp32``.
    block_tokens
        Tokens per block (the unit of allocation and of prefix sharing).
    store
        Where evicted agents go and come back from (``cachecard.Store``); None: evicted agents are recomputed.
    share_prefixes
        Hold full blocks of a shared prefix once.
    backend
        ``torch`` (a tensor on ``device``) or ``numpy`` (host memory; the MLX path).
    scale_dtype
        Element type of the MLX affine scales (see :class:`ResidentCodec`).
    """

    def __init__(self, identity: ModelIdentity, *, budget_bytes: int, codec: str = "q4", block_tokens: int = 16,
                 store: Any = None, share_prefixes: bool = True, backend: str = "torch", device: Any = "cpu",
                 scale_dtype: str = "float16") -> None:
        if any(k.attention != "full" for k in identity.layer_kinds):
            raise PoolError("the pool holds every token of every layer and batches full attention only; this "
                            "model has sliding-window layers")
        if not isinstance(block_tokens, int) or not 1 <= block_tokens <= 4096:
            raise PoolError(f"block_tokens must be an integer in [1, 4096]; got {block_tokens!r}")
        self.identity = identity
        self.codec = ResidentCodec(codec, identity.head_dim, scale_dtype=scale_dtype)
        self.card_identity = identity.model_copy(update={"kv_dtype": self.codec.card_dtype})
        self.block_tokens = block_tokens
        self.block_bytes = 2 * identity.num_layers * identity.num_kv_heads * block_tokens * self.codec.row_bytes
        blocks = int(budget_bytes) // self.block_bytes
        if blocks < 1:
            raise PoolBudgetError(f"a budget of {budget_bytes} bytes holds no block: one block of {block_tokens} "
                                  f"tokens takes {self.block_bytes} bytes with codec {self.codec.describe()}; "
                                  "raise budget_bytes or lower block_tokens")
        self.budget_bytes = int(budget_bytes)
        shape = (identity.num_layers, blocks, identity.num_kv_heads, block_tokens, self.codec.row_bytes)
        if backend == "torch":
            self.arena: Any = TorchArena(*shape, device=device)
        elif backend == "numpy":
            self.arena = NumpyArena(*shape)
        else:
            raise PoolError(f"backend must be 'torch' or 'numpy'; got {backend!r}")
        self.backend = backend
        self.alloc = BlockAllocator(blocks)
        self.store = store
        self.share_prefixes = share_prefixes
        self._root = root_hash(ix.model_key(self.card_identity), self.codec.name, block_tokens)
        self._agents: dict[str, _Agent] = {}
        self._clock = 0
        self.lock = threading.RLock()
        self.events: deque[PoolEvent] = deque(maxlen=10_000)
        self.counts = {"evictions": 0, "reloads": 0, "reprefills": 0, "evict_failures": 0, "tokens_reloaded": 0,
                       "tokens_recomputed": 0, "tokens_shared": 0}

    # -- agents ----------------------------------------------------------------------------------------------
    def add(self, agent: str, *, identity: ModelIdentity | None = None) -> None:
        """A new agent with no tokens yet. ``identity`` (the model it runs on) must be the pool's."""
        check_agent(agent)
        if identity is not None:
            check_identity(identity, self.identity, what=f"agent {agent!r}")
        with self.lock:
            if agent in self._agents:
                raise PoolError(f"agent {agent!r} is already in the pool")
            self._agents[agent] = _Agent(agent, used=self._tick())

    def attach(self, agent: str, *, identity: ModelIdentity | None = None) -> AgentInfo:
        """Bring back an agent from the store (after a restart, or one handed off to it): its longest card of
        this model and codec; the KV is read on first use."""
        check_agent(agent)
        if identity is not None:
            check_identity(identity, self.identity, what=f"agent {agent!r}")
        if self.store is None:
            raise PoolError("attach needs a pool with a store")
        with self.lock:
            if agent in self._agents:
                raise PoolError(f"agent {agent!r} is already in the pool")
            card_id = persist.latest_card(self.store, agent, self)
            ids = self.store.tokens_of(card_id).astype(np.int64).tolist()
            self._agents[agent] = _Agent(agent, ids=ids, resident=False, used=self._tick(), card_id=card_id,
                                         stored=len(ids))
            return self.info(agent)

    def fork(self, src: str, dst: str) -> None:
        """``dst`` continues ``src``'s sequence, sharing its blocks (copy on write)."""
        check_agent(dst)
        with self.lock:
            a = self._get(src)
            self._check_idle(a, "forked")
            self._check_known(a)  # ids generate() produced and record() was not told would be unknown twice
            if dst in self._agents:
                raise PoolError(f"agent {dst!r} is already in the pool")
            b = _Agent(dst, ids=list(a.ids), pending=list(a.pending), blocks=list(a.blocks), resident=a.resident,
                       used=self._tick(), hashes=list(a.hashes))
            if a.resident:
                self.alloc.incref(b.blocks)
            self._agents[dst] = b

    def drop(self, agent: str) -> None:
        """Forget an agent (its blocks are released; the store is not touched)."""
        with self.lock:
            a = self._get(agent)
            if a.pins:
                raise PoolError(f"agent {agent!r} is in use by a batch; close the batch first")
            self._release(a)
            del self._agents[agent]

    def persist(self, agent: str) -> str:
        """Write the agent's tokens that the store lacks; return the card id that holds its sequence."""
        with self.lock:
            a = self._get(agent)
            self._require_store("persist")
            self._check_idle(a, "persisted")
            if not a.ids:
                raise PoolError(f"agent {agent!r} has no tokens with KV yet; run a turn first")
            if not a.resident:
                if a.card_id is None or a.stored < len(a.ids):
                    raise PoolError(f"agent {agent!r} is not resident and the store lacks some of its tokens")
                return a.card_id
            self._check_known(a)
            if a.card_id is None or a.stored < len(a.ids):
                a.card_id, a.stored = persist.write_agent(self, a), len(a.ids)
            return a.card_id

    def evict(self, agent: str) -> None:
        """Evict an agent now (persisting it first when the pool has a store)."""
        with self.lock:
            a = self._get(agent)
            if a.pins:
                raise PoolError(f"agent {agent!r} is in use by a batch and cannot be evicted")
            if a.resident and not self._evict(a):
                raise PoolError(f"agent {agent!r} could not be written to the store, so it stays resident: "
                                f"{self.events[-1].detail}")

    # -- reading the state -----------------------------------------------------------------------------------
    def agents(self) -> list[str]:
        with self.lock:
            return list(self._agents)

    def resident(self) -> list[str]:
        with self.lock:
            return [a.name for a in self._agents.values() if a.resident]

    def tokens(self, agent: str) -> np.ndarray:
        """Every token of the agent's sequence: those with KV, then pending ones."""
        with self.lock:
            a = self._get(agent)
            return np.asarray(a.ids + a.pending, dtype=np.int64)

    def info(self, agent: str) -> AgentInfo:
        with self.lock:
            a = self._get(agent)
            share = sum(self.block_bytes / self.alloc.refs[b] for b in a.blocks) if a.resident else 0.0
            return AgentInfo(a.name, len(a.ids), len(a.pending), a.resident, a.pins > 0, len(a.blocks), share,
                             a.card_id, a.stored)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            used = self.alloc.used()
            resident = [a for a in self._agents.values() if a.resident]
            return {"codec": self.codec.describe(), "budget_bytes": self.budget_bytes, "block_bytes": self.block_bytes,
                    "blocks": self.alloc.total, "blocks_used": used, "blocks_shared": self.alloc.shared(),
                    "blocks_cached": self.alloc.cached(), "bytes_used": used * self.block_bytes,
                    "agents": len(self._agents), "resident": len(resident),
                    "pinned": sum(1 for a in resident if a.pins), **self.counts}

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_tokens)

    # -- internals used by batches (cachecard.pool.session) --------------------------------------------------
    def _get(self, agent: str) -> _Agent:
        try:
            return self._agents[agent]
        except KeyError:
            raise UnknownAgentError(f"the pool holds no agent {agent!r} (agents: {sorted(self._agents)[:20]}); "
                                    "add it with pool.add() or pool.attach()") from None

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _require_store(self, what: str) -> None:
        if self.store is None:
            raise PoolError(f"{what} needs a pool with a store")

    def _check_idle(self, a: _Agent, what: str) -> None:
        if a.busy:
            raise PoolError(f"agent {a.name!r} is in the middle of a forward in another thread; it can be {what} "
                            "between forwards")

    def _check_known(self, a: _Agent) -> None:
        if UNKNOWN in a.ids:
            raise PoolError(f"agent {a.name!r} holds tokens whose ids the pool was not told (generated inside "
                            "model.generate): pass the output to the batch's record() first")

    def _slots(self, a: _Agent, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(block, offset) of tokens ``[start, start + count)`` of a resident agent."""
        pos = np.arange(start, start + count)
        return np.asarray(a.blocks, dtype=np.int64)[pos // self.block_tokens], pos % self.block_tokens

    def _pin(self, names: Sequence[str]) -> list[_Agent]:
        with self.lock:
            agents = [self._get(n) for n in names]
            if len(set(names)) != len(names):
                raise PoolError(f"a batch needs distinct agents; got {list(names)}")
            busy = [a.name for a in agents if a.pins]
            if busy:  # two batches appending to one agent would interleave its tokens
                raise PoolError(f"agents {busy} are in use by another batch (one batch per agent at a time); close "
                                "that batch first")
            for a in agents:
                a.pins += 1
                a.used = self._tick()
            return agents

    def _unpin(self, agents: Iterable[_Agent]) -> None:
        with self.lock:
            for a in agents:
                a.pins -= 1
                a.used = self._tick()
                self._register(a)

    def _prepare(self, agents: Sequence[_Agent], new: Sequence[list[int]], reserve: int) -> None:
        """Add ``new[i]`` to each agent's pending tokens and make the agents resident with room for their
        pending tokens and ``reserve`` more, evicting others as needed. An agent alone larger than the budget,
        or a batch larger than it, is refused before anything is evicted; on any failure the new tokens are
        taken back and nothing resident is lost."""
        with self.lock:
            totals = [len(a.ids) + len(a.pending) + len(n) + reserve for a, n in zip(agents, new)]
            for a, t in zip(agents, totals):
                if self.blocks_for(t) > self.alloc.total:
                    raise PoolBudgetError(
                        f"agent {a.name!r} needs {t} tokens resident ({self.blocks_for(t)} blocks of "
                        f"{self.block_tokens}, {self.blocks_for(t) * self.block_bytes} bytes with "
                        f"{self.codec.describe()}); the budget holds {self.alloc.total} blocks "
                        f"({self.budget_bytes} bytes). Raise budget_bytes or use a smaller resident codec")
            held: set[int] = set()  # blocks the batch will hold, each counted once (shared prefixes)
            extra = 0
            for a, t, n in zip(agents, totals, new):
                have = a.blocks if a.resident and a.ids else \
                    residency.shared_prefix(self, (a.ids + a.pending + n)[:-1])[0]
                held.update(have)
                extra += max(0, self.blocks_for(t) - len(have)) + (self._shared_in_write(a) if have is a.blocks else 0)
            if len(held) + extra > self.alloc.total:
                raise PoolBudgetError(f"the batch of {len(agents)} agents needs {len(held) + extra} blocks; the "
                                      f"budget holds {self.alloc.total}. Run fewer agents at once")
            for a, n in zip(agents, new):
                a.pending += n
            try:
                for a in agents:
                    self._register(a)
                    if not a.resident or not a.ids:
                        residency.make_resident(self, a, keep=agents)
                missing = sum(max(0, self.blocks_for(t) - len(a.blocks)) + self._shared_in_write(a)
                              for a, t in zip(agents, totals))
                self._make_room(missing, keep=agents)
            except BaseException:
                for a, n in zip(agents, new):
                    self._unfeed(a, len(n))
                raise

    def _unfeed(self, a: _Agent, n: int) -> None:
        """Take back the last ``n`` tokens fed to an agent (its pending tokens, or if sharing already made
        some of them resident, by releasing the agent: a non-resident agent's tokens are re-obtained on use)."""
        if n <= len(a.pending):
            del a.pending[len(a.pending) - n:]
            return
        seq = (a.ids + a.pending)[:len(a.ids) + len(a.pending) - n]
        self._release(a)
        a.ids, a.pending = seq, []
        a.hashes = a.hashes[:len(seq) // self.block_tokens]
        a.stored = min(a.stored, len(seq))

    def _shared_in_write(self, a: _Agent) -> int:
        """Blocks the agent's next tokens would be written into that another agent also holds (copy on write:
        each needs a fresh block). Only a partial last block can be one: full blocks are never written."""
        first = len(a.ids) // self.block_tokens
        return sum(1 for b in a.blocks[first:] if self.alloc.refs[b] > 1)

    def _append(self, a: _Agent, ids: list[int], keep: Sequence[_Agent]) -> tuple[np.ndarray, np.ndarray]:
        """Room for ``len(ids)`` more tokens of a resident agent (copy on write of every shared block in the
        range written, new blocks, evicting others if needed); returns their (block, offset) slots."""
        with self.lock:
            n0, bt = len(a.ids), self.block_tokens
            grow = self.blocks_for(n0 + len(ids)) - len(a.blocks)
            shared = [i for i in range(n0 // bt, len(a.blocks)) if self.alloc.refs[a.blocks[i]] > 1] if ids else []
            self._make_room(max(0, grow) + len(shared), keep=keep)
            for i in shared:
                (fresh,) = self.alloc.allocate(1)
                self.arena.copy_block(a.blocks[i], fresh)
                self.alloc.decref([a.blocks[i]])
                a.blocks[i] = fresh
            if grow > 0:
                a.blocks += self.alloc.allocate(grow)
            a.ids += ids
            return self._slots(a, n0, len(ids))

    def _register(self, a: _Agent) -> None:
        """Register the agent's newly full blocks whose tokens are all known, for sharing."""
        if not (self.share_prefixes and a.resident):
            return
        bt = self.block_tokens
        for i in range(len(a.hashes), len(a.ids) // bt):
            toks = a.ids[i * bt:(i + 1) * bt]
            if UNKNOWN in toks:
                return
            a.hashes.append(chain(a.hashes[-1] if a.hashes else self._root, np.asarray(toks)))
            self.alloc.register(a.blocks[i], a.hashes[-1])

    def _make_room(self, blocks: int, keep: Sequence[_Agent]) -> None:
        """Evict least recently used unpinned agents until ``blocks`` blocks are available."""
        tried: set[str] = set()
        while self.alloc.available() < blocks:
            victims = [a for a in self._agents.values() if a.resident and not a.pins and a not in keep
                       and a.name not in tried and a.blocks]
            if not victims:
                failed = [e for e in self.events if e.kind == "evict_failed" and e.agent in tried]
                why = f"; evictions that failed: {[f'{e.agent}: {e.detail}' for e in failed]}" if failed else ""
                raise PoolBudgetError(f"need {blocks} free blocks, {self.alloc.available()} are free and no other "
                                      f"agent can be evicted (the rest are in use by batches){why}")
            victim = min(victims, key=lambda a: a.used)
            tried.add(victim.name)
            self._evict(victim)

    def _evict(self, a: _Agent) -> bool:
        """Persist (with a store) and release an agent; False, and the agent stays resident, if the write
        fails (the failure is recorded in ``events``)."""
        t0 = time.perf_counter()
        try:
            self._check_known(a)  # an unknown id could be neither written nor recomputed
            if self.store is not None and a.ids and (a.card_id is None or a.stored < len(a.ids)):
                a.card_id, a.stored = persist.write_agent(self, a), len(a.ids)
        except (CacheCardError, OSError) as e:
            self.counts["evict_failures"] += 1
            self.events.append(PoolEvent("evict_failed", a.name, len(a.ids), time.perf_counter() - t0,
                                         f"{type(e).__name__}: {e}"))
            return False
        self._release(a)
        self.counts["evictions"] += 1
        self.events.append(PoolEvent("evict", a.name, len(a.ids), time.perf_counter() - t0,
                                     "to the store" if self.store is not None else "dropped (recompute on use)"))
        return True

    def _release(self, a: _Agent) -> None:
        if a.resident:
            self.alloc.decref(a.blocks)
        a.blocks, a.resident = [], False


__all__ = ["AgentInfo", "BlockPool", "PoolEvent", "UNKNOWN"]
