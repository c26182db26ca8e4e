"""The Lua scripts of the Redis index backend (:mod:`cachecard.kvstore.redis_index`): each index transaction is
one script, so Redis runs it atomically and card records, block and tail entries, references, owners, children,
pins, access times and counters never disagree.

Every script takes ``KEYS[1]`` = the namespace's meta hash and ``ARGV[1..3]`` = (store id, key base, target
generation or ""); it refuses to run (``CCLOST``) when the meta hash does not name this store: the index was
flushed, lost on a restart without persistence, or claimed by another store. Keys of one generation:

=================== ============================== =====================================================
key (after base)    type                           content
=================== ============================== =====================================================
``meta``            hash                           store_id, block_tokens, version, gen, building, store
``<g>:c:<id>``      string                         the card's JSON record (CardRecord.to_json)
``<g>:cb:<id>``     string                         its block hashes, concatenated (16 bytes each)
``<g>:b:<hash>``    sorted set (all scores 0)      card ids holding the block (16 bytes; byte order)
``<g>:t:<hash>``    sorted set (all scores 0)      card id (16) || u32 LE tail length || tail hash (16)
``<g>:rs:<agent>``  set                            card ids the agent references
``<g>:o:<id>``      set                            agents referencing the card
``<g>:ch:<id>``     set                            cards continuing the card (committed, or pinned by a put)
``<g>:cards``       set                            every indexed card id
``<g>:agents``      set                            every agent holding a reference
``<g>:pending``     hash                           card id -> JSON {parent, agent, time} of a put in progress
``<g>:atime``       sorted set                     card id -> last access (Redis server clock)
``<g>:n``           hash                           counters: cards, blocks, tails, refs, bytes, tokens, total
=================== ============================== =====================================================

``reindex`` builds a new generation beside the live one and switches ``meta.gen`` in one step, so other nodes
keep serving the old index until the new one is complete.
"""

from __future__ import annotations

PRELUDE = r"""
local meta = KEYS[1]
local head = redis.call('HMGET', meta, 'store_id', 'gen', 'building')
if head[1] ~= ARGV[1] then
  return redis.error_reply('CCLOST ' .. tostring(head[1]))
end
local gen = head[2]
if ARGV[3] ~= '' then
  if ARGV[3] ~= head[3] then return redis.error_reply('CCSUPERSEDED another reindex started') end
  gen = ARGV[3]
end
local P = ARGV[2] .. gen .. ':'
local N = P .. 'n'  -- counters; decrements are written 0 - x: Lua's -0 would reach HINCRBY as "-0", refused
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function unhex(s)
  return (string.gsub(s, '..', function(cc) return string.char(tonumber(cc, 16)) end))
end
local function add_ref(a, id)
  redis.call('HINCRBY', N, 'refs', redis.call('SADD', P .. 'rs:' .. a, id))
  redis.call('SADD', P .. 'o:' .. id, a)
  redis.call('SADD', P .. 'agents', a)
end
"""

# ARGV[4] agent or '', [5] codec k or '', [6] codec v, [7] query tokens, [8] B, [9] model_key[:16], [10] hashes.
# Returns {blocks matched, holder of the last matched block or nil, tail entries (36 bytes) that fit and are visible}.
MATCH = r"""
local agent, ck, cv = ARGV[4], ARGV[5], ARGV[6]
local ntok, B, H = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[10]
local function visible(c)
  if agent ~= '' and redis.call('SISMEMBER', P .. 'rs:' .. agent, c) == 0 then return false end
  if ck ~= '' then
    local raw = redis.call('GET', P .. 'c:' .. c)
    if not raw then return false end
    local rec = cjson.decode(raw)
    if rec.codecs[1] ~= ck or rec.codecs[2] ~= cv then return false end
  end
  return true
end
local function holder(i)
  local key = P .. 'b:' .. string.sub(H, (i - 1) * 16 + 1, i * 16)
  if agent == '' and ck == '' then return redis.call('ZRANGE', key, 0, 0)[1] end
  local start = 0
  while true do
    local page = redis.call('ZRANGE', key, start, start + 127)
    if #page == 0 then return nil end
    for _, c in ipairs(page) do if visible(c) then return c end end
    start = start + 128
  end
end
local lo, hi, best = 0, #H / 16, false
while lo < hi do
  local mid = math.floor((lo + hi + 1) / 2)
  local c = holder(mid)
  if c then lo, best = mid, c else hi = mid - 1 end
end
local tkey = ARGV[9]
if lo > 0 then tkey = string.sub(H, (lo - 1) * 16 + 1, lo * 16) end
local out = {lo, best}
for _, m in ipairs(redis.call('ZRANGE', P .. 't:' .. tkey, 0, -1)) do
  local t = struct.unpack('<I4', string.sub(m, 17, 20))
  if lo * B + t <= ntok and visible(string.sub(m, 1, 16)) then table.insert(out, m) end
end
return out
"""

