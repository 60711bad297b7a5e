-- settle.lua: corrects a reservation's own bucket to the real output tokens, once.
-- The marker left by reserve.lua is consumed, so a second report changes nothing. Only the
-- ring the marker was written for is touched (same epoch), and only while its bucket is
-- in the window: a ring evicted and recreated since, or a bucket that has left, is not.
-- KEYS[1] ring, KEYS[2] reservation marker
-- ARGV: now_ms (0 = Redis TIME), precision_ms, slots, actual output tokens
-- Returns {state, applied delta}: state 0 = no such reservation (settled before, or
-- expired), 1 = settled into its bucket, 2 = settled but its ring or bucket is gone.
local ring = KEYS[1]
local now = now_ms(ARGV[1])
local m = read_marker(KEYS[2])
if not m then return {0, 0} end
redis.call('DEL', KEYS[2])
if m.expires <= now then return {0, 0} end
local slots = tonumber(ARGV[3])
local b = math.floor(now / tonumber(ARGV[2]))
local h = read_header(ring)
if h[1] == 0 or h[6] ~= m.epoch or math.max(b, h[1]) - m.bucket >= slots then return {2, 0} end

-- Against what the marker still holds: a refund by this marker may have taken some back.
local bit = slot_bit(m.bucket, slots) + 48
local old = redis.call('BITFIELD_RO', ring, 'GET', 'u32', bit)[1]
local new = old + tonumber(ARGV[4]) - m.amounts[3]
if new < 0 then new = 0 end
if new > U32_MAX then new = U32_MAX end
if new ~= old then
  -- A bucket that held nothing may sit before the tail; the tail must stay a lower bound.
  if new > 0 and m.bucket < h[2] then h[2] = m.bucket end
  redis.call('BITFIELD', ring, unpack(add_block_ops({'SET', 'u32', bit, new, 'SET', 'i64', 64, h[2],
    'SET', 'i64', 256, h[5] + new - old}, m.bucket, slots, {0, 0, new - old})))
end
return {1, new - old}
