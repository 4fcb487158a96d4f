-- Changes fields of an existing incident and appends to its timeline, atomically.
-- While the incident waits in the queue, a new severity moves it there too.
--
-- ARGV[1] prefix   ARGV[2] id
-- ARGV[3] new severity rank, or '' to leave its place in the queue alone
-- ARGV[4] number of fields (n); then n name/value pairs; then timeline entries
-- Returns 1, or 0 when there is no such incident (nothing is written then).
local p = ARGV[1]
local id = ARGV[2]
local rec = p .. ':inc:' .. id
if redis.call('EXISTS', rec) == 0 then
  return 0
end
local nfields = tonumber(ARGV[4])
if nfields > 0 then
  local hset = {rec}
  for i = 5, 4 + 2 * nfields do
    hset[#hset + 1] = ARGV[i]
  end
  redis.call('HSET', unpack(hset))
end
for i = 5 + 2 * nfields, #ARGV do
  redis.call('RPUSH', rec .. ':tl', ARGV[i])
end
if ARGV[3] ~= '' and redis.call('ZSCORE', p .. ':queue', id) then
  -- score = rank followed by opened_ms in 13 digits (exact in a double)
  local opened = redis.call('HGET', rec, 'opened_ms') or '0'
  local score = ARGV[3] .. string.rep('0', 13 - string.len(opened)) .. opened
  redis.call('ZADD', p .. ':queue', 'XX', score, id)
end
return 1
