-- refund.lua: takes an amount back from the window (Envoy's `is_negative_hits`, or a
-- caller undoing its own charge), never below zero; what the window does not hold is not
-- owed.
-- With a marker (left by reserve.lua for this ring) the amount comes from the bucket the
-- charge went into, at most what the marker still holds, and the marker keeps the rest
-- (deleted at zero), so the window frees at the instant the charge would have left it. A
-- marker for another epoch of the ring, or whose bucket has left the window, refunds
-- nothing: that charge is no longer counted. Without a marker (none given, or it expired
-- or was used up) the amount comes from the newest bucket backwards.
-- KEYS[1] ring, KEYS[2] reservation marker (read when ARGV[8] = 1)
-- ARGV: now_ms (0 = Redis TIME), precision_ms, slots, requests, input, output, ttl_ms,
--       by marker (1 = use KEYS[2])
-- Returns {now, requests, input, output, tail} after the refund.
local ring = KEYS[1]
local now = now_ms(ARGV[1])
local slots = tonumber(ARGV[3])
local left = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
if redis.call('EXISTS', ring) == 0 then return {now, 0, 0, 0, 0} end
local h, b, cur = advance(ring, math.floor(now / tonumber(ARGV[2])), slots)

-- Takes up to `left` from bucket x whose slot holds v; returns what was taken.
local function take_from(x, v)
  local take = {math.min(left[1], v[1]), math.min(left[2], v[2]), math.min(left[3], v[3])}
  if take[1] > 0 or take[2] > 0 or take[3] > 0 then
    local xb = slot_bit(x, slots)
    redis.call('BITFIELD', ring, unpack(add_block_ops({'SET', 'u16', xb, v[1] - take[1],
      'SET', 'u32', xb + 16, v[2] - take[2], 'SET', 'u32', xb + 48, v[3] - take[3]},
      x, slots, {-take[1], -take[2], -take[3]})))
    for k = 1, 3 do
      left[k] = left[k] - take[k]
      h[k + 2] = h[k + 2] - take[k]
    end
  end
  return take
end

local m = nil
if tonumber(ARGV[8]) == 1 then
  m = read_marker(KEYS[2])
  if m and m.expires <= now then
    redis.call('DEL', KEYS[2])
    m = nil
  end
end
if m then
  if m.epoch == h[6] and m.bucket > b - slots then
    for k = 1, 3 do left[k] = math.min(left[k], m.amounts[k]) end
    local xb = slot_bit(m.bucket, slots)
    local v = redis.call('BITFIELD_RO', ring, 'GET', 'u16', xb, 'GET', 'u32', xb + 16, 'GET', 'u32', xb + 48)
    local take = take_from(m.bucket, v)
    for k = 1, 3 do m.amounts[k] = m.amounts[k] - take[k] end
    if m.amounts[1] == 0 and m.amounts[2] == 0 and m.amounts[3] == 0 then
      redis.call('DEL', KEYS[2])
    else
      redis.call('SET', KEYS[2], marker_value(m), 'KEEPTTL')
    end
  end
else
  local x = b
  local v = cur
  while (left[1] > 0 or left[2] > 0 or left[3] > 0) and x > b - slots do
    if x ~= b then
      local xb = slot_bit(x, slots)
      v = redis.call('BITFIELD_RO', ring, 'GET', 'u16', xb, 'GET', 'u32', xb + 16, 'GET', 'u32', xb + 48)
    end
    take_from(x, v)
    x = x - 1
  end
end
settle_tail(ring, h, slots)
write_header(ring, h)
redis.call('PEXPIRE', ring, tonumber(ARGV[7]))
return {now, h[3], h[4], h[5], h[2]}
