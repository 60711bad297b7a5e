-- refund.lua: takes an amount back from each ring given (Envoy's `is_negative_hits`, or a
-- caller undoing its own charge), never below zero; what a window does not hold is not
-- owed. All rings in one step.
-- With a marker (left by reserve.lua, an entry per ring) the amount comes from the bucket
-- the charge went into, at most what the ring's entry still holds, and the entry keeps the
-- rest (dropped at zero; the marker goes with its last entry), so the window frees at the
-- instant the charge would have left it. An entry for another epoch of the ring, or whose
-- bucket has left the window, refunds nothing: that charge is no longer counted. Without
-- an entry (no marker given, or it expired or was used up) the amount comes from the
-- newest bucket backwards.
-- KEYS[1..n] rings, KEYS[n+1] the reservation's marker (read when ARGV[6] = 1)
-- ARGV: now_ms (0 = Redis TIME), n, requests, input, output, by marker (1 = use the
--       marker), then per ring: precision_ms, slots, ttl_ms
-- Returns {now, per ring: requests, input, output, tail} after the refund.
local now = now_ms(ARGV[1])
local n = tonumber(ARGV[2])
local amount = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local by_marker = tonumber(ARGV[6]) == 1

local entries = by_marker and read_marker(KEYS[n + 1]) or nil
local marker_changed = false

local function refund(ring, precision, slots, ttl)
  if redis.call('EXISTS', ring) == 0 then return {0, 0, 0, 0} end
  use_ring(ring, precision)
  local left = {amount[1], amount[2], amount[3]}
  local h, b, cur = advance(ring, math.floor(now / precision), slots)

  -- Takes up to `left` from bucket x whose slot holds v; returns what was taken.
  local function take_from(x, v)
    local take = {math.min(left[1], v[1]), math.min(left[2], v[2]), math.min(left[3], v[3])}
    if take[1] > 0 or take[2] > 0 or take[3] > 0 then
      change_slot(ring, h, x, slots, v, {-take[1], -take[2], -take[3]})
      for k = 1, 3 do
        left[k] = left[k] - take[k]
        h[k + 2] = h[k + 2] - take[k]
      end
    end
    return take
  end

  local field = ring_field(ring)
  local m = entries and entries[field]
  if m and m.expires <= now then
    entries[field] = nil
    marker_changed = true
    m = nil
  end
  if m then
    if m.epoch == h[6] and m.bucket > b - slots then
      for k = 1, 3 do left[k] = math.min(left[k], m.amounts[k]) end
      local take = take_from(m.bucket, counts_of(ring, h, m.bucket, slots))
      for k = 1, 3 do m.amounts[k] = m.amounts[k] - take[k] end
      if m.amounts[1] == 0 and m.amounts[2] == 0 and m.amounts[3] == 0 then
        entries[field] = nil
      end
      marker_changed = true
    end
  else
    -- Newest first, and only while the window still holds some of what is owed: the
    -- totals are its sums, and nothing lies before the tail (a lower bound of the oldest
    -- non-empty bucket), so a refund larger than the window stops there, not a window on.
    local x = b
    local v = cur
    local function owed()
      return (left[1] > 0 and h[3] > 0) or (left[2] > 0 and h[4] > 0)
        or (left[3] > 0 and h[5] > 0)
    end
    while owed() and x > b - slots and x >= h[2] do
      if x ~= b then v = counts_of(ring, h, x, slots) end
      take_from(x, v)
      x = x - 1
    end
  end
  settle_tail(ring, h, slots)
  write_header(ring, h)
  redis.call('PEXPIRE', ring, ttl)
  return {h[3], h[4], h[5], h[2]}
end

local reply = {now}
for i = 1, n do
  local a = 7 + 3 * (i - 1)
  local r = refund(KEYS[i], tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]))
  for k = 1, 4 do reply[#reply + 1] = r[k] end
end
if marker_changed then write_marker(KEYS[n + 1], entries) end
return reply
