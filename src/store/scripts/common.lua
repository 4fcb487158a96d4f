-- Shared by the three scripts (intake, dispatch, admin). They are loaded into
-- Redis once, as one function library (store/prelude.rs): the prelude
-- generated from the Rust types (RANK, SEVERITY, PROGRESS, EV, the id
-- alphabets, `new_keys`), this file, then each script in a block of its own
-- with its `handle()` registered as a function. What is defined here is made
-- once when the library loads, not on every call.
--
-- Every call: ARGV[1] op   ARGV[2] prefix (p)   ARGV[3] now in ms, or '' for
-- Redis's own clock. One clock serves every daemon sharing this Redis:
-- deadlines, leases and timeline times are all judged by `TIME` here (tests
-- pass an explicit time).
local ARGV, op, p, now, now_text, K
local keys_of = {}
local strict = false

-- @keys@ (generated: new_keys(prefix), the table of every key name of store/keys.rs: K.queue, K.inc(id), …)

-- The start of every call: its arguments, the time, the keys of its prefix.
-- (The first call also makes EV strict: the library's load has no globals.)
local function begin(args)
  if not strict then
    setmetatable(EV, STRICT)
    strict = true
  end
  ARGV, op, p = args, args[1], args[2]
  now = tonumber(args[3])
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  now_text = nil
  K = keys_of[p]
  if not K then
    K = new_keys(p)
    keys_of[p] = K
  end
end

-- Milliseconds since the epoch → RFC 3339 UTC with milliseconds (the civil
-- calendar from a day number, after Howard Hinnant's days_from_civil inverse).
local function iso(ms)
  ms = math.floor(ms)
  local s = math.floor(ms / 1000)
  local milli = ms - s * 1000
  local days = math.floor(s / 86400)
  local secs = s - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', y, m, d,
    math.floor(secs / 3600), math.floor(secs % 3600 / 60), secs % 60, milli)
end

-- `now` as text, made once per call and only when an entry needs it.
local function now_iso()
  if not now_text then now_text = iso(now) end
  return now_text
end

-- Milliseconds in 13 digits: the queue score is a severity rank followed by this.
local function pad13(ms)
  local s = string.format('%.0f', tonumber(ms) or 0)
  return string.rep('0', 13 - string.len(s)) .. s
end

-- Appends one entry (JSON text) to an incident's timeline. Entries of events
-- a caller or the PBX can repeat without end (CAPPED: abandons on a storm
-- incident, repeat calls, IVR input, notes) are kept up to TIMELINE_CAP
-- entries; beyond that they are only counted, by event, in p:inc:<id>:omitted.
-- The dispatch's own entries (offers, answers, progress) are always kept.
local function push(id, event, text)
  local key = K.tl(id)
  if CAPPED[event] and redis.call('LLEN', key) >= TIMELINE_CAP then
    redis.call('HINCRBY', K.omitted(id), event, 1)
  else
    redis.call('RPUSH', key, text)
  end
end

-- Appends one entry to an incident's timeline.
local function tl(id, event, actor, detail)
  push(id, event, cjson.encode({at = now_iso(), event = event, actor = actor, detail = detail}))
end

-- An entry written by Rust without its time (`{"event":…}`), stamped: `{"at":…,"event":…}`.
local function stamped(entry, at_iso)
  return '{"at":"' .. (at_iso or now_iso()) .. '",' .. string.sub(entry, 2)
end

-- Appends an entry written by Rust (its event is its first field), stamped now.
local function push_entry(id, entry)
  push(id, string.match(entry, '^{"event":"([%w_]+)"') or '', stamped(entry))
end

local function empty(v) return v == false or v == nil or v == '' end

-- (cjson encodes an empty list as {}: the Rust side reads either as empty.)

-- Whether a responder can be reached now: a live presence lease (its
-- websocket is open on some daemon), or channels of its own (contract §11:
-- a PBX call, a SIP MESSAGE, a webhook).
local function reachable(lease, channels)
  return (not empty(lease) and tonumber(lease) > now) or not empty(channels)
end

-- Puts a responder in the idle set when it can take an offer, else takes it out.
local function refresh_idle(rid)
  local r = redis.call('HMGET', K.resp(rid), 'availability', 'lease', 'offer', 'assignment', 'tier', 'last', 'channels')
  local ok = r[1] == 'available' and reachable(r[2], r[7])
    and empty(r[3]) and empty(r[4]) and not empty(r[5])
    and redis.call('SISMEMBER', K.roster, rid) == 1
  if ok then
    redis.call('ZADD', K.idle, r[5] .. pad13(r[6] or 0), rid)
  else
    redis.call('ZREM', K.idle, rid)
  end
  return ok
end
