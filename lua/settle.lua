-- settle.lua: corrects a reservation's own bucket to the real output tokens, once, in
-- every ring the reservation was charged to, in one step.
-- The marker left by reserve.lua is consumed, so a second report changes nothing.
-- Only the ring the marker was written for is touched (same epoch), and only while its
-- bucket is in the window: a ring evicted and recreated since, or a bucket that has left,
-- is not.
-- KEYS[1..n] rings, KEYS[n+1] the reservation's marker
-- ARGV: now_ms (0 = Redis TIME), n, actual output tokens, then per ring: precision_ms, slots
-- Returns per ring {state, applied delta}: state 0 = no such reservation (settled before,
-- or expired), 1 = settled into its bucket, 2 = settled but its ring or bucket is gone.
local now = now_ms(ARGV[1])
local n = tonumber(ARGV[2])
local actual = tonumber(ARGV[3])

local function settle(ring, m, precision, slots)
  if not m or m.expires <= now then return 0, 0 end
  use_ring(ring, precision)
  local b = math.floor(now / precision)
  local h = read_header(ring)
  if h[1] == 0 or h[6] ~= m.epoch or math.max(b, h[1]) - m.bucket >= slots then return 2, 0 end

  -- Against what the marker still holds: a refund by this marker may have taken some back.
  -- (A bucket still the head is in the header: then no slot is read or written.)
  local v = counts_of(ring, h, m.bucket, slots)
  local old = v[3]
  local new = old + actual - m.amounts[3]
  if new < 0 then new = 0 end
  if new > U32_MAX then new = U32_MAX end
  if new ~= old then
    change_slot(ring, h, m.bucket, slots, v, {0, 0, new - old})
    h[5] = h[5] + new - old
    if new > 0 and m.bucket < h[2] then
      -- A bucket that held nothing may sit before the tail: it is the oldest now.
      h[2] = m.bucket
    elseif new == 0 and v[1] == 0 and v[2] == 0 and m.bucket == h[2] then
      -- The oldest bucket emptied: the tail moves on to the next non-empty one.
      settle_tail(ring, h, slots)
    end
    write_header(ring, h)
  end
  return 1, new - old
end

-- The whole marker is taken at once: a reservation is settled once, in all its rings.
local entries = read_marker(KEYS[n + 1])
if entries then redis.call('DEL', KEYS[n + 1]) end
local reply = {}
for i = 1, n do
  local a = 4 + 2 * (i - 1)
  local state, delta = settle(KEYS[i], entries and entries[ring_field(KEYS[i])],
    tonumber(ARGV[a]), tonumber(ARGV[a + 1]))
  reply[#reply + 1] = state; reply[#reply + 1] = delta
end
return reply