# ARGV[4] new id, [5] parent id or '', [6] parent hex or '', [7] agent. 0 when the parent is gone.
PLAN = r"""
local new, parent = ARGV[4], ARGV[5]
if parent ~= '' then
  if redis.call('EXISTS', P .. 'c:' .. parent) == 0 then return 0 end
  redis.call('SADD', P .. 'ch:' .. parent, new)
end
local doc = {agent = ARGV[7], time = now(), parent = cjson.null}
if parent ~= '' then doc.parent = ARGV[6] end
redis.call('HSET', P .. 'pending', new, cjson.encode(doc))
return 1
"""

# ARGV[4] id, [5] parent id or ''.
ABANDON = r"""
if redis.call('EXISTS', P .. 'c:' .. ARGV[4]) == 1 then return 0 end
redis.call('HDEL', P .. 'pending', ARGV[4])
if ARGV[5] ~= '' then redis.call('SREM', P .. 'ch:' .. ARGV[5], ARGV[4]) end
return 1
"""

# ARGV[4] only_new ('1' or ''), then per card 11 fields: id, record, blocks, tail key or '', tail entry or '',
# parent id or '', agents joined by '/', atime or '', bytes, tokens, total. Returns the ids committed.
COMMIT = r"""
local t0 = now()
local done = {}
for i = 5, #ARGV, 11 do
  local id, blocks, tkey, parent, agents, atime = ARGV[i], ARGV[i + 2], ARGV[i + 3], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local exists = redis.call('EXISTS', P .. 'c:' .. id) == 1
  if not (exists and ARGV[4] == '1') then
    if not exists then
      redis.call('HINCRBY', N, 'cards', 1)
      redis.call('HINCRBY', N, 'bytes', ARGV[i + 8])
      redis.call('HINCRBY', N, 'tokens', ARGV[i + 9])
      redis.call('HINCRBY', N, 'total', ARGV[i + 10])
    end
    redis.call('SET', P .. 'c:' .. id, ARGV[i + 1])
    redis.call('SET', P .. 'cb:' .. id, blocks)
    redis.call('SADD', P .. 'cards', id)
    local nb = 0
    for j = 1, #blocks, 16 do nb = nb + redis.call('ZADD', P .. 'b:' .. string.sub(blocks, j, j + 15), 0, id) end
    redis.call('HINCRBY', N, 'blocks', nb)
    if tkey ~= '' then redis.call('HINCRBY', N, 'tails', redis.call('ZADD', P .. 't:' .. tkey, 0, ARGV[i + 4])) end
    if parent ~= '' then redis.call('SADD', P .. 'ch:' .. parent, id) end
    for a in string.gmatch(agents, '[^/]+') do add_ref(a, id) end
    local at = t0
    if atime ~= '' then at = tonumber(atime) end
    redis.call('ZADD', P .. 'atime', at, id)
    redis.call('HDEL', P .. 'pending', id)
    table.insert(done, id)
  end
end
return done
"""

