-- Changes made by hand through the /v1 API, and the retention sweep, atomically.
--
-- ARGV[1] op   ARGV[2] prefix   ARGV[3] now (ms)   ARGV[4] now (RFC 3339)
-- then the operation's own arguments (see each op below).
--
-- Keys (p = prefix), besides those described in dispatch.lua:
--   p:closed             zset  resolved or cancelled incidents by closing time (ms)
--   p:closed:cursor      string  closing time up to which the sweep has set expiries
--   p:caller:<pseudonym> set   incident ids of one caller (the pseudonym, never the number);
--                              it expires with the last of its records once none is open

local op, p, now, now_iso = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

local function inc_key(id) return p .. ':inc:' .. id end
local function resp_key(rid) return p .. ':resp:' .. rid end
local function empty(v) return v == false or v == nil or v == '' end

local function pad13(ms)
  local s = string.format('%.0f', tonumber(ms) or 0)
  return string.rep('0', 13 - string.len(s)) .. s
end

local function tl(id, event, actor, detail)
  redis.call('RPUSH', inc_key(id) .. ':tl',
    cjson.encode({at = now_iso, event = event, actor = actor, detail = detail}))
end

-- Same as refresh_idle in dispatch.lua: in the idle set exactly when it can take an offer.
local function refresh_idle(rid)
  local r = redis.call('HMGET', resp_key(rid), 'availability', 'lease', 'offer', 'assignment', 'tier', 'last')
  local ok = r[1] == 'available' and not empty(r[2]) and tonumber(r[2]) > now
    and empty(r[3]) and empty(r[4]) and not empty(r[5])
    and redis.call('SISMEMBER', p .. ':roster', rid) == 1
  if ok then
    redis.call('ZADD', p .. ':idle', r[5] .. pad13(r[6] or 0), rid)
  else
    redis.call('ZREM', p .. ':idle', rid)
  end
  return ok
end

local function closed_state(s) return s == 'resolved' or s == 'cancelled' end

-- A closed record expires in ttl ms; so does its caller's index once none of
-- that caller's incidents is open (index entries of vanished records are dropped).
local function expire_closed(id, ttl)
  local k = inc_key(id)
  for _, key in ipairs({k, k .. ':tl', k .. ':tried'}) do
    redis.call('PEXPIRE', key, ttl)
  end
  local ps = redis.call('HGET', k, 'caller_pseudonym')
  if empty(ps) then return end
  local idx = p .. ':caller:' .. ps
  local keep = ttl
  for _, m in ipairs(redis.call('SMEMBERS', idx)) do
    if m ~= id then
      local st = redis.call('HGET', inc_key(m), 'state')
      if not st then
        redis.call('SREM', idx, m)
      elseif not closed_state(st) then
        return
      else
        local left = redis.call('PTTL', inc_key(m))
        if left < 0 then return end -- no expiry yet: the sweep sets it, and this again
        if left > keep then keep = left end
      end
    end
  end
  redis.call('PEXPIRE', idx, keep)
end

-- ---------------------------------------------------------------------------
if op == 'close' then
  -- ARGV[5] id, ARGV[6] resolved|cancelled, ARGV[7] note, ARGV[8] retention (ms)
  -- Returns {'ok', rid, dispatch_id, daemon} (rid = '' when no responder held it)
  --       | {'error', 'not_found'|'conflict'}
  local id, to, note, retention = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
  local k = inc_key(id)
  local f = redis.call('HMGET', k, 'state', 'assigned_to', 'dispatch_id')
  if not f[1] then return {'error', 'not_found'} end
  if closed_state(f[1]) then return {'error', 'conflict'} end
  local out = {'ok', '', '', ''}
  local detail = {}
  if note ~= '' then detail.note = note end
  local rid = f[2]
  local held = false
  if not empty(rid) then
    local rk = resp_key(rid)
    local r = redis.call('HMGET', rk, 'offer', 'assignment', 'daemon')
    if r[1] == id then redis.call('HSET', rk, 'offer', ''); held = true end
    if r[2] == id then redis.call('HSET', rk, 'assignment', ''); held = true end
    if held then
      if refresh_idle(rid) then redis.call('HSET', rk, 'since', now) end
      out = {'ok', rid, f[3] or '', r[3] or ''}
      if f[1] ~= 'offered' then detail.responder = rid end
    end
  end
  redis.call('HSET', k, 'state', to, to .. '_ms', now, 'ack_by_ms', '')
  if f[1] == 'offered' then redis.call('HSET', k, 'assigned_to', '') end
  redis.call('ZREM', p .. ':queue', id)
  redis.call('ZREM', p .. ':deadlines', id)
  tl(id, to, 'api', detail)
  if held and f[1] == 'offered' then
    tl(id, 'withdrawn', 'dispatchd', {responder = rid, dispatch_id = f[3], reason = 'incident_cancelled'})
  end
  redis.call('ZADD', p .. ':closed', now, id)
  expire_closed(id, retention)
  return out

