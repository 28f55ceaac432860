-- Consumer-group state of the Kafka engine, in Redis. Each script below is one atomic step;
-- this common part is prepended to each (kafka_groups.py splits the file at each marker).
--
-- State is kept per RUN: consecutive offsets of one partition leased together (or failed,
-- completed, dead-lettered together) are one record, and only what diverges (a nack of some,
-- a partial acknowledgement, an extension of some, a partial retry) splits a run.
--
-- Keys of group G and topic T (T has only [A-Za-z0-9._-], so the key parses from the right):
--   mq:{G}:run:T   hash "p:first" -> run record (packed, below)
--   mq:{G}:due:T   zset "p:first" by deadline (leased), due time (retry), retry time (dlq pending)
--   mq:{G}:pos:T   hash p -> committed offset (every offset below is complete)
--   mq:{G}:cur:T   hash "p:prio" -> next never-leased offset of that priority level
--   mq:{G}:old:T   list of complete runs the position passed, newest first (at most OLD_RUNS,
--                  pruned after the grace period): state, done time, deliveries, their ids; read
--                  to answer "already acknowledged" rather than "unknown"
--   mq:{G}:recent  zset of the group's topics by when they were last consumed (an
--                  acknowledgement may name no topic: its message is looked for there)
--   mq:cons:C      set "G\nT\np:first" of the runs consumer C may hold (checked when read)
--   mq:groups:T    set of groups that consumed T;  mq:pairs  set "G\nT"
-- Run record: struct HDR (last offset, deadline or due time, leased at, deliveries, state,
--   priority, lengths of the next three strings), then the consumer, the last error, the
--   dead-letter reason, then the 16-byte packed message ids of first..last.
local G = ARGV[1]
local T = ARGV[2]
local HDR = '<i8i8i8i4BBHHH'
local HDR_LEN = 36
local ID = 16
local OLD_RUNS = 500
local OLD_HDR = '<Bi8i4'
local OLD_LEN = 13
-- states: leased, waiting after a nack, done (acknowledged), dead letter pending, done as
-- expired, done as dead-lettered, waiting after a failed delivery (lease expired, released)
local LEASED, NACKED, DONE, DEAD, DONE_EXPIRED, DONE_DEAD, FAILED = 1, 2, 3, 4, 5, 6, 7
local function key(kind, g, t) return 'mq:{' .. g .. '}:' .. kind .. ':' .. t end
local function topics_key(g) return 'mq:{' .. g .. '}:recent' end
local function cons_key(c) return 'mq:cons:' .. c end
local function rk(p, first) return string.format('%d:%d', p, first) end
local function split(f)
  local p, o = string.match(f, '^(%d+):(%d+)$')
  return tonumber(p), tonumber(o)
end
local function num(n) return string.format('%d', n) end
local function member(g, t, f) return g .. '\n' .. t .. '\n' .. f end
local function waiting(s) return s == LEASED or s == NACKED or s == DEAD or s == FAILED end
local function complete(s) return s == DONE or s == DONE_EXPIRED or s == DONE_DEAD end
local function decode(t, f, v)
  local last, d, l, n, s, prio, cl, el, wl = struct.unpack(HDR, v)
  local p, first = split(f)
  local i = HDR_LEN + 1
  local r = {t = t, p = p, first = first, last = last, d = d, l = l, n = n, s = s, prio = prio}
  r.c = string.sub(v, i, i + cl - 1)
  i = i + cl
  r.e = string.sub(v, i, i + el - 1)
  i = i + el
  r.w = string.sub(v, i, i + wl - 1)
  r.ids = string.sub(v, i + wl)
  r.oc = r.c -- the consumer whose set holds this key's member
  return r
