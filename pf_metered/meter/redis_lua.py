"""The Lua scripts behind :mod:`pf_metered.meter.redis_store`, one per store operation.

Why Lua: each script runs atomically on the Redis server, so "check the budget and count",
"claim the due units as one intent" and "commit a worker's lease" are single indivisible steps
whatever number of processes and hosts race on the same stream.

What these scripts must never do:

* use ``INCRBYFLOAT`` or hold money in a Lua number. Lua numbers are doubles: unit counts stay
  below 2^53 (``MAX_UNITS`` is 10^15) so they are exact; money (``paid``, ``refunded``) only
  ever moves as the caller's decimal string straight into ``HINCRBY``/``HSET``.
* turn a Lua number into a Redis argument with ``tostring`` or implicit conversion (both may
  write ``1e+15``): every number written goes through ``fmt`` (``%d``).
* apply the same logical call twice. Every mutating script that is not naturally idempotent
  starts with ``replayed()``: a call carries either an explicit op id (remembered with a TTL)
  or a (session, seq) pair (the session's last reply is remembered); a re-sent call gets the
  first call's reply back instead of acting again.

Keys of one stream share the hash tag ``{stream_id}`` so the scripts also run on Redis Cluster.
"""

from __future__ import annotations

from typing import Final

PRELUDE: Final = r"""
local function fmt(n) return string.format('%d', n) end
local function num(v) if v then return tonumber(v) else return 0 end end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function split2(v)
  local sep = string.find(v, '|', 1, true)
  return tonumber(string.sub(v, 1, sep - 1)), tonumber(string.sub(v, sep + 1))
end
"""

# Dedup convention: KEYS[2] = the stream's session hash, KEYS[3] = the op key;
# ARGV[1] = explicit op id or '', ARGV[2] = session id, ARGV[3] = seq, ARGV[4] = op TTL (s).
DEDUP: Final = r"""
local function replayed()
  if ARGV[1] ~= '' then
    return redis.call('GET', KEYS[3])
  end
  local cur = redis.call('HGET', KEYS[2], ARGV[2])
  if cur then
    local sep = string.find(cur, '|', 1, true)
    local seq = tonumber(string.sub(cur, 1, sep - 1))
    local want = tonumber(ARGV[3])
    if want == seq then return string.sub(cur, sep + 1) end
    if want < seq then return 'stale' end
  end
  return false
end
local function remember(reply)
  if ARGV[1] ~= '' then
    redis.call('SET', KEYS[3], reply, 'EX', ARGV[4])
  else
    redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. '|' .. reply)
  end
  return reply
end
"""

# KEYS: st, sess, op. ARGV[5] = config JSON, ARGV[6] = max units.
CREATE: Final = (
    PRELUDE
    + DEDUP
    + r"""
local r = replayed(); if r then return r end
if redis.call('EXISTS', KEYS[1]) == 1 then return remember('exists') end
redis.call('HSET', KEYS[1], 'cfg', ARGV[5], 'status', 'new', 'units', '0', 'reserved', '0',
  'claimed', '0', 'paid', '0', 'releases', '0', 'seq', '1', 'max', ARGV[6],
  'late', '0', 'lost', '0', 'revoked', '0')
return remember('ok')
"""
)

# KEYS: st. ARGV[1] = escrow id.
SET_ESCROW: Final = (
    PRELUDE
    + r"""
local st = redis.call('HMGET', KEYS[1], 'status', 'escrow')
if not st[1] then return 'unknown' end
if st[2] and st[2] ~= ARGV[1] then return 'other' end
redis.call('HSET', KEYS[1], 'escrow', ARGV[1])
if st[1] == 'new' then redis.call('HSET', KEYS[1], 'status', 'open') end
return 'ok'
"""
)

# Sweep leases whose server-side expiry has passed: their unused units go back to the pool
# and are reported as ``revoked`` (the worker is dead or cut off; what it consumed and never
# pushed is unknown to everyone but it).
SWEEP_DEF: Final = r"""
local function sweep(leases_key, now, everything)
  local freed = 0
  local all = redis.call('HGETALL', leases_key)
  for i = 1, #all, 2 do
    local rem, exp = split2(all[i + 1])
    if everything or exp <= now then
      freed = freed + rem
      redis.call('HDEL', leases_key, all[i])
    end
  end
  return freed
end
"""

SWEEP: Final = SWEEP_DEF

# KEYS: st, sess, op, leases. ARGV[5] = units to add.
ADD: Final = (
    PRELUDE
    + DEDUP
    + SWEEP_DEF
    + r"""
local r = replayed(); if r then return r end
local st = redis.call('HMGET', KEYS[1], 'status', 'units', 'reserved', 'max', 'revoked')
if not st[1] then return 'unknown' end
if st[1] ~= 'open' then return remember('closed|' .. st[1]) end
local n = tonumber(ARGV[5])
local left = num(st[4]) - num(st[2]) - num(st[3])
if n > left then
  -- short of budget: first take back the headroom of leases that expired (dead workers)
  local freed = sweep(KEYS[4], now_ms(), false)
  if freed > 0 then
    redis.call('HSET', KEYS[1], 'reserved', fmt(num(st[3]) - freed),
      'revoked', fmt(num(st[5]) + freed))
    left = left + freed
  end
end
if n > left then return remember('budget|' .. fmt(left)) end
local total = redis.call('HINCRBY', KEYS[1], 'units', ARGV[5])
return remember('ok|' .. fmt(total))
"""
)


