-- Changes made by hand through the /v1 API (resolve, cancel, caller erasure)
-- and the retention sweep, atomically.
--
-- ARGV[1] op   ARGV[2] prefix   ARGV[3] now (ms, or '' for Redis's clock)
-- then the operation's own arguments (see each op below).
--
-- Keys (p = prefix; names in store/keys.rs), besides those of dispatch.lua:
--   p:closed             zset    resolved or cancelled incidents by closing time (ms)
--   p:closed:cursor      string  closing time up to which the sweep has set expiries
--   p:caller:<pseudonym> set     incident ids of one caller (the pseudonym, never the
--                                number); it expires with the last of its records once
--                                none is open
--   p:calleropen:<pseudonym> set the caller's incidents not closed yet
-- (now, K, EV, pad13, tl, empty, refresh_idle: prelude and common.lua.)

local function closed_state(s) return s == 'resolved' or s == 'cancelled' end

-- A closed record expires in ttl ms; so does its caller's index once none of
-- that caller's incidents is open (p:calleropen:<pseudonym>, the open ones:
-- O(1) however many incidents the caller had). The index lives at least as
-- long as the record closed last: every closed record expires within
-- `retention` of its close.
local function expire_closed(id, ttl)
  for _, key in ipairs({K.inc(id), K.tl(id), K.tried(id), K.members(id), K.related(id), K.omitted(id)}) do
    redis.call('PEXPIRE', key, ttl)
  end
  local ps = redis.call('HGET', K.inc(id), 'caller_pseudonym')
  if empty(ps) then return end
  local open = K.caller_open(ps)
  redis.call('SREM', open, id)
  if redis.call('SCARD', open) > 0 then return end
  local idx = K.caller(ps)
  local left = redis.call('PTTL', idx)
  if left == -1 or (left >= 0 and left < ttl) then redis.call('PEXPIRE', idx, ttl) end
end

-- The operation ARGV[1] names, with the arguments after it.
local function handle()
  if op == 'close' then
    -- ARGV[4] id, ARGV[5] resolved|cancelled, ARGV[6] note, ARGV[7] retention (ms)
    -- Returns {ok = true, held = Release?} (held: the responder it was offered to
    --   or in the hands of, now free) | {error = 'not_found'|'conflict'}
    local id, to, note, retention = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
    local k = K.inc(id)
    local f = redis.call('HMGET', k, 'state', 'assigned_to', 'dispatch_id')
    if not f[1] then return cjson.encode({error = 'not_found'}) end
    if closed_state(f[1]) then return cjson.encode({error = 'conflict'}) end
    local out = {ok = true}
    local detail = {}
    if note ~= '' then detail.note = note end
    local rid = f[2]
    local held = false
    if not empty(rid) then
      local rk = K.resp(rid)
      local r = redis.call('HMGET', rk, 'offer', 'assignment', 'daemon')
      if r[1] == id then redis.call('HSET', rk, 'offer', ''); held = true end
      if r[2] == id then redis.call('HSET', rk, 'assignment', ''); held = true end
      if held then
        if refresh_idle(rid) then redis.call('HSET', rk, 'since', now) end
        out.held = {responder = rid, dispatch_id = f[3] or '', daemon = r[3] or '', reason = 'incident_cancelled'}
        if f[1] ~= 'offered' then detail.responder = rid end
      end
    end
    redis.call('HSET', k, 'state', to, to .. '_ms', now, 'ack_by_ms', '')
    -- Not a step of the responder's: its retry of a status is not this one.
    redis.call('HDEL', k, 'step_by')
    if f[1] == 'offered' then redis.call('HSET', k, 'assigned_to', '') end
    redis.call('ZREM', K.queue, id)
    redis.call('ZREM', K.deadlines, id)
    redis.call('ZREM', K.fallback, id)
    redis.call('ZREM', K.progress, id)
    tl(id, EV[to], 'api', detail)
    if held and f[1] == 'offered' then
      tl(id, EV.withdrawn, 'dispatchd', {responder = rid, dispatch_id = f[3], reason = 'incident_cancelled'})
    end
    redis.call('ZADD', K.closed, now, id)
    expire_closed(id, retention)
    return cjson.encode(out)

  elseif op == 'erase' then
    -- ARGV[4] number, ARGV[5] its pseudonym, ARGV[6..] more incident ids that may be its
    -- Returns how many records had the number (and now have neither number nor name).
    local number, idx = ARGV[4], K.caller(ARGV[5])
    local ids = redis.call('SMEMBERS', idx)
    for i = 6, #ARGV do ids[#ids + 1] = ARGV[i] end
    local seen, n = {}, 0
    for _, id in ipairs(ids) do
      if not seen[id] then
        seen[id] = true
        local k = K.inc(id)
        if redis.call('HGET', k, 'caller') == number then
          redis.call('HSET', k, 'caller', '', 'caller_name', '', 'caller_pseudonym', '')
          tl(id, EV.note, 'api', {caller = 'erased'})
          n = n + 1
        end
      end
    end
    -- Calls intake still remembers with this caller (intake.lua), incident or not.
    local calls = K.callercalls(ARGV[5])
    for _, ck in ipairs(redis.call('SMEMBERS', calls)) do redis.call('DEL', K.acall(ck)) end
    redis.call('DEL', idx, calls, K.repeats(ARGV[5]), K.repeat_of(ARGV[5]), K.caller_open(ARGV[5]))
    return n

  elseif op == 'sweep' then
    -- ARGV[4] retention (ms), ARGV[5] most incidents to handle per part
    -- 1. closed longer ago than the retention: whatever is left of it goes;
    -- 2. closed since the last sweep without an expiry (resolved by a
    --    responder, see the 'status' op of dispatch.lua): its expiry is set.
    -- Returns {removed, expiries set, 1 when there is more to do else 0}
    local retention, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
    local removed, set, more = 0, 0, 0
    local old = redis.call('ZRANGEBYSCORE', K.closed, '-inf', now - retention, 'LIMIT', 0, limit)
    for _, id in ipairs(old) do
      local ps = redis.call('HGET', K.inc(id), 'caller_pseudonym')
      if not empty(ps) then redis.call('SREM', K.caller(ps), id) end
      redis.call('DEL', K.inc(id), K.tl(id), K.tried(id), K.members(id), K.related(id), K.omitted(id))
      redis.call('ZREM', K.incidents, id)
      redis.call('ZREM', K.closed, id)
      removed = removed + 1
    end
    if #old == limit then more = 1 end
    -- Records closed while an earlier sweep ran may sort just before the cursor: look back a little.
    local cursor = (tonumber(redis.call('GET', K.closed_cursor)) or 0) - 300000
    local recent = redis.call('ZRANGEBYSCORE', K.closed, string.format('%.0f', cursor), '+inf',
      'WITHSCORES', 'LIMIT', 0, limit)
    local upto = now
    for i = 1, #recent, 2 do
      local id, closed = recent[i], tonumber(recent[i + 1])
      if redis.call('PTTL', K.inc(id)) == -1 then
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
    redis.call('SET', K.closed_cursor, string.format('%.0f', upto))
    return {removed, set, more}
  end
  return redis.error_reply('unknown op ' .. tostring(op))
end