end
local function encode(r)
  return struct.pack(HDR, r.last, r.d, r.l, r.n, r.s, r.prio, #r.c, #r.e, #r.w)
    .. r.c .. r.e .. r.w .. r.ids
end
local function load(t, f)
  local v = redis.call('HGET', key('run', G, t), f)
  if v then return decode(t, f, v) end
  return nil
end
-- Write a run and its index entries (due time, its consumer's set).
local function store(r)
  local f = rk(r.p, r.first)
  redis.call('HSET', key('run', G, r.t), f, encode(r))
  if waiting(r.s) then
    redis.call('ZADD', key('due', G, r.t), r.d, f)
  else
    redis.call('ZREM', key('due', G, r.t), f)
  end
  if r.s == LEASED then redis.call('SADD', cons_key(r.c), member(G, r.t, f)) end
  if r.oc ~= '' and not (r.s == LEASED and r.c == r.oc) then
    redis.call('SREM', cons_key(r.oc), member(G, r.t, f))
  end
  r.oc = (r.s == LEASED) and r.c or ''
end
-- The part a..b of run r, as a new run (its own key unless a is r's first offset).
local function piece(r, a, b)
  local q = {}
  for k, v in pairs(r) do q[k] = v end
  q.first = a
  q.last = b
  q.ids = string.sub(r.ids, (a - r.first) * ID + 1, (b - r.first + 1) * ID)
  q.act = nil
  if a ~= r.first then q.oc = '' end
  return q
end
local function size(r) return r.last - r.first + 1 end
local function backoff(n, base, maxd, jitter)
  local e = math.min(math.max(n - 1, 0), 40)
  local b = math.min(maxd, base * (2 ^ e))
  return math.floor(b * (1 - jitter + 2 * jitter * math.random()))
end
local function dead_entry(r) return {r.t, r.p, r.first, r.last, r.n, r.e, r.w} end
-- A failed delivery of the whole run: a retry after backoff, or (at the limit) a dead letter
-- for the caller to write.
local function fail(r, err, now, pol, dead)
  r.c = ''
  r.e = err
  if r.n >= pol.limit then
    r.s = DEAD
    r.w = 'failed'
    r.d = now + 30000
    dead[#dead + 1] = dead_entry(r)
  else
    r.s = FAILED
    r.d = now + backoff(r.n, pol.base, pol.max, pol.jitter)
  end
  return r.s == DEAD
end
-- Move the committed position past complete runs (which leave the run hash); returns it.
local function advance(t, p, now)
  local pos = key('pos', G, t)
  local c = tonumber(redis.call('HGET', pos, p))
  if not c then return nil end
  local start = c
  local runs = key('run', G, t)
  local old = key('old', G, t)
  while true do
    local f = rk(p, c)
    local v = redis.call('HGET', runs, f)
    if not v then break end
    local r = decode(t, f, v)
    if not complete(r.s) then break end
    redis.call('HDEL', runs, f)
    redis.call('LPUSH', old, struct.pack(OLD_HDR, r.s, now, r.n) .. r.ids)
    c = r.last + 1
  end
  if c ~= start then
    redis.call('HSET', pos, p, num(c))
    redis.call('LTRIM', old, 0, OLD_RUNS - 1)
  end
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
-- retries (as runs), pending dead letters, cursors, the consumer's live lease count, the next
-- due time.
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
redis.call('ZADD', topics_key(G), now, T)
if redis.call('EXISTS', key('st', G, T)) == 1 then
  -- state of the per-message layout of earlier versions: its leases are not runs; deliver
  -- everything from the committed position on again (at least once), and forget it
  redis.call('DEL', key('st', G, T), key('done', G, T), key('cur', G, T), key('due', G, T),
             'mq:{' .. G .. '}:ids')
end
local due = key('due', G, T)
local dead, retries = {}, {}
local reclaimed, nretry = 0, 0
for _, f in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, 2000)) do
  local r = load(T, f)
  if not r or not waiting(r.s) then
    redis.call('ZREM', due, f)
  elseif r.p >= nparts or r.last < positions[r.p + 1] then
    -- removed by retention: nothing left to deliver
    redis.call('ZREM', due, f)
    redis.call('HDEL', key('run', G, T), f)
    if r.oc ~= '' then redis.call('SREM', cons_key(r.oc), member(G, T, f)) end
  elseif r.s == LEASED then
    reclaimed = reclaimed + size(r)
    fail(r, 'lease expired', now, pol, dead)
    store(r)
  elseif r.s == DEAD then
    -- a dead letter whose writer did not finish (crash, Kafka down): hand it out again
    r.d = now + 30000
    store(r)
    dead[#dead + 1] = dead_entry(r)
  elseif nretry < want * 4 then
    retries[#retries + 1] = {r.p, r.first, r.last, r.n, r.prio}
    nretry = nretry + size(r)
  end
end
local held = 0
if ARGV[9] == '1' then
  local ck = cons_key(consumer)
  for _, mem in ipairs(redis.call('SMEMBERS', ck)) do
    local g, t, f = string.match(mem, '^(.-)\n(.-)\n(.*)$')
    local v = g and redis.call('HGET', key('run', g, t), f)
    local r = v and decode(t, f, v)
    if r and r.s == LEASED and r.c == consumer and r.d > now then
      held = held + size(r)
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
-- ARGV: G T now to_dlq nseg, then per segment (consecutive offsets a..b of partition p, one
--       priority): kind p a b prio from expired reason ids consumer deadline
-- kind "r" part of the retry run starting at offset "from", "f" never-leased messages; expired
-- 1: their TTL passed, 2: they cannot be delivered (reason, e.g. they do not decrypt); ids:
-- their packed ids; consumer and deadline: the lease (several consumes leased together each
-- have their own). Per segment: deliveries (> 0, leased), 0 (taken by someone else
-- meanwhile), -1 (dead letter pending), -2 (expired, done).
local now = tonumber(ARGV[3])
local to_dlq = ARGV[4] == '1'
local nseg = tonumber(ARGV[5])
local pos = key('pos', G, T)
local cur = key('cur', G, T)
local out = {}
local touched = {}
local refused = {}
for i = 0, nseg - 1 do
  local j = 6 + i * 11
  local kind, p, a, b = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]),
    tonumber(ARGV[j + 3])
  local prio, from, expired = tonumber(ARGV[j + 4]), tonumber(ARGV[j + 5]), ARGV[j + 6]
  local reason = ARGV[j + 7]
  local committed = tonumber(redis.call('HGET', pos, p) or -1)
  local r = nil
  if kind == 'r' then
    local whole = load(T, rk(p, from))
    if whole and (whole.s == NACKED or whole.s == FAILED) and whole.d <= now
        and a >= committed and a >= whole.first and b <= whole.last then
      -- the parts before and after stay waiting, as runs of their own
      if a > whole.first then store(piece(whole, whole.first, a - 1)) end
      if b < whole.last then store(piece(whole, b + 1, whole.last)) end
      r = piece(whole, a, b)
    end
  else
    local ck = p .. ':' .. prio
    local c = tonumber(redis.call('HGET', cur, ck) or 0)
    -- Never-leased segments of one partition and level come in offset order; once one is
    -- refused (another replica leased part of it), a later one would move the cursor past
    -- what is left of it, and those offsets would never be leased: refuse the rest too.
    if refused[ck] or a < c or a < committed then
      refused[ck] = true
    else
      redis.call('HSET', cur, ck, num(b + 1))
      r = {t = T, p = p, first = a, last = b, d = 0, l = 0, n = 0, s = NACKED, prio = prio,
           c = '', e = '', w = '', ids = ARGV[j + 8], oc = ''}
    end
  end
  if not r then
    out[i + 1] = 0
  elseif expired == '2' or (expired == '1' and to_dlq) then
    r.s = DEAD
    r.c = ''
    r.w = (expired == '2') and reason or 'expired'
    r.e = (expired == '2') and reason or 'ttl'
    r.d = now + 30000
    store(r)
    out[i + 1] = -1
  elseif expired == '1' then
    r.s = DONE_EXPIRED
    r.c = ''
    store(r)
    touched[p] = true
    out[i + 1] = -2
  else
    r.s = LEASED
    r.n = r.n + 1
    r.c = ARGV[j + 9]
    r.d = tonumber(ARGV[j + 10])
    r.l = now
    store(r)
    out[i + 1] = r.n
  end
end
local positions = {}
for p, _ in pairs(touched) do positions[#positions + 1] = {p, advance(T, p, now)} end
return {out, positions}

--@settle
-- ARGV: G topic-or-empty now consumer-or-empty limit base max jitter default_vis
--       ids(16 bytes each) actions(one of "a" ack, "n" nack, "e" extend per item)
--       extras(per item that is not an ack: struct '<i8i8H' delay or -1, visibility or 0,
--       error length, then the error) dry("1": only find each item's topic, change nothing)
-- Returns: results (per item struct '<bBHi8': code, topic index, deliveries, value), topics,
--   dead letters to write {topic, p, first, last, deliveries, error, reason}, positions
--   {topic, p, committed}. Codes: 1 acknowledged (value: processing ms), 2 already
--   acknowledged, 3 requeued (value: redelivery time), 4 dead-lettered, 5 extended (value:
--   deadline), -1 unknown, -2 dead-lettered, -3 expired (TTL), -4 acknowledged already (a nack
--   or extension of it), -5 lease expired, -6 lease expired and dead-lettered, -7 leased to
--   another consumer, -8 negatively acknowledged, waiting (value: redelivery time).
local topic = ARGV[2]
local now = tonumber(ARGV[3])
local consumer = ARGV[4]
local pol = policy(5)
local default_vis = tonumber(ARGV[9])
local ids, actions, extras = ARGV[10], ARGV[11], ARGV[12]
local dry = ARGV[13] == '1'
local topics
if topic ~= '' then
  topics = {topic}
else
  topics = redis.call('ZREVRANGE', topics_key(G), 0, -1)
end
local cache, olds = {}, {}
local function runs_of(t)
  local l = cache[t]
  if not l then
    l = {}
    local flat = redis.call('HGETALL', key('run', G, t))
    for i = 1, #flat, 2 do l[#l + 1] = decode(t, flat[i], flat[i + 1]) end
    cache[t] = l
  end
  return l
end
local function find_in(blob, id, base)
  local at = base
  while true do
    local i = string.find(blob, id, at, true)
    if not i then return nil end
    if (i - base) % ID == 0 then return (i - base) / ID end
    at = i + 1
  end
end
local last_r, last_k = nil, -1
local function locate(id)
  -- a batch acknowledges in the order it was leased: try the next slot of the last hit first
  if last_r then
    local k = last_k + 1
    if string.sub(last_r.ids, k * ID + 1, k * ID + ID) == id then return last_r, k end
  end
  for _, t in ipairs(topics) do
    for _, r in ipairs(runs_of(t)) do
      local k = find_in(r.ids, id, 1)
      if k then return r, k end
    end
  end
  return nil
end
-- The passed runs of a topic as one string of ids, with where each run starts in it.
local function old_of(t)
  local o = olds[t]
  if not o then
    o = {starts = {}, states = {}, counts = {}}
    local parts, at = {}, 1
    for i, v in ipairs(redis.call('LRANGE', key('old', G, t), 0, -1)) do
      local s, _, n = struct.unpack(OLD_HDR, v)
      o.starts[i], o.states[i], o.counts[i] = at, s, n
      parts[i] = string.sub(v, OLD_LEN + 1)
      at = at + #parts[i]
    end
    o.blob = table.concat(parts)
    olds[t] = o
  end
  return o
end
local function locate_old(id)
  for _, t in ipairs(topics) do
    local o = old_of(t)
    local k = find_in(o.blob, id, 1)
    if k then
      -- the run holding byte k*ID+1: the last one starting at or before it
      local pos, lo, hi = k * ID + 1, 1, #o.starts
      while lo < hi do
        local mid = math.floor((lo + hi + 1) / 2)
        if o.starts[mid] <= pos then lo = mid else hi = mid - 1 end
      end
      return t, o.states[lo], o.counts[lo]
    end
  end
  return nil
end
local tindex, tlist = {}, {}
local function tix(t)
  if not tindex[t] then
    tlist[#tlist + 1] = t
    tindex[t] = #tlist
  end
  return tindex[t]
end
local out, dead, dirty = {}, {}, {}
local xpos = 1
for i = 1, #actions do
  local id = string.sub(ids, (i - 1) * ID + 1, i * ID)
  local a = string.sub(actions, i, i)
  local delay, vis, err = -1, 0, ''
  if a ~= 'a' then
    local el
    delay, vis, el, xpos = struct.unpack('<i8i8H', extras, xpos)
    err = string.sub(extras, xpos, xpos + el - 1)
    xpos = xpos + el
  end
  local code, value, count, ti = -1, 0, 0, 0
  local r, k = locate(id)
  if r then
    last_r, last_k = r, k
    ti = tix(r.t)
    count = r.n
    -- the message's state, with what this request already did to it
    local x = r.act and r.act[k]
    local s = x and x.s or r.s
    if dry then
      code = 0
    elseif s == DONE then
      code = (a == 'a') and 2 or -4
    elseif s == DONE_EXPIRED then
      code = -3
    elseif s == DONE_DEAD or s == DEAD then
      code = -2
    elseif s == LEASED and r.d <= now and not x then
      -- the lease ran out before this arrived: a failed delivery (of the whole run) either way
      code = fail(r, 'lease expired', now, pol, dead) and -6 or -5
      dirty[r] = true
    elseif s == NACKED then
      code = -8
      value = x and x.d or r.d
    elseif s == FAILED then
      code = -5
    elseif consumer ~= '' and r.c ~= consumer then
      code = -7
    else
      r.act = r.act or {}
      dirty[r] = true
      if a == 'e' then
        local d = now + ((vis > 0) and vis or default_vis)
        r.act[k] = {s = LEASED, key = 'e' .. d, d = d}
        code = 5
        value = d
      elseif a == 'a' then
        r.act[k] = {s = DONE, key = 'a'}
        code = 1
        value = math.max(0, now - r.l)
      else
        err = (err ~= '') and err or 'negative acknowledgement'
        if r.n >= pol.limit then
          r.act[k] = {s = DEAD, key = 'x' .. err, e = err}
          code = 4
        else
          -- one backoff per run and request, so that a nacked batch stays one run
          if delay < 0 then
            r.bo = r.bo or backoff(r.n, pol.base, pol.max, pol.jitter)
            delay = r.bo
          end
          local d = now + delay
          r.act[k] = {s = NACKED, key = 'n' .. d .. '\n' .. err, d = d, e = err}
          code = 3
          value = d
        end
      end
    end
  else
    local t, s, n = locate_old(id)
    if t then
      ti = tix(t)
      count = n
      if dry then
        code = 0
      elseif s == DONE then
        code = (a == 'a') and 2 or -4
      else
        code = (s == DONE_EXPIRED) and -3 or -2
      end
    end
  end
  out[i] = struct.pack('<bBHi8', code, ti, count, value)
end
if dry then return {table.concat(out), tlist, {}, {}} end
local touched = {}
for r, _ in pairs(dirty) do
  if not r.act then
    store(r)
  else
    -- consecutive offsets with the same outcome stay one run
    local n = size(r)
    local start = 0
    for k = 0, n - 1 do
      local x = r.act[start]
      local y = (k + 1 < n) and r.act[k + 1] or nil
      if k == n - 1 or (x and x.key) ~= (y and y.key) then
        local q = piece(r, r.first + start, r.first + k)
        if x then
          if x.s == LEASED then
            q.d = x.d
          else
            q.s = x.s
            q.c = ''
            q.e = x.e or ''
            if x.s == NACKED then
              q.d = x.d
            elseif x.s == DEAD then
              q.w = 'failed'
              q.d = now + 30000
              dead[#dead + 1] = dead_entry(q)
            else
              touched[r.t .. '\n' .. r.p] = {r.t, r.p}
            end
          end
        end
        store(q)
        start = k + 1
      end
    end
  end
end
local positions = {}
for _, tp in pairs(touched) do
  positions[#positions + 1] = {tp[1], tp[2], advance(tp[1], tp[2], now)}
end
return {table.concat(out), tlist, dead, positions}

--@finish
-- ARGV: G T now, then the keys "p:first" of dead-letter runs written; they are complete now.
local now = tonumber(ARGV[3])
local touched = {}
for i = 4, #ARGV do
  local r = load(T, ARGV[i])
  if r and r.s == DEAD then
    r.s = (r.w == 'expired') and DONE_EXPIRED or DONE_DEAD
    r.c = ''
    store(r)
    touched[r.p] = true
  end
end
local positions = {}
for p, _ in pairs(touched) do positions[#positions + 1] = {p, advance(T, p, now)} end
return positions

--@release
-- ARGV: '' '' consumer now: every lease the consumer holds becomes available again now.
local consumer = ARGV[3]
local now = tonumber(ARGV[4])
local ck = cons_key(consumer)
local n = 0
for _, mem in ipairs(redis.call('SMEMBERS', ck)) do
  local g, t, f = string.match(mem, '^(.-)\n(.-)\n(.*)$')
  local v = g and redis.call('HGET', key('run', g, t), f)
  if v then
    G = g -- store() writes the keys of group G
    local r = decode(t, f, v)
    if r.s == LEASED and r.c == consumer then
      r.s = FAILED
      r.d = now
      r.c = ''
      r.e = 'consumer inactive'
      store(r)
      n = n + size(r)
    end
  end
end
redis.call('DEL', ck)
return n

--@prune
-- ARGV: G T now grace: forget complete runs the position passed longer ago than the grace.
local now = tonumber(ARGV[3])
local grace = tonumber(ARGV[4])
local old = key('old', G, T)
local n = 0
while true do
  local v = redis.call('LINDEX', old, -1)
  if not v then break end
  local _, at = struct.unpack(OLD_HDR, v)
  if at > now - grace then break end
  redis.call('RPOP', old)
  n = n + (#v - OLD_LEN) / ID
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
-- waiting for a retry), [G, T, the oldest leased-at time, leased messages past their deadline],
-- among the `scan` runs due first of each pair; at most `limit` pairs.
local now = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local scan = tonumber(ARGV[5])
local out = {}
for _, pair in ipairs(redis.call('SMEMBERS', 'mq:pairs')) do
  if #out >= limit then break end
  local g, t = string.match(pair, '^(.-)\n(.*)$')
  local fields = g and redis.call('ZRANGE', key('due', g, t), 0, scan - 1) or {}
  if #fields > 0 then
    local values = redis.call('HMGET', key('run', g, t), unpack(fields))
    local oldest, expired = nil, 0
    for i = 1, #fields do
      local r = values[i] and decode(t, fields[i], values[i])
      if r and (r.s == LEASED or r.s == NACKED or r.s == FAILED) then
        if oldest == nil or r.l < oldest then oldest = r.l end
        if r.s == LEASED and r.d <= now then expired = expired + r.last - r.first + 1 end
      end
    end
    if oldest then out[#out + 1] = {g, t, num(oldest), expired} end
  end
end
return cjson.encode(out)

--@drop
-- ARGV: '' T: the topic is deleted; forget every group's state of it.
for _, g in ipairs(redis.call('SMEMBERS', 'mq:groups:' .. T)) do
  for _, kind in ipairs({'run', 'due', 'pos', 'cur', 'old'}) do
    redis.call('DEL', key(kind, g, T))
  end
  redis.call('SREM', 'mq:pairs', g .. '\n' .. T)
  redis.call('ZREM', topics_key(g), T)
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
