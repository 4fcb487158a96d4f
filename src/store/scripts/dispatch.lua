-- Every move of an incident between the queue and the responders, the changes
-- made by hand through the /v1 API, and the retention sweep — atomically.
-- One script, one operation per call, so any number of daemons can share one
-- Redis: an incident is offered to at most one responder at a time because
-- only one `match` can take it out of the queue.
--
-- ARGV[1] op   ARGV[2] prefix   ARGV[3] now (ms)   ARGV[4] now (RFC 3339)
-- then the operation's own arguments (see each op below).
--
-- Keys (p = prefix):
--   p:queue            zset  waiting incidents (score: severity rank, then opened ms)
--   p:deadlines        zset  offered incidents by ack_by (ms)
--   p:idle             zset  responders free for an offer (score: tier, then last dispatch ms)
--   p:roster           set   responder ids of the current roster
--   p:resp:<rid>       hash  tier, skills (",a,b,"), availability, daemon, lease (ms),
--                            offer (incident id), assignment (incident id),
--                            last (ms of last offer), since (ms it last became available)
--   p:inc:<id>         hash  the record (state, assigned_to, dispatch_id, attempts,
--                            round, tier, ack_by_ms, offered_ms, exhausted, exhausted_ms …)
--   p:inc:<id>:tried   set   responders offered this incident in the current round
--   p:inc:<id>:tl      list  the timeline
--   p:closed           zset  resolved or cancelled incidents by closing time (ms)
--   p:closed:cursor    string  closing time up to which the retention sweep has set expiries
--   p:caller:<pseudonym> set  incident ids of one caller (the pseudonym, never the number);
--                            it expires with the last of its records once none is open

-- (op, p, now, now_iso, inc_key, pad13, tl and empty come from common.lua.)
local function resp_key(rid) return p .. ':resp:' .. rid end

-- Puts a responder in the idle set when it can take an offer, else takes it out.
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

local function requeue(id)
  local f = redis.call('HMGET', inc_key(id), 'severity', 'opened_ms')
  local rank = ({critical = '0', high = '1', medium = '2', low = '3'})[f[1]] or '2'
  redis.call('ZADD', p .. ':queue', rank .. pad13(f[2]), id)
end

-- Takes an offer back from a responder; the incident waits in the queue again.
-- Returns {'cancel', rid, dispatch_id, daemon, reason}.
local function withdraw(id, rid, dispatch_id, reason, actor, event_detail)
  redis.call('HSET', inc_key(id), 'state', 'queued', 'assigned_to', '', 'ack_by_ms', '')
  redis.call('ZREM', p .. ':deadlines', id)
  requeue(id)
  if redis.call('HGET', resp_key(rid), 'offer') == id then
    redis.call('HSET', resp_key(rid), 'offer', '')
  end
  refresh_idle(rid)
  tl(id, reason, actor, event_detail)
  tl(id, 'withdrawn', 'dispatchd', {responder = rid, dispatch_id = dispatch_id, reason = reason})
  local daemon = redis.call('HGET', resp_key(rid), 'daemon')
  return {'cancel', rid, dispatch_id, daemon or '', reason}
end

