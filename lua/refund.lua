-- refund.lua: takes an amount back from the window (Envoy's `is_negative_hits`), from the
-- newest bucket backwards, never below zero; what the window does not hold is not owed.
-- KEYS[1] ring
-- ARGV: now_ms (0 = Redis TIME), precision_ms, slots, requests, input, output, ttl_ms
-- Returns {now, requests, input, output, tail} after the refund.
local ring = KEYS[1]
local now = now_ms(ARGV[1])
local slots = tonumber(ARGV[3])
local left = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
if redis.call('EXISTS', ring) == 0 then return {now, 0, 0, 0, 0} end
local h, b, cur = advance(ring, math.floor(now / tonumber(ARGV[2])), slots)
local x = b
local v = cur
while (left[1] > 0 or left[2] > 0 or left[3] > 0) and x > b - slots do
  if x ~= b then
    local xb = slot_bit(x, slots)
    v = redis.call('BITFIELD_RO', ring, 'GET', 'u16', xb, 'GET', 'u32', xb + 16, 'GET', 'u32', xb + 48)
  end
  local take = {math.min(left[1], v[1]), math.min(left[2], v[2]), math.min(left[3], v[3])}
  if take[1] > 0 or take[2] > 0 or take[3] > 0 then
    local xb = slot_bit(x, slots)
    redis.call('BITFIELD', ring, 'SET', 'u16', xb, v[1] - take[1],
      'SET', 'u32', xb + 16, v[2] - take[2], 'SET', 'u32', xb + 48, v[3] - take[3])
    for k = 1, 3 do
      left[k] = left[k] - take[k]
      h[k + 2] = h[k + 2] - take[k]
    end
  end
  x = x - 1
end
settle_tail(ring, h, slots)
write_header(ring, h)
redis.call('PEXPIRE', ring, tonumber(ARGV[7]))
return {now, h[3], h[4], h[5], h[2]}
