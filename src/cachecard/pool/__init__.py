"""The hot tier (DESIGN.md §4 "Hot tier"): agents' KV resident in quantized fixed-size token blocks under a
byte budget, shared prefixes held once, eviction to and reload from a ``cachecard.Store``, and batched
inference over the pool.

- :class:`BlockPool`: the blocks, agents' block tables, budget, eviction (``pool.py``).
- :class:`ResidentCodec`: how a vector is held (``codecs.py``).
- :class:`Session`: agents stepping together, the runtime-neutral batch layout (``session.py``).
- ``cachecard.pool.hf.PoolCache``: a transformers ``Cache`` over a pool (imports torch and transformers).
- ``cachecard.pool.mlx.MLXPoolCache``: the same over mlx-lm's quantized attention (imports mlx).
"""

from cachecard.pool.codecs import RESIDENT_CODECS, ResidentCodec
from cachecard.pool.pool import UNKNOWN, AgentInfo, BlockPool, PoolEvent
from cachecard.pool.session import Feed, Session

__all__ = ["AgentInfo", "BlockPool", "Feed", "PoolEvent", "RESIDENT_CODECS", "ResidentCodec", "Session", "UNKNOWN"]
