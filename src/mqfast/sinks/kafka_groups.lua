-- Consumer-group state of the Kafka engine, in Redis. Each script below is one atomic step;
-- this common part is prepended to each (kafka_groups.py splits the file at each marker).
--
-- Keys of group G and topic T (T has only [A-Za-z0-9._-], so the key parses from the right):
--   mq:{G}:st:T    hash "p:off" -> state (JSON, fields below)
--   mq:{G}:due:T   zset "p:off" by deadline (leased), due time (retry), retry time (dlq pending)
--   mq:{G}:done:T  zset "p:off" by completion time, for pruning
--   mq:{G}:pos:T   hash p -> committed offset (every offset below is complete)
--   mq:{G}:cur:T   hash "p:prio" -> next never-leased offset of that priority level
--   mq:{G}:ids     hash message id -> "T\np:off"
--   mq:cons:C      set "G\nT\np:off" of the leases consumer C may hold
--   mq:groups:T    set of groups that consumed T;  mq:pairs  set "G\nT"
-- State: s 1 leased | 2 retry | 3 done | 4 dead-letter pending; n deliveries; c consumer;
--   d deadline or due; l leased at; m message id; p priority; e last error; o outcome of a
--   done message that was not acknowledged (expired, dead-lettered); w dlq reason; x done at.
local G = ARGV[1]
local T = ARGV[2]
local function key(kind, g, t) return 'mq:{' .. g .. '}:' .. kind .. ':' .. t end
local function ids_key(g) return 'mq:{' .. g .. '}:ids' end
local function cons_key(c) return 'mq:cons:' .. c end
local function fld(p, off) return string.format('%d:%d', p, off) end
local function split(f)
  local p, o = string.match(f, '^(%d+):(%d+)$')
  return tonumber(p), tonumber(o)
end
local function num(n) return string.format('%d', n) end
local function load(g, t, f)
  local v = redis.call('HGET', key('st', g, t), f)
  if v then return cjson.decode(v) end
  return nil
end
local function save(g, t, f, s) redis.call('HSET', key('st', g, t), f, cjson.encode(s)) end
local function member(g, t, f) return g .. '\n' .. t .. '\n' .. f end
local function backoff(n, base, maxd, jitter)
  local e = math.min(math.max(n - 1, 0), 40)
  local b = math.min(maxd, base * (2 ^ e))
  return math.floor(b * (1 - jitter + 2 * jitter * math.random()))
end
local function mark_done(g, t, f, s, now, outcome)
  s.s = 3
  s.x = now
  s.o = outcome
  if s.c then redis.call('SREM', cons_key(s.c), member(g, t, f)) end
  s.c = nil
  save(g, t, f, s)
  redis.call('ZREM', key('due', g, t), f)
  redis.call('ZADD', key('done', g, t), now, f)
end
-- A failed delivery: a retry after backoff, or (at the limit) a dead letter for the caller.
local function fail(g, t, f, s, err, delay, now, pol, dead)
  if s.c then redis.call('SREM', cons_key(s.c), member(g, t, f)) end
  s.c = nil
  s.e = err
  if s.n >= pol.limit then
    s.s = 4
    s.w = 'failed'
    s.d = now + 30000
    table.insert(dead, {f, s.n, s.m, err, 'failed'})
  else
    s.s = 2
    s.d = now + (delay or backoff(s.n, pol.base, pol.max, pol.jitter))
  end
  save(g, t, f, s)
  redis.call('ZADD', key('due', g, t), s.d, f)
  return s.s == 4
end
-- Move the committed position past complete messages; returns it.
local function advance(g, t, p)
  local pos = key('pos', g, t)
  local c = tonumber(redis.call('HGET', pos, p))
  if not c then return nil end
  local start = c
  while true do
    local s = load(g, t, fld(p, c))
    if not s or s.s ~= 3 then break end
    c = c + 1
  end
  if c ~= start then redis.call('HSET', pos, p, num(c)) end
  return c
end
local function policy(i)
  return {limit = tonumber(ARGV[i]), base = tonumber(ARGV[i + 1]), max = tonumber(ARGV[i + 2]),
          jitter = tonumber(ARGV[i + 3])}
end

--@prepare
-- ARGV: G T now nparts init(json list, -1 unknown) lows(json list) consumer want count_held
--       limit base max jitter
-- Positions (created from init, raised to the log start), expired leases reclaimed, due
-- retries, pending dead letters, cursors, the consumer's live lease count, the next due time.
local now = tonumber(ARGV[3])
local nparts = tonumber(ARGV[4])
local init = cjson.decode(ARGV[5])
local lows = cjson.decode(ARGV[6])
local consumer = ARGV[7]
local want = tonumber(ARGV[8])
local pol = policy(10)
local pos = key('pos', G, T)
local positions = {}
for p = 0, nparts - 1 do
  local c = redis.call('HGET', pos, p)
  if not c then
    local i = init[p + 1]
    if i == nil or i < 0 then return cjson.encode({missing = true}) end
    c = i
    redis.call('HSET', pos, p, num(c))
  end
  c = tonumber(c)
  local lo = lows[p + 1]
  if lo ~= nil and lo > c then
    c = lo
    redis.call('HSET', pos, p, num(c))
  end
  positions[p + 1] = c
