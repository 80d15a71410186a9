"""The Lua script of the fleet limits: one atomic step per lease, on one token's keys.

Run by digest (`EVALSHA`) from `fleet_limits.FleetLimiter`; its sizing rule mirrors
`leases.lease_size`. docs/fleet-limits.md explains the state it keeps.
"""

from __future__ import annotations

from typing import Final

LEASE_SCRIPT: Final = """
-- KEYS[1] rate hash {tat, lim}, KEYS[2] lifetime counter (granted), KEYS[3] holders
-- ARGV: worker, demand, give_back, debt, limit per window, window µs,
--       max_requests (-1: none), seed (counted so far), quota ttl s, holder ttl ms,
--       want (0: take nothing, a release)
-- Grants min(room, max(demand, size)) units of both limits at once, size being
-- `want` capped at the fair share as `leases.lease_size` computes it, so the
-- requests waiting (demand) get theirs while room lasts; give_back returns unused
-- units; debt charges requests admitted while Redis was away. Times are
-- microseconds of Redis TIME.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local demand = tonumber(ARGV[2])
local give_back = tonumber(ARGV[3])
local debt = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local window = tonumber(ARGV[6])
local max_requests = tonumber(ARGV[7])
local holder_ttl = tonumber(ARGV[10])
local want = tonumber(ARGV[11])

redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if want > 0 then
  redis.call('ZADD', KEYS[3], now + holder_ttl * 1000, ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
local holders = redis.call('ZCARD', KEYS[3])
if holders > 0 then redis.call('PEXPIRE', KEYS[3], holder_ttl) end

local interval = window / limit
local state = redis.call('HMGET', KEYS[1], 'tat', 'lim')
local tat = tonumber(state[1]) or now
local old = tonumber(state[2]) or limit
if tat < now then tat = now end
if old ~= limit then
  -- requests still counted carry over to the new limit, capped at it
  tat = now + math.min((tat - now) * old / window, limit) * interval
end
tat = math.max(tat - give_back * interval, now)
tat = math.min(tat + debt * interval, now + window)
-- one µs of slack: the stored tat is rounded to whole µs
local rate_room = math.floor((now + window - tat + 1) / interval)

local granted = 0
local quota_room = -1
if max_requests >= 0 then
  granted = tonumber(redis.call('GET', KEYS[2]) or ARGV[8])
  granted = math.max(granted - give_back, 0) + debt
  quota_room = math.max(max_requests - granted, 0)
end
local room = rate_room
if quota_room >= 0 and quota_room < room then room = quota_room end
local g = 0
if want > 0 and room > 0 then
  local size = math.floor(room / (2 * math.max(holders, 1)))
  size = math.max(1, math.min(want, size))
  g = math.min(room, math.max(demand, size))
end
tat = tat + g * interval
local retry = 0
if rate_room - g <= 0 then retry = tat + interval - window - now end
if tat > now then
  redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat), 'lim', limit)
  redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now) / 1000) + 1000)
else
  redis.call('DEL', KEYS[1])
end
if max_requests >= 0 then
  redis.call('SET', KEYS[2], granted + g, 'EX', ARGV[9])
  quota_room = quota_room - g
end
return {g, rate_room - g, quota_room, holders, math.ceil(retry), math.ceil(tat - now)}
"""
