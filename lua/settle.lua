-- settle.lua: corrects a reservation's own bucket to the real output tokens, once.
-- The marker left by reserve.lua is consumed, so a second report changes nothing; a
-- bucket that has already left the window is not touched.
-- KEYS[1] ring, KEYS[2] reservation marker
-- ARGV: now_ms (0 = Redis TIME), precision_ms, slots, actual output tokens
-- Returns {state, applied delta}: state 0 = no such reservation (settled before, or
-- expired), 1 = settled into its bucket, 2 = settled but its bucket had left the window.
local ring = KEYS[1]
local m = redis.call('GET', KEYS[2])
if not m then return {0, 0} end
redis.call('DEL', KEYS[2])
local sep = string.find(m, ':', 1, true)
local bucket = tonumber(string.sub(m, 1, sep - 1))
local reserved = tonumber(string.sub(m, sep + 1))
local slots = tonumber(ARGV[3])
local b = math.floor(now_ms(ARGV[1]) / tonumber(ARGV[2]))
local h = read_header(ring)
if h[1] == 0 or math.max(b, h[1]) - bucket >= slots then return {2, 0} end

local bit = slot_bit(bucket, slots) + 48
local old = redis.call('BITFIELD_RO', ring, 'GET', 'u32', bit)[1]
local new = old + tonumber(ARGV[4]) - reserved
if new < 0 then new = 0 end
if new > U32_MAX then new = U32_MAX end
if new ~= old then
  redis.call('BITFIELD', ring, 'SET', 'u32', bit, new, 'SET', 'i64', 256, h[5] + new - old)
end
return {1, new - old}