# The backend of :class:`pf_metered.meter.lease.LeasedCounter` (``take`` / ``give_back``).
# KEYS: st, sess, op, leases. ARGV[5] = worker, [6] = used (consumed since the last push),
# [7] = want (take: lease size to top up to; give back: what running calls hold, kept),
# [8] = lease TTL ms, [9] = '1' to give the lease back, [10] = need (units the lease must
# cover after a take), [11] = '1' to shrink the lease to ``want``. The top-up rule mirrors
# ``pf_metered.meter.lease.grant``.
# Reply: ok|status|units|lease remaining|granted|ttl ms|available in the pool
LEASE: Final = (
    PRELUDE
    + DEDUP
    + SWEEP
    + r"""
local r = replayed(); if r then return r end
local st = redis.call('HMGET', KEYS[1], 'status', 'units', 'reserved', 'max', 'late', 'lost',
  'revoked')
if not st[1] then return 'unknown' end
local status = st[1]
local units, reserved, max = num(st[2]), num(st[3]), num(st[4])
local late_total, lost_total, revoked_total = num(st[5]), num(st[6]), num(st[7])
local now = now_ms()
local mine = redis.call('HGET', KEYS[4], ARGV[5])
local rem, exp = 0, 0
if mine then rem, exp = split2(mine) end
if mine and exp <= now then
  -- our own lease ran out on the server: what we consumed under it still fitted (our local
  -- expiry comes first), so it is pushed as a late commit below, checked against the budget.
  reserved = reserved - rem
  revoked_total = revoked_total + rem
  redis.call('HDEL', KEYS[4], ARGV[5])
  mine = false
  rem = 0
end
local freed = sweep(KEYS[4], now, false)
reserved = reserved - freed
revoked_total = revoked_total + freed
local used = tonumber(ARGV[6])
local from_lease = used
if from_lease > rem then from_lease = rem end
units = units + from_lease
reserved = reserved - from_lease
rem = rem - from_lease
local late = used - from_lease
if late > 0 then
  if (status == 'open' or status == 'draining') and units + reserved + late <= max then
    units = units + late
    late_total = late_total + late
  else
    lost_total = lost_total + late
  end
end
local granted = 0
local ttl = tonumber(ARGV[8])
if status == 'open' then
  local want = tonumber(ARGV[7])
  if ARGV[9] ~= '1' and rem < want then
    local need = tonumber(ARGV[10])
    local avail = max - units - reserved
    local g = want - rem
    local half = math.floor(avail / 2)
    if g > half then
      -- near the end of the budget: take what is needed now, or half of what is left,
      -- so one worker's lease does not starve the others
      g = need - rem
      if g < half then g = half end
    end
    if g > avail then g = avail end
    if g < 0 then g = 0 end
    -- all or nothing for what the caller needs now: a grant it cannot use would only
    -- take headroom from the others
    if rem + g < need then g = 0 end
    rem = rem + g
    reserved = reserved + g
    granted = g
  elseif (ARGV[9] == '1' or ARGV[11] == '1') and rem > want then
    -- a give-back (ARGV[9]), or no spare headroom wanted (ARGV[11], no client-side
    -- batching): keep only what the worker's running calls hold (ARGV[7])
    reserved = reserved - (rem - want)
    rem = want
  end
else
  reserved = reserved - rem
  rem = 0
end
if rem > 0 then
  redis.call('HSET', KEYS[4], ARGV[5], fmt(rem) .. '|' .. fmt(now + ttl))
else
  redis.call('HDEL', KEYS[4], ARGV[5])
end
redis.call('HSET', KEYS[1], 'units', fmt(units), 'reserved', fmt(reserved),
  'late', fmt(late_total), 'lost', fmt(lost_total), 'revoked', fmt(revoked_total))
local avail = max - units - reserved
return remember('ok|' .. status .. '|' .. fmt(units) .. '|' .. fmt(rem) .. '|' .. fmt(granted)
  .. '|' .. fmt(ttl) .. '|' .. fmt(avail))
"""
)

# KEYS: st. Moves open -> draining: no new leases; live leases may still commit.
BEGIN_CLOSE: Final = (
    PRELUDE
    + r"""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'unknown' end
if status == 'open' then
  redis.call('HSET', KEYS[1], 'status', 'draining')
  return 'draining'
end
return status
"""
)

# KEYS: leases. The number of leases whose server-side expiry is still ahead.
LIVE_LEASES: Final = (
    PRELUDE
    + r"""
local now = now_ms()
local n = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local _, exp = split2(all[i + 1])
  if exp > now then n = n + 1 end
end
return n
"""
)

