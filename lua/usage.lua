-- usage.lua: each ring's current window totals and resets, with the ring brought up to
-- date; the resets are found here, from the oldest non-empty bucket forward, so the ring
-- never travels.
-- KEYS[1..n] rings; ARGV: now_ms (0 = Redis TIME), n, then per ring: precision_ms, slots,
-- ttl_ms
-- Returns {now, per ring: requests, input, output, reset_requests, reset_input,
-- reset_output}.
local now = now_ms(ARGV[1])
local n = tonumber(ARGV[2])
local reply = {now}
for i = 1, n do
  local a = 3 + 3 * (i - 1)
  local ring = KEYS[i]
  local precision, slots = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  use_ring(ring, precision)
  if redis.call('EXISTS', ring) == 0 then
    for _ = 1, 6 do reply[#reply + 1] = 0 end
  else
    local h = advance(ring, math.floor(now / precision), slots)
    local reset = scan_window(ring, h, slots, precision, now, nil, nil)
    write_header(ring, h)
    redis.call('PEXPIRE', ring, tonumber(ARGV[a + 2]))
    reply[#reply + 1] = h[3]; reply[#reply + 1] = h[4]; reply[#reply + 1] = h[5]
    reply[#reply + 1] = reset[1]; reply[#reply + 1] = reset[2]; reply[#reply + 1] = reset[3]
  end
end
return reply