# ARGV[4] agent, [5] id. 0 when the card is not indexed.
ADD_REF = r"""
if redis.call('EXISTS', P .. 'c:' .. ARGV[5]) == 0 then return 0 end
add_ref(ARGV[4], ARGV[5])
redis.call('ZADD', P .. 'atime', now(), ARGV[5])
return 1
"""

# ARGV[4..]: agent, id, agent, id, ...
REMOVE_REFS = r"""
for i = 4, #ARGV, 2 do
  local a, id = ARGV[i], ARGV[i + 1]
  redis.call('HINCRBY', N, 'refs', 0 - redis.call('SREM', P .. 'rs:' .. a, id))
  redis.call('SREM', P .. 'o:' .. id, a)
  if redis.call('SCARD', P .. 'rs:' .. a) == 0 then redis.call('SREM', P .. 'agents', a) end
end
return 1
"""

# ARGV[4] id. Returns the record removed, or nil when in use or not indexed.
UNINDEX = r"""
local id = ARGV[4]
local raw = redis.call('GET', P .. 'c:' .. id)
if not raw then return false end
if redis.call('SCARD', P .. 'o:' .. id) > 0 or redis.call('SCARD', P .. 'ch:' .. id) > 0 then return false end
local rec = cjson.decode(raw)
local blocks = redis.call('GET', P .. 'cb:' .. id) or ''
local nb = 0
for j = 1, #blocks, 16 do nb = nb + redis.call('ZREM', P .. 'b:' .. string.sub(blocks, j, j + 15), id) end
redis.call('HINCRBY', N, 'blocks', 0 - nb)
if type(rec.tail) == 'table' then
  local entry = id .. struct.pack('<I4', rec.tail[2]) .. unhex(rec.tail[3])
  redis.call('HINCRBY', N, 'tails', 0 - redis.call('ZREM', P .. 't:' .. unhex(rec.tail[1]), entry))
end
if rec.parent ~= cjson.null then redis.call('SREM', P .. 'ch:' .. unhex(rec.parent), id) end
redis.call('DEL', P .. 'c:' .. id, P .. 'cb:' .. id, P .. 'o:' .. id, P .. 'ch:' .. id)
redis.call('SREM', P .. 'cards', id)
redis.call('ZREM', P .. 'atime', id)
redis.call('HDEL', P .. 'pending', id)
redis.call('HINCRBY', N, 'cards', -1)
redis.call('HINCRBY', N, 'bytes', 0 - rec.bytes)
redis.call('HINCRBY', N, 'tokens', 0 - rec.tokens)
redis.call('HINCRBY', N, 'total', 0 - (rec.start + rec.tokens))
return raw
"""

# ARGV[4..] ids: end their puts in progress (and parent pins) when they never committed.
UNPIN = r"""
for i = 4, #ARGV do
  local id = ARGV[i]
  local raw = redis.call('HGET', P .. 'pending', id)
  if raw and redis.call('EXISTS', P .. 'c:' .. id) == 0 then
    local p = cjson.decode(raw)
    if p.parent ~= cjson.null then redis.call('SREM', P .. 'ch:' .. unhex(p.parent), id) end
    redis.call('HDEL', P .. 'pending', id)
  end
end
return 1
"""

# ARGV[4] id, [5] resolution in seconds.
TOUCH = r"""
local t = now()
local last = redis.call('ZSCORE', P .. 'atime', ARGV[4])
if last and t - tonumber(last) < tonumber(ARGV[5]) then return 0 end
if redis.call('EXISTS', P .. 'c:' .. ARGV[4]) == 0 then return 0 end
redis.call('ZADD', P .. 'atime', t, ARGV[4])
return 1
"""

