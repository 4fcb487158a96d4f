-- Every move of an incident between the queue and the responders,
-- atomically. One script, one operation per call, so any number of daemons
-- can share one Redis: an incident is offered to at most one responder at a
-- time because only one `match` can take it out of the queue.
--
-- ARGV[1] op   ARGV[2] prefix   ARGV[3] now (ms, or '' for Redis's clock)
-- then the operation's own arguments (see each op below). Answers are JSON
-- objects whose field names are those of the Rust types that read them
-- (store/dispatch.rs, domain/dispatch.rs).
--
-- Keys (p = prefix; names in store/keys.rs):
--   p:queue            zset  waiting incidents (score: severity rank, then opened ms)
--   p:deadlines        zset  offered incidents by ack_by (ms)
--   p:idle             zset  responders free for an offer (score: tier, then last dispatch ms)
--   p:roster           set   responder ids of the current roster
--   p:resp:<rid>       hash  tier, skills (",a,b,"), channels ("pbx_call,sip_message,…" in
--                            fallback order; "" = websocket only), availability, daemon,
--                            lease (ms), offer (incident id), assignment (incident id),
--                            last (ms of last offer), since (ms it last became available)
--   p:fallback         zset  incidents whose responder is to be reached on its next channel,
--                            by when (ms); the record's fb_dispatch, fb_step, fb_kind say which
--   p:progress         zset  acknowledged incidents by when a reminder is due (ms)
--   p:inc:<id>         hash  the record (state, assigned_to, dispatch_id, attempts,
--                            round, tier, ack_by_ms, offered_ms, exhausted, exhausted_ms …)
--   p:inc:<id>:tried   set   responders offered this incident in the current round
--   p:inc:<id>:tl      list  the timeline
-- (now, iso, K, EV, RANK, pad13, tl, stamped, empty, refresh_idle: prelude and common.lua.)

local function requeue(id)
  local f = redis.call('HMGET', K.inc(id), 'severity', 'opened_ms')
  redis.call('ZADD', K.queue, (RANK[f[1]] or 2) .. pad13(f[2]), id)
end

-- Takes an offer back from a responder; the incident waits in the queue again.
-- `why` is the event that says why (ack_timeout, declined). Returns the release.
local function withdraw(id, rid, dispatch_id, why, actor, event_detail)
  redis.call('HSET', K.inc(id), 'state', 'queued', 'assigned_to', '', 'ack_by_ms', '')
  redis.call('ZREM', K.deadlines, id)
  redis.call('ZREM', K.fallback, id)
  requeue(id)
  if redis.call('HGET', K.resp(rid), 'offer') == id then
    redis.call('HSET', K.resp(rid), 'offer', '')
  end
  refresh_idle(rid)
  tl(id, why, actor, event_detail)
  tl(id, EV.withdrawn, 'dispatchd', {responder = rid, dispatch_id = dispatch_id, reason = why})
  local daemon = redis.call('HGET', K.resp(rid), 'daemon')
  return {responder = rid, dispatch_id = dispatch_id, daemon = daemon or '', reason = why}
end

-- Withdraws every offer whose deadline has passed.
local function expire(releases)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.deadlines, '-inf', now, 'LIMIT', 0, 200)) do
    local f = redis.call('HMGET', K.inc(id), 'state', 'assigned_to', 'dispatch_id', 'ack_by_ms')
    if f[1] == 'offered' and tonumber(f[4]) and tonumber(f[4]) <= now then
      releases[#releases + 1] = withdraw(id, f[2], f[3], EV.ack_timeout, 'dispatchd',
        {responder = f[2], dispatch_id = f[3]})
    else
      redis.call('ZREM', K.deadlines, id)
    end
  end
end

-- How far down the queue one pass looks for incidents a free responder can
-- take, and how many it reads at once.
local QUEUE_LOOK, QUEUE_PAGE = 500, 16