elseif op == 'erase' then
  -- ARGV[5] number, ARGV[6] its pseudonym, ARGV[7..] more incident ids that may be its
  -- Returns how many records had the number (and now have neither number nor name).
  local number, idx = ARGV[5], p .. ':caller:' .. ARGV[6]
  local ids = redis.call('SMEMBERS', idx)
  for i = 7, #ARGV do ids[#ids + 1] = ARGV[i] end
  local seen, n = {}, 0
  for _, id in ipairs(ids) do
    if not seen[id] then
      seen[id] = true
      local k = inc_key(id)
      if redis.call('HGET', k, 'caller') == number then
        redis.call('HSET', k, 'caller', '', 'caller_name', '', 'caller_pseudonym', '')
        tl(id, 'note', 'api', {caller = 'erased'})
        n = n + 1
      end
    end
  end
  redis.call('DEL', idx)
  return n

elseif op == 'sweep' then
  -- ARGV[5] retention (ms), ARGV[6] most incidents to handle per part
  -- 1. closed longer ago than the retention: whatever is left of it goes;
  -- 2. closed since the last sweep without an expiry (resolved by a
  --    responder, see the 'status' op of dispatch.lua): its expiry is set.
  -- Returns {removed, expiries set, 1 when there is more to do else 0}
  local retention, limit = tonumber(ARGV[5]), tonumber(ARGV[6])
  local removed, set, more = 0, 0, 0
  local old = redis.call('ZRANGEBYSCORE', p .. ':closed', '-inf', now - retention, 'LIMIT', 0, limit)
  for _, id in ipairs(old) do
    local k = inc_key(id)
    local ps = redis.call('HGET', k, 'caller_pseudonym')
    if not empty(ps) then redis.call('SREM', p .. ':caller:' .. ps, id) end
    redis.call('DEL', k, k .. ':tl', k .. ':tried')
    redis.call('ZREM', p .. ':incidents', id)
    redis.call('ZREM', p .. ':closed', id)
    removed = removed + 1
  end
  if #old == limit then more = 1 end
  -- Closing times come from each daemon's clock: look back a little before the cursor.
  local cursor = (tonumber(redis.call('GET', p .. ':closed:cursor')) or 0) - 300000
  local recent = redis.call('ZRANGEBYSCORE', p .. ':closed', string.format('%.0f', cursor), '+inf',
    'WITHSCORES', 'LIMIT', 0, limit)
  local upto = now
  for i = 1, #recent, 2 do
    local id, closed = recent[i], tonumber(recent[i + 1])
    if redis.call('PTTL', inc_key(id)) == -1 then
      local left = closed + retention - now
      if left < 1 then left = 1 end
      expire_closed(id, left)
      set = set + 1
    end
  end
  if #recent == 2 * limit then
    upto = tonumber(recent[#recent]) + 300000
    if upto > now then upto = now end
    more = 1
  end
  redis.call('SET', p .. ':closed:cursor', string.format('%.0f', upto))
  return {removed, set, more}
end
return redis.error_reply('unknown op ' .. tostring(op))