end
redis.call('SADD', 'mq:groups:' .. T, G)
redis.call('SADD', 'mq:pairs', G .. '\n' .. T)
local st = key('st', G, T)
local due = key('due', G, T)
local dead, retries = {}, {}
local reclaimed = 0
for _, f in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, 2000)) do
  local p, off = split(f)
  local s = load(G, T, f)
  if not s or s.s == 3 then
    redis.call('ZREM', due, f)
  elseif p >= nparts or off < positions[p + 1] then
    -- removed by retention: nothing left to deliver
    redis.call('ZREM', due, f)
    redis.call('HDEL', st, f)
    if s.m then redis.call('HDEL', ids_key(G), s.m) end
    if s.c then redis.call('SREM', cons_key(s.c), member(G, T, f)) end
  elseif s.s == 1 then
    reclaimed = reclaimed + 1
    fail(G, T, f, s, 'lease expired', nil, now, pol, dead)
  elseif s.s == 4 then
    -- a dead letter whose writer did not finish (crash, Kafka down): hand it out again
    s.d = now + 30000
    save(G, T, f, s)
    redis.call('ZADD', due, s.d, f)
    table.insert(dead, {f, s.n, s.m, s.e or '', s.w or 'failed'})
  elseif s.s == 2 and #retries < want * 4 then
    table.insert(retries, {p, off, s.n, s.p})
  end
end
local held = 0
if ARGV[9] == '1' then
  local ck = cons_key(consumer)
  for _, mem in ipairs(redis.call('SMEMBERS', ck)) do
    local g, t, f = string.match(mem, '^(.-)\n(.-)\n(.*)$')
    local s = g and load(g, t, f)
    if s and s.s == 1 and s.c == consumer and s.d > now then
      held = held + 1
    else
      redis.call('SREM', ck, mem)
    end
  end
end
local nd = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
return cjson.encode({pos = positions, cur = redis.call('HGETALL', key('cur', G, T)),
                     retries = retries, dead = dead, reclaimed = reclaimed, held = held,
                     next_due = tonumber(nd[2] or 0)})

--@claim
-- ARGV: G T now deadline consumer
--       picks(json [[kind, p, off, prio, id, expired, to_dlq, reason]])
-- kind "r" a due retry, "f" a never-leased message; expired 1: its TTL passed, 2: it cannot be
-- delivered (reason, e.g. it does not decrypt). Per pick: deliveries (> 0, leased), 0 (taken
-- by someone else meanwhile), -1 (dead letter pending), -2 (expired, done).
local now = tonumber(ARGV[3])
local deadline = tonumber(ARGV[4])
local consumer = ARGV[5]
local picks = cjson.decode(ARGV[6])
local pos = key('pos', G, T)
local cur = key('cur', G, T)
local st = key('st', G, T)
local out = {}
local touched = {}
for i, pk in ipairs(picks) do
  local kind, p, off, prio, id, expired, to_dlq = pk[1], pk[2], pk[3], pk[4], pk[5], pk[6], pk[7]
  local reason = pk[8]
  local f = fld(p, off)
  local committed = tonumber(redis.call('HGET', pos, p) or -1)
  local s = nil
  if kind == 'r' then
    s = load(G, T, f)
    if not (s and s.s == 2 and s.d <= now and off >= committed) then s = nil end
  else
    local ck = p .. ':' .. prio
    local c = tonumber(redis.call('HGET', cur, ck) or 0)
    if off >= c and off >= committed and redis.call('HEXISTS', st, f) == 0 then
      redis.call('HSET', cur, ck, num(off + 1))
      redis.call('HSET', ids_key(G), id, T .. '\n' .. f)
      s = {s = 2, n = 0, m = id, p = prio}
    end
  end
  if not s then
    out[i] = 0
  elseif expired == 2 then
    s.s = 4
    s.w = reason
    s.e = reason
    s.d = now + 30000
    save(G, T, f, s)
    redis.call('ZADD', key('due', G, T), s.d, f)
    out[i] = -1
  elseif expired == 1 then
    if to_dlq == 1 then
      s.s = 4
      s.w = 'expired'
      s.e = 'ttl'
      s.d = now + 30000
      save(G, T, f, s)
      redis.call('ZADD', key('due', G, T), s.d, f)
      out[i] = -1
    else
      mark_done(G, T, f, s, now, 'expired')
      touched[p] = true
      out[i] = -2
    end
  else
    s.s = 1
    s.n = s.n + 1
    s.c = consumer
    s.d = deadline
    s.l = now
    save(G, T, f, s)
    redis.call('ZADD', key('due', G, T), deadline, f)
    redis.call('SADD', cons_key(consumer), member(G, T, f))
    out[i] = s.n
  end