-- Pairs waiting incidents with free responders. `pol`: max offers, ack timeout
-- (ms) and max rounds per severity rank, this daemon.
local function match(pol, offers, exhausted)
  -- Free responders first: with none (every responder busy under a backlog)
  -- the queue is not read at all.
  local idle = redis.call('ZRANGE', K.idle, 0, -1)
  if #idle == 0 then return end
  -- Responders are read lazily, in idle order (tier, then least recently
  -- dispatched), and only as far as needed: usually the first one will do.
  local cands, loaded = {}, 0
  local function cand(i)
    while loaded < i and loaded < #idle do
      loaded = loaded + 1
      local rid = idle[loaded]
      local r = redis.call('HMGET', K.resp(rid), 'tier', 'skills', 'since', 'daemon', 'availability', 'lease', 'offer',
        'assignment', 'channels')
      -- Members are kept current by every other op; only a lapsed lease (its daemon died) is new here.
      if r[5] == 'available' and reachable(r[6], r[9]) and empty(r[7]) and empty(r[8]) then
        local live = tonumber(r[6]) and tonumber(r[6]) > now
        cands[#cands + 1] = {id = rid, tier = tonumber(r[1]), skills = r[2] or '', since = tonumber(r[3]) or 0,
          daemon = live and (r[4] or '') or '', live = live, channels = r[9] or ''}
      else
        redis.call('ZREM', K.idle, rid)
      end
    end
    return cands[i]
  end
  local used = 0
  -- The queue, most urgent first, read a page at a time (usually the first
  -- page will do), up to QUEUE_LOOK incidents. An incident taken off the
  -- queue here moves the later ones up a place: the next page starts that
  -- much earlier.
  local seen, removed, page = 0, 0, {}
  local at = 0
  local function next_queued()
    at = at + 1
    if at > #page then
      if seen >= QUEUE_LOOK then return nil end
      local from = seen - removed
      page = redis.call('ZRANGE', K.queue, from, from + math.min(QUEUE_PAGE, QUEUE_LOOK - seen) - 1)
      seen, at = seen + #page, 1
    end
    return page[at]
  end
  while true do
    if #offers >= pol.max or (loaded == #idle and used == #cands) then break end
    local id = next_queued()
    if not id then break end
    local k = K.inc(id)
    local f = redis.call('HMGET', k, 'state', 'category', 'severity', 'exhausted', 'exhausted_ms', 'round', 'tier', 'attempts',
      'summary', 'instructions', 'caller', 'queue', 'opened_ms', 'major')
    if f[1] ~= 'queued' then
      redis.call('ZREM', K.queue, id)
      removed = removed + 1
    else
      local s = RANK[f[3]] or 2
      local cat = f[2] or ''
      local exhausted_ms = (f[4] == '1') and (tonumber(f[5]) or 0) or nil
      local tried = {}
      for _, t in ipairs(redis.call('SMEMBERS', K.tried(id))) do tried[t] = true end
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
        redis.call('DEL', K.tried(id))
        if round > pol.max_rounds[s + 1] then
          redis.call('HSET', k, 'exhausted', '1', 'exhausted_ms', now, 'round', '1', 'tier', '')
          tl(id, EV.exhausted, 'dispatchd', {rounds = pol.max_rounds[s + 1]})
          exhausted[#exhausted + 1] = {incident_id = id, severity = f[3]}
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
        local ack_by = now + pol.ack_timeout_ms[s + 1]
        local escalated = false
        local prev_tier = tonumber(f[7])
        if prev_tier and pick.tier > prev_tier and not major then
          escalated = true
          tl(id, EV.escalated, 'dispatchd', {from_tier = prev_tier, to_tier = pick.tier})
        end
        redis.call('HSET', k, 'state', 'offered', 'assigned_to', pick.id, 'dispatch_id', dispatch_id,
          'attempts', attempts, 'ack_by_ms', ack_by, 'offered_ms', now, 'tier', pick.tier, 'round', round)
        redis.call('ZREM', K.queue, id)
        removed = removed + 1
        redis.call('ZADD', K.deadlines, ack_by, id)
        redis.call('SADD', K.tried(id), pick.id)
        redis.call('HSET', K.resp(pick.id), 'offer', id, 'last', now)
        redis.call('ZREM', K.idle, pick.id)
        pick.used = true
        used = used + 1
        tl(id, EV.offered, 'dispatchd', {responder = pick.id, dispatch_id = dispatch_id, attempt = attempts,
          tier = pick.tier, round = round, ack_by = iso(ack_by)})
        if pick.live and pick.daemon == pol.daemon then
          -- Handed to the responder's connection on this daemon right after this script.
          tl(id, EV.delivered, 'dispatchd', {responder = pick.id, dispatch_id = dispatch_id})
        end
        if not empty(pick.channels) then
          -- Its other channels: after fallback.after, or at once without an open websocket.
          redis.call('HSET', k, 'fb_dispatch', dispatch_id, 'fb_step', 0, 'fb_kind', 'offer')
          redis.call('ZADD', K.fallback, pick.live and (now + pol.after_ms) or now, id)
        end
        offers[#offers + 1] = {incident_id = id, responder = pick.id, dispatch_id = dispatch_id,
          daemon = pick.daemon, severity = f[3], escalated = escalated, attempt = attempts, category = cat,
          summary = f[9] or '', instructions = f[10] or '', caller = f[11] or '', queue = f[12] or '',
          opened_ms = tonumber(f[13]) or 0, ack_by_ms = ack_by, major = major}
      end
    end
  end
end

local function split(list)
  local out = {}
  for item in string.gmatch(list or '', '[^,]+') do out[#out + 1] = item end
  return out
end

-- The offer's fields as the Rust `Offer` reads them, from a record's HMGET of
-- OFFER_FIELDS, for the incident `id` and responder `rid`.
local OFFER_FIELDS = {'dispatch_id', 'attempts', 'severity', 'category', 'summary', 'instructions', 'caller', 'queue',
  'opened_ms', 'ack_by_ms', 'major'}
local function offer_of(id, rid, f)
  return {incident_id = id, responder = rid, dispatch_id = f[1] or '', attempt = tonumber(f[2]) or 0,
    severity = f[3] or 'medium', category = f[4] or '', summary = f[5] or '', instructions = f[6] or '',
    caller = f[7] or '', queue = f[8] or '', opened_ms = tonumber(f[9]) or 0, ack_by_ms = tonumber(f[10]) or 0,
    major = f[11] == '1'}
end

-- Claims the attempts due on the responders' other channels (contract §11):
-- each due incident's next channel, once, by whichever daemon runs this first
-- (a PBX call only by a daemon holding the PBX feed: `pol.pbx`; when none has
-- claimed it for 10 s the chain skips it). The next channel follows after
-- `fallback.after`, or at once when this attempt reports a failure.
local function fallbacks(pol, attempts)
  local due = redis.call('ZRANGEBYSCORE', K.fallback, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 100)
  for i = 1, #due, 2 do
    local id, since = due[i], tonumber(due[i + 1])
    local k = K.inc(id)
    local g = redis.call('HMGET', k, 'state', 'assigned_to', 'dispatch_id', 'fb_dispatch', 'fb_step', 'fb_kind')
    local kind = g[6]
    local live = g[3] == g[4] and ((kind == 'offer' and g[1] == 'offered')
      or (kind == 'reminder' and (g[1] == 'acknowledged' or g[1] == 'en_route')))
    local chans = live and split(redis.call('HGET', K.resp(g[2]), 'channels')) or {}
    local step = tonumber(g[5]) or 0
    local ch = chans[step + 1]
    if not ch then
      redis.call('ZREM', K.fallback, id)
    elseif ch == 'pbx_call' and not pol.pbx then
      if now - since > 10000 then
        redis.call('HSET', k, 'fb_step', step + 1)
        tl(id, EV.contacted, 'dispatchd', {channel = ch, outcome = 'no_pbx_feed', dispatch_id = g[3], purpose = kind})
      end
    else
      redis.call('HSET', k, 'fb_step', step + 1)
      redis.call('ZADD', K.fallback, now + pol.after_ms, id)
      tl(id, EV.contacted, 'dispatchd', {channel = ch, outcome = 'attempt', dispatch_id = g[3], purpose = kind})
      local a = offer_of(id, g[2], redis.call('HMGET', k, unpack(OFFER_FIELDS)))
      a.channel = ch
      a.purpose = kind
      attempts[#attempts + 1] = a
    end
  end
end

-- Acknowledged is not done (contract §11): an incident without `en_route`
-- within en_route_within (or `on_scene` within on_scene_within) of the last
-- step gets a reminder (timeline `reminded`, the frame, the fallback
-- channels); after release_after reminders it is released (`ack_expired`,
-- `cancel` reason `released`) and offered again.
local function reminders(pol, out, releases)
  local due = redis.call('ZRANGEBYSCORE', K.progress, '-inf', now, 'LIMIT', 0, 100)
  for _, id in ipairs(due) do
    local k = K.inc(id)
    local f = redis.call('HMGET', k, 'state', 'assigned_to', 'dispatch_id', 'severity', 'reminders', 'acked_ms', 'en_route_ms')
    if f[1] ~= 'acknowledged' and f[1] ~= 'en_route' then
      redis.call('ZREM', K.progress, id)
    else
      local s = RANK[f[4]] or 2
      local rid = f[2]
      local step = f[1] == 'acknowledged' and 'en_route' or 'on_scene'
      local since = tonumber(f[1] == 'acknowledged' and f[6] or f[7]) or now
      local n = tonumber(f[5]) or 0
      local r = redis.call('HMGET', K.resp(rid), 'daemon', 'lease', 'channels')
      local daemon = (tonumber(r[2]) and tonumber(r[2]) > now) and (r[1] or '') or ''
      if n < pol.release_after[s + 1] then
        local every = step == 'en_route' and pol.en_route_within_ms[s + 1] or pol.on_scene_within_ms[s + 1]
        redis.call('HSET', k, 'reminders', n + 1)
        redis.call('ZADD', K.progress, now + every, id)
        tl(id, EV.reminded, 'dispatchd', {responder = rid, due = step, reminders = n + 1, since = iso(since)})
        out[#out + 1] = {incident_id = id, responder = rid, daemon = daemon, due = step, since_ms = since}
        if not empty(r[3]) then
          redis.call('HSET', k, 'fb_dispatch', f[3], 'fb_step', 0, 'fb_kind', 'reminder')
          redis.call('ZADD', K.fallback, now, id)
        end
      else
        redis.call('HSET', k, 'state', 'queued', 'assigned_to', '', 'reminders', 0, 'ack_by_ms', '')
        redis.call('HDEL', k, 'eta_ms')
        redis.call('ZREM', K.progress, id)
        redis.call('ZREM', K.fallback, id)
        redis.call('SADD', K.tried(id), rid)
        if redis.call('HGET', K.resp(rid), 'assignment') == id then redis.call('HSET', K.resp(rid), 'assignment', '') end
        if refresh_idle(rid) then redis.call('HSET', K.resp(rid), 'since', now) end
        requeue(id)
        tl(id, EV.ack_expired, 'dispatchd', {responder = rid, dispatch_id = f[3], reminders = n, due = step})
        releases[#releases + 1] = {responder = rid, dispatch_id = f[3] or '', daemon = daemon, reason = 'released'}
      end
    end
  end
end

-- ---------------------------------------------------------------------------
-- The operation ARGV[1] names, with the arguments after it.
local function handle()
  if op == 'roster' then
    -- ARGV[4] n, then n × (rid, tier, skills ",a,b," or "*", channels "a,b" or "")
    local n = tonumber(ARGV[4])
    redis.call('DEL', K.roster)
    for i = 0, n - 1 do
      local rid, tier, skills, channels = ARGV[5 + 4 * i], ARGV[6 + 4 * i], ARGV[7 + 4 * i], ARGV[8 + 4 * i]
      redis.call('SADD', K.roster, rid)
      redis.call('HSET', K.resp(rid), 'tier', tier, 'skills', skills, 'channels', channels)
    end
    -- Responders that left the roster can no longer be offered anything.
    for _, rid in ipairs(redis.call('ZRANGE', K.idle, 0, -1)) do refresh_idle(rid) end
    for i = 0, n - 1 do refresh_idle(ARGV[5 + 4 * i]) end
    return n

  elseif op == 'connect' then
    -- ARGV[4] rid, ARGV[5] daemon, ARGV[6] lease (ms from now)
    -- Returns the incident offered to it and not yet answered, or ''.
    local rid, daemon = ARGV[4], ARGV[5]
    local k = K.resp(rid)
    local was = refresh_idle(rid)
    if empty(redis.call('HGET', k, 'availability')) then
      redis.call('HSET', k, 'availability', 'available')
    end
    redis.call('HSET', k, 'daemon', daemon, 'lease', now + tonumber(ARGV[6]))
    if refresh_idle(rid) and not was then redis.call('HSET', k, 'since', now) end
    return redis.call('HGET', k, 'offer') or ''

  elseif op == 'lease' then
    -- ARGV[4] daemon, ARGV[5] lease (ms from now), ARGV[6..] rids connected here
    local until_ms = now + tonumber(ARGV[5])
    for i = 6, #ARGV do
      local k = K.resp(ARGV[i])
      if redis.call('HGET', k, 'daemon') == ARGV[4] then
        redis.call('HSET', k, 'lease', until_ms)
        refresh_idle(ARGV[i])
      end
    end
    return 1

  elseif op == 'disconnect' then
    -- ARGV[4] rid, ARGV[5] daemon
    local k = K.resp(ARGV[4])
    if redis.call('HGET', k, 'daemon') == ARGV[5] then
      redis.call('HSET', k, 'daemon', '', 'lease', '0')
      refresh_idle(ARGV[4])
    end
    return 1

  elseif op == 'availability' then
    -- ARGV[4] rid, ARGV[5] available|busy|off_duty
    local rid, status = ARGV[4], ARGV[5]
    local was = refresh_idle(rid)
    redis.call('HSET', K.resp(rid), 'availability', status)
    if refresh_idle(rid) and not was then redis.call('HSET', K.resp(rid), 'since', now) end
    return 1

  elseif op == 'step' then
    -- One pass of the dispatcher: withdraw offers past their deadline, then pair
    -- waiting incidents with free responders, then say when the next deadline is.
    -- ARGV[4] the policy, JSON: {max, ack_timeout_ms [4], max_rounds [4], en_route_within_ms [4],
    --   on_scene_within_ms [4], release_after [4], after_ms, pbx, daemon} (lists per severity
    --   rank, most severe first; pbx: this daemon can place PBX calls now)
    -- Returns {releases [Release], offers [offer + daemon, escalated], exhausted
    --   [{incident_id, severity}], attempts [offer + channel, purpose], reminders [Reminder],
    --   next_deadline_ms (absent: none), now}
    local pol = cjson.decode(ARGV[4])
    local out = {releases = {}, offers = {}, exhausted = {}, attempts = {}, reminders = {}, now = now}
    expire(out.releases)
    reminders(pol, out.reminders, out.releases)
    match(pol, out.offers, out.exhausted)
    fallbacks(pol, out.attempts)
    -- The next time something is due: a deadline, a channel's attempt, a reminder.
    for _, key in ipairs({K.deadlines, K.fallback, K.progress}) do
      local nxt = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
      if nxt and (not out.next_deadline_ms or nxt < out.next_deadline_ms) then out.next_deadline_ms = nxt end
    end
    return cjson.encode(out)

  elseif op == 'answer' then
    -- ARGV[4] rid, ARGV[5] dispatch_id, ARGV[6] 'ack'|'decline', ARGV[7] reason,
    -- ARGV[8] the channel it came by ('' = the websocket), ARGV[9..12] en_route_within (ms)
    -- per severity rank (the first reminder's due time)
    -- Returns {acknowledged = true, offer_age_ms?, repeated?} | {release = …} | {error = code}
    local rid, dispatch_id, kind = ARGV[4], ARGV[5], ARGV[6]
    local id, attempt = string.match(dispatch_id, '^(.+)%.(%d+)$')
    if not id or redis.call('EXISTS', K.inc(id)) == 0 then return cjson.encode({error = 'unknown_dispatch'}) end
    local f = redis.call('HMGET', K.inc(id), 'state', 'assigned_to', 'dispatch_id', 'offered_ms', 'attempts')
    if tonumber(attempt) > (tonumber(f[5]) or 0) then return cjson.encode({error = 'unknown_dispatch'}) end
    if f[3] ~= dispatch_id or f[2] ~= rid then return cjson.encode({error = 'stale_dispatch'}) end
    if f[1] ~= 'offered' then
      if kind == 'ack' and f[1] ~= 'queued' and f[1] ~= 'cancelled' then
        return cjson.encode({acknowledged = true, repeated = true})
      end
      return cjson.encode({error = 'stale_dispatch'})
    end
    if kind == 'ack' then
      redis.call('HSET', K.inc(id), 'state', 'acknowledged', 'acked_ms', now, 'ack_by_ms', '', 'reminders', 0)
      redis.call('ZREM', K.deadlines, id)
      redis.call('ZREM', K.fallback, id)
      local s = RANK[redis.call('HGET', K.inc(id), 'severity')] or 2
      redis.call('ZADD', K.progress, now + tonumber(ARGV[9 + s]), id)
      redis.call('HSET', K.resp(rid), 'offer', '', 'assignment', id)
      refresh_idle(rid)
      local detail = {responder = rid, dispatch_id = dispatch_id}
    if not empty(ARGV[8]) then detail.channel = ARGV[8] end
    tl(id, EV.acknowledged, rid, detail)
      local offered = tonumber(f[4])
      return cjson.encode({acknowledged = true, offer_age_ms = offered and (now - offered)})
    end
    local why = {responder = rid, dispatch_id = dispatch_id, reason = ARGV[7]}
    if not empty(ARGV[8]) then why.channel = ARGV[8] end
    return cjson.encode({release = withdraw(id, rid, dispatch_id, EV.declined, rid, why)})

  elseif op == 'status' then
    -- ARGV[4] rid, ARGV[5] incident id, ARGV[6] en_route|on_scene|resolved, ARGV[7] note,
    -- ARGV[8] eta in seconds ('' = none given): kept as eta_ms for the caller status,
    -- ARGV[9..12] on_scene_within (ms) per severity rank (the reminder after en_route)
    -- Returns {ok = new state} | {error = code}
    local rid, id, status = ARGV[4], ARGV[5], ARGV[6]
    local f = redis.call('HMGET', K.inc(id), 'state', 'assigned_to', 'step_by')
    -- The step this responder already made, again: a retry after an answer
    -- that did not arrive (or a write whose replicas did not confirm in
    -- time, contract §12). The same answer, nothing written twice.
    if f[2] == rid and f[1] == status and f[3] == rid then return cjson.encode({ok = status, repeated = true}) end
    if f[2] ~= rid or not PROGRESS[f[1]] or f[1] == 'resolved' then return cjson.encode({error = 'not_allowed'}) end
    if not PROGRESS[status] or PROGRESS[status] <= PROGRESS[f[1]] then return cjson.encode({error = 'not_allowed'}) end
    redis.call('HSET', K.inc(id), 'state', status, status .. '_ms', now, 'reminders', 0, 'step_by', rid)
    redis.call('ZREM', K.fallback, id)
    if status == 'en_route' then
      local s = RANK[redis.call('HGET', K.inc(id), 'severity')] or 2
      redis.call('ZADD', K.progress, now + tonumber(ARGV[9 + s]), id)
    else
      redis.call('ZREM', K.progress, id)
    end
    local detail = {responder = rid}
    if ARGV[7] ~= '' then detail.note = ARGV[7] end
    if tonumber(ARGV[8]) then
      detail.eta_s = tonumber(ARGV[8])
      redis.call('HSET', K.inc(id), 'eta_ms', now + 1000 * tonumber(ARGV[8]))
    elseif status ~= 'en_route' then
      -- On scene or resolved: the journey is over.
      redis.call('HDEL', K.inc(id), 'eta_ms')
    end
    tl(id, EV[status], rid, detail)
    if status == 'resolved' then
      redis.call('HSET', K.resp(rid), 'assignment', '')
      if refresh_idle(rid) then redis.call('HSET', K.resp(rid), 'since', now) end
      -- Closed: the retention sweep (admin.lua) sets its expiry.
      redis.call('ZADD', K.closed, now, id)
    end
    return cjson.encode({ok = status})

  elseif op == 'contacted' then
    -- ARGV[4] incident id, ARGV[5] dispatch id, ARGV[6] channel, ARGV[7] outcome,
    -- ARGV[8] purpose, ARGV[9] '1' when the next channel goes at once
    local id, dispatch_id = ARGV[4], ARGV[5]
    if redis.call('EXISTS', K.inc(id)) == 0 then return 0 end
    tl(id, EV.contacted, 'dispatchd', {channel = ARGV[6], outcome = ARGV[7], dispatch_id = dispatch_id, purpose = ARGV[8]})
    if ARGV[9] == '1' and redis.call('HGET', K.inc(id), 'fb_dispatch') == dispatch_id then
      redis.call('ZADD', K.fallback, 'XX', now, id)
    end
    return 1
  end
  return redis.error_reply('unknown op ' .. tostring(op))
end
