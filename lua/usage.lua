-- usage.lua: the key's current window totals, with the ring brought up to date.
-- KEYS[1] ring; ARGV: now_ms (0 = Redis TIME), precision_ms, slots, ttl_ms
-- Returns {now, requests, input, output, ring bytes ('' when empty)}.
local ring = KEYS[1]
local now = now_ms(ARGV[1])
local slots = tonumber(ARGV[3])
if redis.call('EXISTS', ring) == 0 then return {now, 0, 0, 0, ''} end
local h = advance(ring, math.floor(now / tonumber(ARGV[2])), slots)
settle_tail(ring, h, slots)
write_header(ring, h)
redis.call('PEXPIRE', ring, tonumber(ARGV[4]))
return {now, h[3], h[4], h[5], redis.call('GET', ring)}