-- Withdraws every offer whose deadline has passed: 'cancel' rows.
local function expire(out)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. ':deadlines', '-inf', now, 'LIMIT', 0, 200)) do
    local f = redis.call('HMGET', inc_key(id), 'state', 'assigned_to', 'dispatch_id', 'ack_by_ms')
    if f[1] == 'offered' and tonumber(f[4]) and tonumber(f[4]) <= now then
      out[#out + 1] = withdraw(id, f[2], f[3], 'ack_timeout', 'dispatchd', {responder = f[2], dispatch_id = f[3]})
    else
      redis.call('ZREM', p .. ':deadlines', id)
    end
  end
end


local function match(out)
  local max_offers = tonumber(ARGV[5])
  local sev = {critical = 0, high = 1, medium = 2, low = 3}
  local queue = redis.call('ZRANGE', p .. ':queue', 0, 499)
  if #queue == 0 then return end
  -- Responders are read lazily, in idle order (tier, then least recently
  -- dispatched), and only as far as needed: usually the first one will do.
  local idle = redis.call('ZRANGE', p .. ':idle', 0, -1)
  if #idle == 0 then return end
  local cands, loaded = {}, 0
  local function cand(i)
    while loaded < i and loaded < #idle do
      loaded = loaded + 1
      local rid = idle[loaded]
      local r = redis.call('HMGET', resp_key(rid), 'tier', 'skills', 'since', 'daemon', 'availability', 'lease', 'offer', 'assignment')
      -- Members are kept current by every other op; only a lapsed lease (its daemon died) is new here.
      if r[5] == 'available' and tonumber(r[6]) and tonumber(r[6]) > now and empty(r[7]) and empty(r[8]) then
        cands[#cands + 1] = {id = rid, tier = tonumber(r[1]), skills = r[2] or '', since = tonumber(r[3]) or 0, daemon = r[4] or ''}
      else
        redis.call('ZREM', p .. ':idle', rid)
      end
    end
    return cands[i]
  end
  local used = 0
  for _, id in ipairs(queue) do
    if #out >= max_offers or (loaded == #idle and used == #cands) then break end
    local k = inc_key(id)
    local f = redis.call('HMGET', k, 'state', 'category', 'severity', 'exhausted', 'exhausted_ms', 'round', 'tier', 'attempts',
      'summary', 'instructions', 'caller', 'queue', 'opened_ms', 'major')
    if f[1] ~= 'queued' then
      redis.call('ZREM', p .. ':queue', id)
    else
      local s = sev[f[3]] or 2
      local cat = f[2] or ''
      local exhausted_ms = (f[4] == '1') and (tonumber(f[5]) or 0) or nil
      local tried = {}
      for _, t in ipairs(redis.call('SMEMBERS', k .. ':tried')) do tried[t] = true end
      local function usable(c)
        if c.used then return false end
        if exhausted_ms and c.since <= exhausted_ms then return false end
        return c.skills == '*' or string.find(c.skills, ',' .. cat .. ',', 1, true) ~= nil
          or string.find(c.skills, ',*,', 1, true) ~= nil
      end
      -- A major incident goes to the highest tier first: every candidate is
      -- looked at and the highest tier wins (the least recently dispatched
      -- of it, by idle order); others take the first usable one.
      local major = f[14] == '1'
      local function better(a, b) return not a or (major and b.tier > a.tier) end
      local pick, any = nil, false
      local i = 1
      while true do
        local c = cand(i)
        if not c then break end
        if usable(c) then
          any = true
          if not tried[c.id] and better(pick, c) then
            pick = c
            if not major then break end
          end
        end
        i = i + 1
      end
      local round = tonumber(f[6]) or 1
      if any and not pick then
        -- Everyone who could take it was asked this round: next round.
        round = round + 1
        redis.call('DEL', k .. ':tried')
        if round > tonumber(ARGV[14 + s]) then
          redis.call('HSET', k, 'exhausted', '1', 'exhausted_ms', now, 'round', '1', 'tier', '')
          tl(id, 'exhausted', 'dispatchd', {rounds = tonumber(ARGV[14 + s])})
          out[#out + 1] = {'exhausted', id, f[3]}
        else
          redis.call('HSET', k, 'round', round, 'tier', '')
          for _, c in ipairs(cands) do
            if usable(c) and better(pick, c) then pick = c end
          end
        end
      end
      if pick then
        local attempts = (tonumber(f[8]) or 0) + 1
        local dispatch_id = id .. '.' .. attempts
        local ack_by = now + tonumber(ARGV[6 + s])
        local escalated = 0
        local prev_tier = tonumber(f[7])
        if prev_tier and pick.tier > prev_tier and not major then
          escalated = 1
          tl(id, 'escalated', 'dispatchd', {from_tier = prev_tier, to_tier = pick.tier})
        end
        redis.call('HSET', k, 'state', 'offered', 'assigned_to', pick.id, 'dispatch_id', dispatch_id,
          'attempts', attempts, 'ack_by_ms', ack_by, 'offered_ms', now, 'tier', pick.tier, 'round', round)
        redis.call('ZREM', p .. ':queue', id)
        redis.call('ZADD', p .. ':deadlines', ack_by, id)
        redis.call('SADD', k .. ':tried', pick.id)
        redis.call('HSET', resp_key(pick.id), 'offer', id, 'last', now)
        redis.call('ZREM', p .. ':idle', pick.id)
        pick.used = true
        used = used + 1
        tl(id, 'offered', 'dispatchd', {responder = pick.id, dispatch_id = dispatch_id, attempt = attempts,
          tier = pick.tier, round = round, ack_by = ARGV[10 + s]})
        if pick.daemon == ARGV[18] then
          -- Handed to the responder's connection on this daemon right after this script.
          tl(id, 'delivered', 'dispatchd', {responder = pick.id, dispatch_id = dispatch_id})
        end
        out[#out + 1] = {'offer', id, pick.id, dispatch_id, pick.daemon, f[3], tostring(escalated),
          tostring(attempts), cat, f[9] or '', f[10] or '', f[11] or '', f[12] or '', f[13] or '0', tostring(ack_by),
          major and '1' or '0'}
      end
    end
  end

end

local function closed_state(s) return s == 'resolved' or s == 'cancelled' end

-- A closed record expires in ttl ms; so does its caller's index once none of
-- that caller's incidents is open (index entries of vanished records are dropped).
local function expire_closed(id, ttl)
  local k = inc_key(id)
  for _, key in ipairs({k, k .. ':tl', k .. ':tried', k .. ':members'}) do
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
if op == 'roster' then
  -- ARGV[5] n, then n × (rid, tier, skills ",a,b," or "*")
  local n = tonumber(ARGV[5])
  redis.call('DEL', p .. ':roster')
  for i = 0, n - 1 do
    local rid, tier, skills = ARGV[6 + 3 * i], ARGV[7 + 3 * i], ARGV[8 + 3 * i]
    redis.call('SADD', p .. ':roster', rid)
    redis.call('HSET', resp_key(rid), 'tier', tier, 'skills', skills)
  end
  -- Responders that left the roster can no longer be offered anything.
  for _, rid in ipairs(redis.call('ZRANGE', p .. ':idle', 0, -1)) do refresh_idle(rid) end
  for i = 0, n - 1 do refresh_idle(ARGV[6 + 3 * i]) end
  return n

elseif op == 'connect' then
  -- ARGV[5] rid, ARGV[6] daemon, ARGV[7] lease until (ms)
  -- Returns the incident offered to it and not yet answered, or ''.
  local rid, daemon, lease = ARGV[5], ARGV[6], ARGV[7]
  local k = resp_key(rid)
  local was = refresh_idle(rid)
  if empty(redis.call('HGET', k, 'availability')) then
    redis.call('HSET', k, 'availability', 'available')
  end
  redis.call('HSET', k, 'daemon', daemon, 'lease', lease)
  if refresh_idle(rid) and not was then redis.call('HSET', k, 'since', now) end
  return redis.call('HGET', k, 'offer') or ''

elseif op == 'lease' then
  -- ARGV[5] daemon, ARGV[6] lease until, ARGV[7..] rids connected here
  for i = 7, #ARGV do
    local k = resp_key(ARGV[i])
    if redis.call('HGET', k, 'daemon') == ARGV[5] then
      redis.call('HSET', k, 'lease', ARGV[6])
      refresh_idle(ARGV[i])
    end
  end
  return 1

elseif op == 'disconnect' then
  -- ARGV[5] rid, ARGV[6] daemon
  local k = resp_key(ARGV[5])
  if redis.call('HGET', k, 'daemon') == ARGV[6] then
    redis.call('HSET', k, 'daemon', '', 'lease', '0')
    refresh_idle(ARGV[5])
  end
  return 1

elseif op == 'availability' then
  -- ARGV[5] rid, ARGV[6] available|busy|off_duty
  local rid, status = ARGV[5], ARGV[6]
  local was = refresh_idle(rid)
  redis.call('HSET', resp_key(rid), 'availability', status)
  if refresh_idle(rid) and not was then redis.call('HSET', resp_key(rid), 'since', now) end
  return 1

elseif op == 'step' then
  -- One pass of the dispatcher: withdraw offers past their deadline, then pair
  -- waiting incidents with free responders, then say when the next deadline is.
  -- ARGV[5] max offers; ARGV[6..9] ack timeout ms, ARGV[10..13] ack_by RFC 3339,
  -- ARGV[14..17] max_rounds — each for critical, high, medium, low;
  -- ARGV[18] this daemon.
  -- Rows: {'cancel', rid, dispatch_id, daemon, reason}
  --       {'offer', id, rid, dispatch_id, daemon, severity, escalated, attempt,
  --        category, summary, instructions, caller, queue, opened_ms, ack_by_ms}
  --       {'exhausted', id, severity}
  --       {'next', ms of the next deadline, or ''}
  local out = {}
  expire(out)
  match(out)
  local nxt = redis.call('ZRANGE', p .. ':deadlines', 0, 0, 'WITHSCORES')
  out[#out + 1] = {'next', nxt[2] or ''}
  return out

elseif op == 'answer' then
  -- ARGV[5] rid, ARGV[6] dispatch_id, ARGV[7] 'ack'|'decline', ARGV[8] reason
  -- Returns {'acknowledged', offered_ms} | {'cancel', …} | {'error', code}
  local rid, dispatch_id, kind = ARGV[5], ARGV[6], ARGV[7]
  local id, attempt = string.match(dispatch_id, '^(.+)%.(%d+)$')
  if not id or redis.call('EXISTS', inc_key(id)) == 0 then return {'error', 'unknown_dispatch'} end
  local f = redis.call('HMGET', inc_key(id), 'state', 'assigned_to', 'dispatch_id', 'offered_ms', 'attempts')
  if tonumber(attempt) > (tonumber(f[5]) or 0) then return {'error', 'unknown_dispatch'} end
  if f[3] ~= dispatch_id or f[2] ~= rid then return {'error', 'stale_dispatch'} end
  if f[1] ~= 'offered' then
    if kind == 'ack' and f[1] ~= 'queued' and f[1] ~= 'cancelled' then return {'acknowledged', '', 'again'} end
    return {'error', 'stale_dispatch'}
  end
  if kind == 'ack' then
    redis.call('HSET', inc_key(id), 'state', 'acknowledged', 'acked_ms', now, 'ack_by_ms', '')
    redis.call('ZREM', p .. ':deadlines', id)
    redis.call('HSET', resp_key(rid), 'offer', '', 'assignment', id)
    refresh_idle(rid)
    tl(id, 'acknowledged', rid, {responder = rid, dispatch_id = dispatch_id})
    return {'acknowledged', f[4] or ''}
  end
  return withdraw(id, rid, dispatch_id, 'declined', rid, {responder = rid, dispatch_id = dispatch_id, reason = ARGV[8]})

elseif op == 'status' then
  -- ARGV[5] rid, ARGV[6] incident id, ARGV[7] en_route|on_scene|resolved, ARGV[8] note,
  -- ARGV[9] eta in seconds ('' = none given): kept as eta_ms for the caller status
  -- Returns {'ok', new state} | {'error', code}
  local rid, id, status = ARGV[5], ARGV[6], ARGV[7]
  local rank = {acknowledged = 1, en_route = 2, on_scene = 3, resolved = 4}
  local f = redis.call('HMGET', inc_key(id), 'state', 'assigned_to')
  if f[2] ~= rid or not rank[f[1]] or f[1] == 'resolved' then return {'error', 'not_allowed'} end
  if rank[status] <= rank[f[1]] then return {'error', 'not_allowed'} end
  redis.call('HSET', inc_key(id), 'state', status, status .. '_ms', now)
  local detail = {responder = rid}
  if ARGV[8] ~= '' then detail.note = ARGV[8] end
  if tonumber(ARGV[9]) then
    detail.eta_s = tonumber(ARGV[9])
    redis.call('HSET', inc_key(id), 'eta_ms', now + 1000 * tonumber(ARGV[9]))
  elseif status ~= 'en_route' then
    -- On scene or resolved: the journey is over.
    redis.call('HDEL', inc_key(id), 'eta_ms')
  end
  tl(id, status, rid, detail)
  if status == 'resolved' then
    redis.call('HSET', resp_key(rid), 'assignment', '')
    if refresh_idle(rid) then redis.call('HSET', resp_key(rid), 'since', now) end
    -- Closed: the retention sweep (op sweep below) sets its expiry.
    redis.call('ZADD', p .. ':closed', now, id)
  end
  return {'ok', status}
elseif op == 'close' then
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
  -- Calls intake still remembers with this caller (intake.lua), incident or not.
  local calls = p .. ':callercalls:' .. ARGV[6]
  for _, ck in ipairs(redis.call('SMEMBERS', calls)) do redis.call('DEL', p .. ':acall:' .. ck) end
  redis.call('DEL', idx, calls, p .. ':repeat:' .. ARGV[6])
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
    redis.call('DEL', k, k .. ':tl', k .. ':tried', k .. ':members')
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