# KEYS: st, sess, op, pending, leases. ARGV[5] = min units, [6] = '1' final, [7] = owner,
# [8] = most whole batches per intent (0 = no cap).
# Reply: none | pending (another intent is unsettled) | intent|seq|from|to|final
CLAIM: Final = (
    PRELUDE
    + DEDUP
    + SWEEP
    + r"""
local r = replayed(); if r then return r end
local st = redis.call('HMGET', KEYS[1], 'status', 'units', 'claimed', 'seq', 'reserved',
  'revoked')
if not st[1] then return 'unknown' end
local status = st[1]
local final = ARGV[6] == '1'
if redis.call('HLEN', KEYS[4]) > 0 then return remember('pending') end
if status == 'new' or status == 'closed' then return remember('none') end
-- one final intent per stream: a second closer that raced past its own check finds none
if status == 'closing' then return remember('none') end
local units, claimed, seq = num(st[2]), num(st[3]), num(st[4])
local to
if final then
  -- the caller drained the fleet's leases first; anything still reserved is revoked here so
  -- no unit can be added after the final intent
  local freed = sweep(KEYS[5], 0, true)
  redis.call('HSET', KEYS[1], 'status', 'closing', 'reserved', '0',
    'revoked', fmt(num(st[6]) + freed))
  to = units
else
  local m = tonumber(ARGV[5])
  if m < 1 then m = 1 end
  local new = units - claimed
  if new < m then return remember('none') end
  local cap = tonumber(ARGV[8])
  if m > 1 and cap > 0 then
    local k = math.floor(new / m)
    if k > cap then k = cap end
    to = claimed + k * m
  else
    to = units
  end
end
local flag = '0'
if final then flag = '1' end
local now = now_ms()
redis.call('HSET', KEYS[4], fmt(seq),
  fmt(claimed) .. '|' .. fmt(to) .. '|' .. flag .. '|' .. fmt(now) .. '|' .. ARGV[7])
redis.call('HSET', KEYS[1], 'claimed', fmt(to), 'seq', fmt(seq + 1))
return remember('intent|' .. fmt(seq) .. '|' .. fmt(claimed) .. '|' .. fmt(to) .. '|' .. flag)
"""
)

# KEYS: st, pending. ARGV[1] = owner, [2] = lease ms. Hands a pending intent whose claim is
# older than the lease (its owner is presumed dead) to ``owner``; an intent ``owner`` already
# holds is handed back again, so a re-sent take-over is harmless.
# Reply: none | intent|seq|from|to|final
TAKE_OVER: Final = (
    PRELUDE
    + r"""
if not redis.call('HGET', KEYS[1], 'status') then return 'unknown' end
local now = now_ms()
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local v = all[i + 1]
  local p1 = string.find(v, '|', 1, true)
  local p2 = string.find(v, '|', p1 + 1, true)
  local p3 = string.find(v, '|', p2 + 1, true)
  local p4 = string.find(v, '|', p3 + 1, true)
  local at = tonumber(string.sub(v, p3 + 1, p4 - 1))
  local owner = string.sub(v, p4 + 1)
  if owner == ARGV[1] or now - at >= tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[2], all[i], string.sub(v, 1, p3) .. fmt(now) .. '|' .. ARGV[1])
    return 'intent|' .. all[i] .. '|' .. string.sub(v, 1, p1 - 1) .. '|'
      .. string.sub(v, p1 + 1, p2 - 1) .. '|' .. string.sub(v, p2 + 1, p3 - 1)
  end
end
return 'none'
"""
)

# KEYS: st, pending, settled. ARGV[1] = seq, [2] = amount in micro-USDC (a decimal string:
# money never becomes a Lua number). Idempotent: an intent no longer pending is left alone.
SETTLE: Final = (
    PRELUDE
    + r"""
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return 'noop' end
local p1 = string.find(v, '|', 1, true)
local p2 = string.find(v, '|', p1 + 1, true)
local p3 = string.find(v, '|', p2 + 1, true)
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'paid', ARGV[2])
if ARGV[2] ~= '0' then redis.call('HINCRBY', KEYS[1], 'releases', 1) end
redis.call('RPUSH', KEYS[3], ARGV[1] .. '|' .. string.sub(v, 1, p3 - 1) .. '|' .. ARGV[2])
return 'ok'
"""
)

# KEYS: st. ARGV[1] = refunded micro-USDC (a decimal string). Idempotent.
MARK_CLOSED: Final = (
    PRELUDE
    + r"""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'unknown' end
if status == 'closed' then return 'noop' end
redis.call('HSET', KEYS[1], 'status', 'closed', 'refunded', ARGV[1])
return 'ok'
"""
)

# KEYS: st, pending, settled, leases. One consistent snapshot of the whole stream.
LOAD: Final = (
    PRELUDE
    + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
  redis.call('LRANGE', KEYS[3], 0, -1), redis.call('HGETALL', KEYS[4]), fmt(now_ms())}
"""
)
