-- reserve.lua: checks all three limits and, only if every one fits, records the request
-- in the current bucket — one atomic step. A denial records nothing, and is answered here,
-- where the ring is: which limit, when to retry, when each limit next gains room, in a
-- reply of fixed size (the ring never travels).
-- KEYS[1] ring, KEYS[2] reservation marker (written when ARGV[11] = 1)
-- ARGV: now_ms (0 = Redis TIME), precision_ms, slots, requests, input, output,
--       limit_requests, limit_input, limit_output, ttl_ms, marker (1 = leave a marker),
--       force (1 = charge even over the limits, for after-the-fact accounting)
-- Returns {1, now, requests, input, output, tail, bucket} when admitted,
--         {0, now, requests, input, output, limit (1..3), retry_ms, reset_requests,
--          reset_input, reset_output} when denied.
local ring = KEYS[1]
local now = now_ms(ARGV[1])
local precision = tonumber(ARGV[2])
local slots = tonumber(ARGV[3])
local want = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local limit = {tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])}
local ttl = tonumber(ARGV[10])
local marker = tonumber(ARGV[11]) == 1
local force = tonumber(ARGV[12]) == 1

local h, b, cur, moved = advance(ring, math.floor(now / precision), slots)
-- A slot that would overflow its width denies too (retry in the next bucket); a forced
-- charge saturates instead.
local fits = true
if not force then
  fits = cur[1] + want[1] <= U16_MAX and cur[2] + want[2] <= U32_MAX and cur[3] + want[3] <= U32_MAX
  for k = 1, 3 do
    if h[k + 2] + want[k] > limit[k] then fits = false end
  end
end
if not fits then
  -- The first limit that does not fit; a refusal for a full slot names requests.
  local denied = 1
  for k = 3, 1, -1 do
    if h[k + 2] + want[k] > limit[k] then denied = k end
  end
  local tail = h[2]
  local reset, retry = scan_window(ring, h, slots, precision, now, want, limit)
  -- A denial writes only what moved. The TTL stands: the last write set it to outlast
  -- everything the ring holds; only an empty ring (made just now) needs one.
  if moved or h[2] ~= tail then write_header(ring, h) end
  if h[3] == 0 and h[4] == 0 and h[5] == 0 then redis.call('PEXPIRE', ring, ttl) end
  return {0, now, h[3], h[4], h[5], denied, retry, reset[1], reset[2], reset[3]}
end

-- Only what the slot can hold is added, so the totals stay the sums of the slots.
local add = {math.min(want[1], U16_MAX - cur[1]), math.min(want[2], U32_MAX - cur[2]),
  math.min(want[3], U32_MAX - cur[3])}
h[3] = h[3] + add[1]; h[4] = h[4] + add[2]; h[5] = h[5] + add[3]
-- The tail scan stops at the head at the latest, so it may run before the slot is written.
settle_tail(ring, h, slots)
local bit = slot_bit(b, slots)
redis.call('BITFIELD', ring, unpack(add_block_ops({
  'INCRBY', 'u16', bit, add[1], 'INCRBY', 'u32', bit + 16, add[2], 'INCRBY', 'u32', bit + 48, add[3],
  'SET', 'i64', 0, h[1], 'SET', 'i64', 64, h[2], 'SET', 'i64', 128, h[3], 'SET', 'i64', 192, h[4],
  'SET', 'i64', 256, h[5]}, b, slots, add)))
redis.call('PEXPIRE', ring, ttl)
if marker then
  -- What was actually added (a forced charge may saturate), so a refund or settlement
  -- by this marker never takes back more than this charge put in.
  redis.call('SET', KEYS[2],
    marker_value({bucket = b, epoch = h[6], amounts = add, expires = now + ttl}), 'PX', ttl)
end
return {1, now, h[3], h[4], h[5], h[2], b}