# ARGV[4] what, then arguments. Read-only views of one generation.
READ = r"""
local what = ARGV[4]
if what == 'record' then return redis.call('GET', P .. 'c:' .. ARGV[5]) end
if what == 'ids' then return redis.call('SMEMBERS', P .. 'cards') end
if what == 'agent_ids' then return redis.call('SMEMBERS', P .. 'rs:' .. ARGV[5]) end
if what == 'owners' then return redis.call('SMEMBERS', P .. 'o:' .. ARGV[5]) end
if what == 'children' then return redis.call('SMEMBERS', P .. 'ch:' .. ARGV[5]) end
if what == 'has_ref' then return redis.call('SISMEMBER', P .. 'rs:' .. ARGV[5], ARGV[6]) end
if what == 'pending' then return redis.call('HGETALL', P .. 'pending') end
if what == 'counters' then return redis.call('HGETALL', N) end
if what == 'atimes' then return redis.call('ZRANGE', P .. 'atime', 0, -1, 'WITHSCORES') end
if what == 'now' then return tostring(now()) end
if what == 'agents' then
  local out = {}
  for _, a in ipairs(redis.call('SMEMBERS', P .. 'agents')) do
    table.insert(out, a)
    table.insert(out, redis.call('SCARD', P .. 'rs:' .. a))
  end
  return out
end
if what == 'refs' then
  local out = {}
  for _, a in ipairs(redis.call('SMEMBERS', P .. 'agents')) do
    table.insert(out, {a, redis.call('SMEMBERS', P .. 'rs:' .. a)})
  end
  return out
end
if what == 'records' then
  local out = {}
  for i = 5, #ARGV do table.insert(out, redis.call('GET', P .. 'c:' .. ARGV[i]) or '') end
  return out
end
if what == 'rows' then
  local out = {}
  for i = 5, #ARGV do
    local id = ARGV[i]
    table.insert(out, {redis.call('GET', P .. 'c:' .. id) or '', redis.call('SMEMBERS', P .. 'o:' .. id),
                       redis.call('SCARD', P .. 'ch:' .. id), redis.call('ZSCORE', P .. 'atime', id) or '0'})
  end
  return out
end
return redis.error_reply('unknown read ' .. what)
"""

# No prelude. ARGV[1] store id, [2] block tokens, [3] version, [4] store label. Claims an empty namespace;
# returns the meta hash as it is after the call.
BIND = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'store_id', ARGV[1], 'block_tokens', ARGV[2], 'version', ARGV[3], 'gen', '0',
             'building', '', 'store', ARGV[4])
end
return redis.call('HGETALL', KEYS[1])
"""

# No prelude. ARGV as BIND. Starts a new generation for a rebuild; claims the namespace if it was lost.
# Returns {new generation, live generation}.
NEW_GEN = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'store_id', ARGV[1], 'block_tokens', ARGV[2], 'version', ARGV[3], 'gen', '0',
             'building', '', 'store', ARGV[4])
elseif redis.call('HGET', KEYS[1], 'store_id') ~= ARGV[1] then
  return redis.error_reply('CCLOST ' .. tostring(redis.call('HGET', KEYS[1], 'store_id')))
end
local live = tonumber(redis.call('HGET', KEYS[1], 'gen'))
local g = redis.call('HINCRBY', KEYS[1], 'next_gen', 1)
if g <= live then
  g = live + 1
  redis.call('HSET', KEYS[1], 'next_gen', g)
end
redis.call('HSET', KEYS[1], 'building', tostring(g))
return {g, live}
"""

# No prelude. ARGV[1] store id, [2] the generation built. Makes it live, unless another rebuild started since.
SWITCH = r"""
if redis.call('HGET', KEYS[1], 'store_id') ~= ARGV[1] then return redis.error_reply('CCLOST switch') end
if redis.call('HGET', KEYS[1], 'building') ~= ARGV[2] then
  return redis.error_reply('CCSUPERSEDED another reindex started')
end
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'building', '')
return 1
"""

WITH_PRELUDE = {"match": MATCH, "plan": PLAN, "abandon": ABANDON, "commit": COMMIT, "add_ref": ADD_REF,
                "remove_refs": REMOVE_REFS, "unindex": UNINDEX, "unpin": UNPIN, "touch": TOUCH, "read": READ}
STANDALONE = {"bind": BIND, "new_gen": NEW_GEN, "switch": SWITCH}

__all__ = ["PRELUDE", "STANDALONE", "WITH_PRELUDE"]
