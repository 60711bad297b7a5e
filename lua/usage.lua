-- usage.lua: the key's current window totals and resets, with the ring brought up to
-- date; the resets are found here, from the oldest non-empty bucket forward, so the ring
-- never travels.
-- KEYS[1] ring; ARGV: now_ms (0 = Redis TIME), precision_ms, slots, ttl_ms
-- Returns {now, requests, input, output, reset_requests, reset_input, reset_output}.
local ring = KEYS[1]
local now = now_ms(ARGV[1])
local precision = tonumber(ARGV[2])
local slots = tonumber(ARGV[3])
if redis.call('EXISTS', ring) == 0 then return {now, 0, 0, 0, 0, 0, 0} end
local h = advance(ring, math.floor(now / precision), slots)
local reset = scan_window(ring, h, slots, precision, now, nil, nil)
write_header(ring, h)
redis.call('PEXPIRE', ring, tonumber(ARGV[4]))
return {now, h[3], h[4], h[5], reset[1], reset[2], reset[3]}
