-- Opens an incident for a call, or returns the one already opened for it.
-- Atomic: the call key, the counter, the record, its first timeline entries
-- and its place in the queue are written together or not at all.
--
-- ARGV[1] prefix          ARGV[2] call key (X-Call-Ref or Call-ID)
-- ARGV[3] call key TTL s  ARGV[4] opened_at in ms
-- ARGV[5] queue score: severity rank then opened_at (see store::queue_score)
-- ARGV[6] number of record fields (n); then n name/value pairs (a non-empty
--         `caller_pseudonym` also puts the incident in p:caller:<pseudonym>)
-- then the timeline entries (JSON text), each appended in order
-- Returns {created (0|1), id}
local p = ARGV[1]
local callkey = p .. ':call:' .. ARGV[2]
local existing = redis.call('GET', callkey)
if existing then
  return {0, existing}
end

-- Crockford base32, at least 4 symbols, plus a mod-37 check symbol.
-- Same algorithm as incident::incident_id in Rust (a unit test pins them).
local alphabet = '0123456789ABCDEFGHJKMNPQRSTVWXYZ'
local check = '0123456789ABCDEFGHJKMNPQRSTVWXYZ*~$=U'
local seq = redis.call('INCR', p .. ':seq')
local n = seq
local digits = ''
repeat
  local d = n % 32
  digits = string.sub(alphabet, d + 1, d + 1) .. digits
  n = math.floor(n / 32)
until n == 0
while string.len(digits) < 4 do
  digits = '0' .. digits
end
local c = seq % 37
local id = 'INC-' .. digits .. string.sub(check, c + 1, c + 1)

local rec = p .. ':inc:' .. id
local nfields = tonumber(ARGV[6])
local hset = {rec, 'id', id}
for i = 7, 6 + 2 * nfields do
  hset[#hset + 1] = ARGV[i]
end
redis.call('HSET', unpack(hset))
-- The caller's index (by pseudonym, never the number) for erasure; kept while an incident is open.
for i = 7, 6 + 2 * nfields, 2 do
  if ARGV[i] == 'caller_pseudonym' and ARGV[i + 1] ~= '' then
    local idx = p .. ':caller:' .. ARGV[i + 1]
    redis.call('SADD', idx, id)
    redis.call('PERSIST', idx)
  end
end
local first_entry = 7 + 2 * nfields
if #ARGV >= first_entry then
  redis.call('RPUSH', rec .. ':tl', unpack(ARGV, first_entry))
end
local opened = tonumber(ARGV[4])
redis.call('ZADD', p .. ':incidents', opened, id)
redis.call('ZADD', p .. ':queue', ARGV[5], id)
redis.call('SET', callkey, id, 'EX', tonumber(ARGV[3]))
return {1, id}