end
local positions = {}
for p, _ in pairs(touched) do positions[tostring(p)] = advance(G, T, p) end
return cjson.encode({out = out, pos = positions})

--@settle
-- ARGV: G topic-or-empty now consumer-or-empty
--       items(json [[id, action, error, delay, vis, topic the message must be on or '']])
--       limit base max jitter default_vis
-- Per item: {status, topic, count, processing, redeliver_at, deadline, err kind, err detail}.
local topic = ARGV[2]
local now = tonumber(ARGV[3])
local consumer = ARGV[4]
local items = cjson.decode(ARGV[5])
local pol = policy(6)
local default_vis = tonumber(ARGV[10])
local results, dead, touched = {}, {}, {}
for i, it in ipairs(items) do
  local id, action, err, delay, vis, on = it[1], it[2], it[3], it[4], it[5], it[6]
  local r = {status = '', topic = '', count = 0}
  results[i] = r
  local loc = redis.call('HGET', ids_key(G), id)
  local t, f = nil, nil
  if loc then t, f = string.match(loc, '^(.-)\n(.*)$') end
  local s = nil
  if t and (topic == '' or t == topic) and (on == '' or t == on) then s = load(G, t, f) end
  if not s then
    r.err = 'not_found'
  else
    local p = split(f)
    r.topic = t
    r.count = s.n
    if s.s == 3 then
      if action == 'ack' and s.o == cjson.null or action == 'ack' and s.o == nil then
        r.status = 'already_acknowledged'
      elseif s.o ~= nil and s.o ~= cjson.null then
        r.err = 'gone'
        r.detail = s.o
      else
        r.err = 'acked'
      end
    elseif s.s == 4 then
      r.err = 'gone'
      r.detail = 'dead-lettered'
    elseif s.s == 1 and s.d <= now then
      -- the lease ran out before this arrived: a failed delivery either way
      r.err = 'expired'
      if fail(G, t, f, s, 'lease expired', nil, now, pol, dead) then
        r.detail = 'dead'
        dead[#dead][6] = t
      end
    elseif s.s == 2 then
      r.err = 'expired'
    elseif consumer ~= '' and s.c ~= consumer then
      r.err = 'other_consumer'
    elseif action == 'extend' then
      local v = (vis > 0) and vis or default_vis
      s.d = now + v
      save(G, t, f, s)
      redis.call('ZADD', key('due', G, t), s.d, f)
      r.status = 'extended'
      r.deadline = s.d
    elseif action == 'ack' then
      local leased = s.l or now
      s.e = nil
      mark_done(G, t, f, s, now, nil)
      r.status = 'acknowledged'
      r.processing = math.max(0, now - leased)
      touched[t .. '\n' .. p] = {t, p}
    else
      local d = nil
      if delay >= 0 then d = delay end
      if fail(G, t, f, s, (err ~= '' and err) or 'negative acknowledgement', d, now, pol,
              dead) then
        r.status = 'dead_lettered'
        dead[#dead][6] = t
      else
        r.status = 'requeued'
        r.redeliver_at = s.d
      end
    end
  end
end
local positions = {}
for k, tp in pairs(touched) do
  positions[#positions + 1] = {tp[1], tp[2], advance(G, tp[1], tp[2])}
end
return cjson.encode({results = results, dead = dead, pos = positions})

--@finish
-- ARGV: G T now fields(json list): dead letters written; they are complete now.
local now = tonumber(ARGV[3])
local touched = {}
for _, f in ipairs(cjson.decode(ARGV[4])) do
  local s = load(G, T, f)
  if s and s.s == 4 then
    mark_done(G, T, f, s, now, (s.w == 'expired') and 'expired' or 'dead-lettered')
    touched[split(f)] = true
  end
end
local positions = {}
for p, _ in pairs(touched) do positions[#positions + 1] = {p, advance(G, T, p)} end
return cjson.encode(positions)

--@release
-- ARGV: '' '' consumer now: every lease the consumer holds becomes available again now.
local consumer = ARGV[3]
local now = tonumber(ARGV[4])
local ck = cons_key(consumer)
local n = 0
for _, mem in ipairs(redis.call('SMEMBERS', ck)) do
  local g, t, f = string.match(mem, '^(.-)\n(.-)\n(.*)$')
  local s = g and load(g, t, f)
  if s and s.s == 1 and s.c == consumer then
    s.s = 2
    s.d = now
    s.c = nil
    s.e = 'consumer inactive'
    save(g, t, f, s)
    redis.call('ZADD', key('due', g, t), now, f)
    n = n + 1
  end
end
redis.call('DEL', ck)
return n

--@prune
-- ARGV: G T now grace: forget complete messages below the position after the grace period.
local now = tonumber(ARGV[3])
local grace = tonumber(ARGV[4])
local done = key('done', G, T)
local pos = key('pos', G, T)
local n = 0
for _, f in ipairs(redis.call('ZRANGEBYSCORE', done, '-inf', now - grace, 'LIMIT', 0, 5000)) do
  local p, off = split(f)
  local c = tonumber(redis.call('HGET', pos, p) or -1)
  if off < c then
    local s = load(G, T, f)
    redis.call('HDEL', key('st', G, T), f)
    if s and s.m then redis.call('HDEL', ids_key(G), s.m) end
    redis.call('ZREM', done, f)
    n = n + 1
  end
end
return n

--@lags
-- ARGV: '' T highs(json list): per group of T, messages not complete yet.
local highs = cjson.decode(ARGV[3])
local out = {}
for _, g in ipairs(redis.call('SMEMBERS', 'mq:groups:' .. T)) do
  local pos = key('pos', g, T)
  local lag = 0
  for p = 0, #highs - 1 do
    local c = tonumber(redis.call('HGET', pos, p) or 0)
    lag = lag + math.max(0, highs[p + 1] - c)
  end
  out[#out + 1] = {g, lag}
end
return cjson.encode(out)

--@unacked
-- ARGV: '' '' now limit scan: per group and topic with deliveries not acknowledged (leased, or
-- waiting for a retry), [G, T, the oldest leased-at time, leases past their deadline], among
-- the `scan` deliveries due first of each pair; at most `limit` pairs.
local now = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local scan = tonumber(ARGV[5])
local out = {}
for _, pair in ipairs(redis.call('SMEMBERS', 'mq:pairs')) do
  if #out >= limit then break end
  local g, t = string.match(pair, '^(.-)\n(.*)$')
  local fields = g and redis.call('ZRANGE', key('due', g, t), 0, scan - 1) or {}
  if #fields > 0 then
    local states = redis.call('HMGET', key('st', g, t), unpack(fields))
    local oldest, expired = nil, 0
    for i = 1, #fields do
      local s = states[i] and cjson.decode(states[i])
      if s and (s.s == 1 or s.s == 2) then
        local l = tonumber(s.l or 0)
        if oldest == nil or l < oldest then oldest = l end
        if s.s == 1 and tonumber(s.d) <= now then expired = expired + 1 end
      end
    end
    if oldest then out[#out + 1] = {g, t, num(oldest), expired} end
  end
end
return cjson.encode(out)

--@drop
-- ARGV: '' T: the topic is deleted; forget every group's state of it.
for _, g in ipairs(redis.call('SMEMBERS', 'mq:groups:' .. T)) do
  for _, kind in ipairs({'st', 'due', 'done', 'pos', 'cur'}) do
    redis.call('DEL', key(kind, g, T))
  end
  redis.call('SREM', 'mq:pairs', g .. '\n' .. T)
end
redis.call('DEL', 'mq:groups:' .. T)
return 1

--@take
-- ARGV: '' '' consumer rate want: a consumer's rate_limit, one token bucket for every replica,
-- on Redis's clock. Returns [granted, seconds until the next token when none was granted].
local consumer = ARGV[3]
local rate = tonumber(ARGV[4])
local want = tonumber(ARGV[5])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local k = 'mq:rate:' .. consumer
local v = redis.call('HMGET', k, 'tokens', 'stamp', 'rate')
local cap = math.max(rate, 1)
local tokens = cap
if v[1] and tonumber(v[3]) == rate then
  tokens = math.min(cap, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * rate)
end
local got = math.min(want, math.floor(tokens))
tokens = tokens - got
redis.call('HSET', k, 'tokens', string.format('%.6f', tokens), 'stamp',
           string.format('%.6f', now), 'rate', ARGV[4])
redis.call('EXPIRE', k, 3600)
local wait = 0
if got == 0 then wait = (1 - tokens) / rate end
return cjson.encode({got, wait})

--@give
-- ARGV: '' '' consumer n: tokens taken for a consume that leased fewer messages.
local k = 'mq:rate:' .. ARGV[3]
if redis.call('EXISTS', k) == 1 then
  redis.call('HINCRBYFLOAT', k, 'tokens', ARGV[4])
end
return 1
