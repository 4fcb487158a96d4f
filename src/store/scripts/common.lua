-- Shared by dispatch.lua and intake.lua: each is loaded as this file followed
-- by its own text (store/mod.rs), so the two agree on arguments and helpers.
--
-- ARGV[1] op   ARGV[2] prefix (p)   ARGV[3] now (ms)   ARGV[4] now (RFC 3339)
local op, p, now, now_iso = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

local function inc_key(id) return p .. ':inc:' .. id end

-- Milliseconds in 13 digits: the queue score is a severity rank followed by this.
local function pad13(ms)
  local s = string.format('%.0f', tonumber(ms) or 0)
  return string.rep('0', 13 - string.len(s)) .. s
end

-- Appends one entry to an incident's timeline.
local function tl(id, event, actor, detail)
  redis.call('RPUSH', inc_key(id) .. ':tl',
    cjson.encode({at = now_iso, event = event, actor = actor, detail = detail}))
end

local function empty(v) return v == false or v == nil or v == '' end

