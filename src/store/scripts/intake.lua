-- Intake: opening incidents and applying call events, with the correlation
-- rules (repeat caller, callback, abandon storm, surge), atomically. One
-- script, one operation per call, so several daemons on one Redis never open
-- two incidents for one call, two storm incidents for one queue, or two major
-- incidents for one surge.
--
-- ARGV[1] op ('open' | 'event' | 'append' | 'lease')   ARGV[2] prefix
-- ARGV[3] now (ms, or '' for Redis's clock)   ARGV[4] the operation's arguments, JSON
-- 'open' only: after the JSON, each call's record fields and first timeline
-- entries (JSON text without their time) — kept out of the JSON, which would
-- cost a decode and an unescape of every entry on each incoming call.
-- Returns a JSON object (see each op).
--
-- Keys (p = prefix; names in store/keys.rs), besides those described in dispatch.lua:
--   p:call:<call key>      string  call key (X-Call-Ref, Linkedid, Call-ID) → incident id
--   p:acall:<call key>     hash    what is known of a call: queue, ivr_path, joined_ms,
--                                  caller_pseudonym (expires after 6 h; never the number)
--   p:callercalls:<pseudonym> set  call keys whose p:acall holds that caller (for erasure;
--                                  it lives as long as the newest of those hashes)
--   p:dedup:<key>          string  a MESSAGE (Call-ID + CSeq) already applied
--   p:repeat:<pseudonym>   string  the caller's latest incident and the time (ms) of the
--                                  call, '<id> <ms>'; expires `repeat.window` after it
--   p:repeatc:<pseudonym>  hash    the same per category (category → '<id> <ms>')
--   p:inc:<id>:related     set     incidents of the same caller of another category
--   p:surge:<category>     zset    recent incidents of a category (score: opened ms)
--   p:major:<category>     string  the open major incident declared for a surge
--   p:abandons:<queue>     zset    recent abandons of a queue (member: call key)
--   p:storm:<queue>        string  the open abandon-storm incident of a queue
--   p:inc:<id>:members     set     a major incident's members
--   p:feed:<source>:<address> string the daemon reading that PBX feed (a lease: PX)
-- (now, iso, K, EV, RANK, SEVERITY, CROCKFORD, CHECK, pad13, tl, stamped, empty: prelude and common.lua.)

local function is_open(id)
  local s = redis.call('HGET', K.inc(id), 'state')
  return s and s ~= 'resolved' and s ~= 'cancelled'
end

-- Crockford base32, at least 4 symbols, plus a mod-37 check symbol.
-- Same algorithm as domain::ids::incident_id (tests/store_rules.rs pins them).
local function new_id()
  local alphabet, check = CROCKFORD, CHECK
  local seq = redis.call('INCR', K.seq)
  local n = seq
  local digits = ''
  repeat
    local d = n % 32
    digits = string.sub(alphabet, d + 1, d + 1) .. digits
    n = math.floor(n / 32)
  until n == 0
  while string.len(digits) < 4 do digits = '0' .. digits end
  local c = seq % 37
  return 'INC-' .. digits .. string.sub(check, c + 1, c + 1)
end

-- A record's fields as a flat list {name, value, name, value, …}; one of them.
local function get(flat, name)
  for i = 1, #flat, 2 do
    if flat[i] == name then return flat[i + 1] end
  end
  return nil
end

-- Writes a new record opened at `opened` (ms): fields (a flat list), first
-- timeline entries (JSON text, stamped here with the opening time), its place
-- in the queue and in the list, the call key, the caller's index.
local function create(fields, timeline, call_key, call_ttl, pseudonym, opened)
  local id = new_id()
  local rec = K.inc(id)
  redis.call('HSET', rec, 'id', id, 'opened_ms', string.format('%.0f', opened), unpack(fields))
  if not empty(pseudonym) then
    -- The caller's index (by pseudonym, never the number) for erasure; kept while an incident is open.
    local idx = K.caller(pseudonym)
    redis.call('SADD', idx, id)
    redis.call('PERSIST', idx)
    redis.call('SADD', K.caller_open(pseudonym), id)
  end
  if #timeline > 0 then
    local at = iso(opened)
    local entries = {}
    for i, e in ipairs(timeline) do entries[i] = stamped(e, at) end
    redis.call('RPUSH', K.tl(id), unpack(entries))
  end
  redis.call('ZADD', K.incidents, opened, id)
  redis.call('ZADD', K.queue, (RANK[get(fields, 'severity')] or 2) .. pad13(opened), id)
  if not empty(call_key) then redis.call('SET', K.call(call_key), id, 'EX', call_ttl) end
  return id
end

-- One level more severe (critical stays critical); the queue follows.
local function raise(id, rule)
  local k = K.inc(id)
  local f = redis.call('HMGET', k, 'severity', 'opened_ms', 'category')
  local r = RANK[f[1]] or 2
  if r == 0 then return nil end
  local to = SEVERITY[r - 1]
  redis.call('HSET', k, 'severity', to)
  if redis.call('ZSCORE', K.queue, id) then
    redis.call('ZADD', K.queue, 'XX', (r - 1) .. pad13(tonumber(f[2]) or 0), id)
  end
  tl(id, EV.classified, 'dispatchd', {category = f[3] or '', severity = to, from = f[1], rule = rule})
  return to
end

-- A major incident of `count` members within a window (surge or abandon storm).
local function declare_major(m, count, source)
  local fields = {
    'state', 'queued', 'severity', m.severity, 'category', m.category, 'summary', m.summary,
    'instructions', m.instructions or '', 'source', source, 'call_id', '', 'call_key', '',
    'caller', '', 'caller_name', '', 'caller_pseudonym', '', 'ivr_path', '', 'queue', m.queue or '',
    'wait_seconds', '', 'attempts', '0', 'exhausted', '0', 'major', '1', 'rule', m.rule,
  }
  local id = create(fields, {}, '', 0, '', now)
  tl(id, EV.opened, 'dispatchd', {rule = m.rule, major = true, count = count, window_s = m.window_ms / 1000, queue = m.queue})
  tl(id, EV.classified, 'dispatchd', {category = m.category, severity = m.severity, rule = m.rule})
  tl(id, EV.queued, 'dispatchd', {severity = m.severity})
  return id
end

-- Links an incident to its major incident, on both timelines.
local function link(major, member)
  if redis.call('SADD', K.members(major), member) == 1 then
    redis.call('HSET', K.inc(member), 'major_incident', major)
    tl(member, EV.note, 'dispatchd', {major_incident = major})
    tl(major, EV.note, 'dispatchd', {member = member})
  end
end

-- The surge rule after a new incident: count it, link it to an open major
-- incident of its category, or declare one at the threshold.
local function surge(id, category, opened, source, r, out)
  if not r or empty(category) then return end
  local zk = K.surge(category)
  redis.call('ZADD', zk, opened, id)
  redis.call('ZREMRANGEBYSCORE', zk, '-inf', '(' .. (opened - r.window_ms))
  redis.call('PEXPIRE', zk, r.window_ms)
  local mk = K.major(category)
  local major = redis.call('GET', mk)
  if major and is_open(major) then
    link(major, id)
    out.major = major
    return
  end
  if redis.call('ZCARD', zk) < r.count then return end
  local members = redis.call('ZRANGE', zk, 0, -1)
  local m = {severity = r.severity, category = category, rule = 'surge', window_ms = r.window_ms,
    summary = 'Major incident: ' .. #members .. ' ' .. category .. ' incidents within ' .. math.floor(r.window_ms / 1000) .. 's',
    instructions = redis.call('HGET', K.inc(id), 'instructions') or ''}
  major = declare_major(m, #members, source)
  redis.call('SET', mk, major)
  redis.call('DEL', zk)
  for _, member in ipairs(members) do link(major, member) end
  out.major = major
  out.major_created = true
  out.major_severity = r.severity
  out.members = #members
end

-- The caller's last incident as the repeat rule keeps it ('<id> <ms of the
-- call>'), when that call was within the window (judged by the operation's
-- clock; the keys' expiry only clears them away later) and it is still open.
local function recent(value, window_ms)
  local id, last = string.match(value or '', '^(%S+) ?(%d*)$')
  if id and (last == '' or now - tonumber(last) <= window_ms) and is_open(id) then return id end
  return nil
end

-- Opens the incident of a call, or finds it (same call key), or attaches the
-- call to the caller's open incident (repeat rule): the one of the same
-- category, or (a call that chose nothing more specific than the default)
-- the latest. A call of another category opens its own incident, and the two
-- are linked as related. Then the surge rule.
-- o: call_key, call_ttl, pseudonym, age_ms (opened that long before now), fields (flat list),
--    timeline [JSON text], state {…}, generic (classified by [ivr_default] only)
-- r: the rules in force {rep = {window_ms, raise_after}, surge = {count, window_ms, severity}} (absent = off)
-- Returns {id, created (0|1), repeat_calls?, raised?, related?, major?, major_created?, members?}
local function open(o, r)
  local callkey = K.call(o.call_key)
  local existing = redis.call('GET', callkey)
  if existing then return {id = existing, created = 0} end
  local category = get(o.fields, 'category')
  local rep = (r.rep and not empty(o.pseudonym)) and r.rep or nil
  local latest, same
  if rep then
    latest = recent(redis.call('GET', K.repeats(o.pseudonym)), rep.window_ms)
    same = o.generic and latest or recent(redis.call('HGET', K.repeat_of(o.pseudonym), category), rep.window_ms)
  end
  local stamp = string.format('%.0f', now)
  local function remember_call(id, cat)
    redis.call('SET', K.repeats(o.pseudonym), id .. ' ' .. stamp, 'PX', rep.window_ms)
    redis.call('HSET', K.repeat_of(o.pseudonym), cat, id .. ' ' .. stamp)
    redis.call('PEXPIRE', K.repeat_of(o.pseudonym), rep.window_ms)
  end
  if same then
    redis.call('SET', callkey, same, 'EX', o.call_ttl)
    remember_call(same, redis.call('HGET', K.inc(same), 'category') or category)
    local n = redis.call('HINCRBY', K.inc(same), 'repeat_calls', 1)
    local source = get(o.fields, 'source')
    tl(same, EV.repeat_call, source, {repeat_calls = n, call_id = get(o.fields, 'call_id'), source = source,
      ivr_path = get(o.fields, 'ivr_path'), queue = get(o.fields, 'queue')})
    local out = {id = same, created = 0, repeat_calls = n}
    if rep.raise_after > 0 and n % rep.raise_after == 0 then out.raised = raise(same, 'repeat_call') end
    return out
  end
  local opened = now - (tonumber(o.age_ms) or 0)
  local id = create(o.fields, o.timeline, o.call_key, o.call_ttl, o.pseudonym, opened)
  local out = {id = id, created = 1}
  if rep then
    remember_call(id, category)
    if latest then
      -- The same caller, another kind of incident: its own record, linked both ways.
      redis.call('SADD', K.related(id), latest)
      redis.call('SADD', K.related(latest), id)
      tl(id, EV.note, 'dispatchd', {related = latest, reason = 'same_caller'})
      tl(latest, EV.note, 'dispatchd', {related = id, reason = 'same_caller'})
      out.related = latest
    end
  end
  surge(id, category, opened, get(o.fields, 'source'), r.surge, out)
  return out
end

-- What is known of the call, for later events of it: never the caller's
-- number (contract §7), only its pseudonym; a call whose caller is known is
-- listed under that pseudonym for as long as the hash lives, so erasure finds it.
local function remember(call_key, state, ttl, pseudonym)
  local ak = K.acall(call_key)
  local hset = {ak}
  for k, v in pairs(state or {}) do
    hset[#hset + 1] = k
    hset[#hset + 1] = tostring(v)
  end
  -- Nothing to remember (an INVITE's call: its record has it all): nothing written.
  if #hset == 1 then return end
  if not empty(pseudonym) then
    hset[#hset + 1] = 'caller_pseudonym'
    hset[#hset + 1] = pseudonym
  end
  redis.call('HSET', unpack(hset))
  redis.call('EXPIRE', ak, ttl)
  local ps = redis.call('HGET', ak, 'caller_pseudonym')
  if ps then
    local ck = K.callercalls(ps)
    redis.call('SADD', ck, call_key)
    redis.call('EXPIRE', ck, ttl)
  end
end

-- The operation ARGV[1] names, with the arguments after it.
local function handle()
  local a = cjson.decode(ARGV[4])
  if op == 'open' then
    -- a: the calls to open, in order (concurrent calls come in one batch), each
    -- {call_key, call_ttl, state_ttl, pseudonym, age_ms, generic, state, rules,
    -- nf, nt}; after it, for each call in turn: nf record field name/value
    -- pairs, then its nt first timeline entries. Returns what `open` did for
    -- each, in order. One call's outcome never depends on its batch: they are
    -- opened one after the other, as separate scripts would. Each outcome also
    -- says whether a responder is idle now (`idle`): with nobody to offer to,
    -- the daemon need not run a dispatch pass for it (a responder who becomes
    -- free runs one, and finds the queue).
    local at, outs = 5, {}
    for i, c in ipairs(a) do
      c.fields = {unpack(ARGV, at, at + 2 * c.nf - 1)}
      at = at + 2 * c.nf
      c.timeline = {unpack(ARGV, at, at + c.nt - 1)}
      at = at + c.nt
      outs[i] = open(c, c.rules or {})
      remember(c.call_key, c.state, c.state_ttl, c.pseudonym)
    end
    local idle = redis.call('ZCARD', K.idle) > 0
    for _, o in ipairs(outs) do o.idle = idle end
    return cjson.encode(outs)

  elseif op == 'event' then
    -- a: call_key, call_ttl, state {…}, dedup, dedup_ttl, entries (JSON text, for the
    --    call's incident), changes {field = value} and own_entries: a reclassification,
    --    applied only when the incident is this call's own — a repeat call attached
    --    to the caller's incident records its IVR input but does not reclassify it,
    --    callback (an `open` argument: the incident to open when the call has none),
    --    storm {queue, count, window_ms, severity, instructions}
    -- Returns {id ('' when the call has no incident), duplicate?, callback?, storm?, storm_created?, …}
    if not empty(a.dedup) then
      local dk = K.dedup(a.dedup)
      if redis.call('EXISTS', dk) == 1 then
        return cjson.encode({id = redis.call('GET', K.call(a.call_key)) or '', duplicate = true})
      end
      redis.call('SET', dk, '1', 'EX', a.dedup_ttl)
    end
    remember(a.call_key, a.state, a.call_ttl, a.pseudonym)
    local id = redis.call('GET', K.call(a.call_key))
    local out = {id = id or ''}
    if id and redis.call('EXISTS', K.inc(id)) == 1 then
      local own = redis.call('HGET', K.inc(id), 'call_key') == a.call_key
      out.own = own
      if a.changes and own then
        local hset = {K.inc(id)}
        for k, v in pairs(a.changes) do
          hset[#hset + 1] = k
          hset[#hset + 1] = tostring(v)
        end
        if #hset > 1 then redis.call('HSET', unpack(hset)) end
        if a.changes.severity and redis.call('ZSCORE', K.queue, id) then
          local opened = tonumber(redis.call('HGET', K.inc(id), 'opened_ms')) or 0
          redis.call('ZADD', K.queue, 'XX', (RANK[a.changes.severity] or 2) .. pad13(opened), id)
        end
      end
      if a.entries then
        for _, e in ipairs(a.entries) do push_entry(id, e) end
      end
      if a.own_entries and own then
        for _, e in ipairs(a.own_entries) do push_entry(id, e) end
      end
    elseif a.callback then
      local cb = open(a.callback, a.callback.rules or {})
      out.id = cb.id
      out.callback = cb
      if cb.created == 0 and a.entries then
        -- Attached to the caller's open incident (repeat rule): the abandon is on its timeline too.
        for _, e in ipairs(a.entries) do push_entry(cb.id, e) end
      end
    end
    if a.storm then
      local s = a.storm
      local zk = K.abandons(s.queue)
      redis.call('ZADD', zk, now, a.call_key)
      redis.call('ZREMRANGEBYSCORE', zk, '-inf', '(' .. (now - s.window_ms))
      redis.call('PEXPIRE', zk, s.window_ms)
      local sk = K.storm(s.queue)
      local storm = redis.call('GET', sk)
      if storm and is_open(storm) then
        tl(storm, EV.abandoned, a.source or 'dispatchd', {queue = s.queue, call_ref = a.call_key,
          wait_seconds = s.wait_seconds, abandons = redis.call('ZCARD', zk)})
        out.storm = storm
      else
        local n = redis.call('ZCARD', zk)
        if n >= s.count then
          local m = {severity = s.severity, category = 'abandon_storm', rule = 'abandon_storm', queue = s.queue,
            window_ms = s.window_ms, instructions = s.instructions or '',
            summary = 'Abandon storm: ' .. n .. ' callers abandoned queue ' .. s.queue .. ' within ' ..
              math.floor(s.window_ms / 1000) .. 's'}
          storm = declare_major(m, n, a.source or 'dispatchd')
          redis.call('HSET', K.inc(storm), 'abandons', n)
          redis.call('SET', sk, storm)
          redis.call('DEL', zk)
          out.storm = storm
          out.storm_created = true
          out.storm_severity = s.severity
        end
      end
    end
    return cjson.encode(out)

  elseif op == 'lease' then
    -- a: {name, holder, ttl_ms, release?}: a PBX feed is read by one daemon at
    -- a time. The holder keeps it by asking again before `ttl_ms` runs out;
    -- anyone takes it once it has. Returns {held, holder}.
    local k = K.feed(a.name)
    local cur = redis.call('GET', k)
    if a.release then
      if cur == a.holder then redis.call('DEL', k) end
      return cjson.encode({held = false, holder = ''})
    end
    if not cur or cur == a.holder then
      redis.call('SET', k, a.holder, 'PX', a.ttl_ms)
      return cjson.encode({held = true, holder = a.holder})
    end
    return cjson.encode({held = false, holder = cur})

  elseif op == 'append' then
    -- a: a flat list {id, entry, id, entry, …}: entries (JSON text without their
    -- time) that need no other change, e.g. `delivered`, a call's end. An entry
    -- for a record that no longer exists is dropped (a timeline never outlives it).
    local n = 0
    for i = 1, #a, 2 do
      if redis.call('EXISTS', K.inc(a[i])) == 1 then
        push_entry(a[i], a[i + 1])
        n = n + 1
      end
    end
    return cjson.encode({appended = n})
  end
  return redis.error_reply('unknown op ' .. tostring(op))
end
