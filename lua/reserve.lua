-- reserve.lua: checks every limit of every ring a request is held to (a key's own per
-- window and per day, its model entry's, its pool's) and, only if all of them fit, records
-- the request in each ring's current bucket — one atomic step, on one hash slot (the rings
-- share a hash tag). A denial records nothing, and is answered here, where the rings are:
-- which ring and limit, when every ring has room, when each limit next gains room, in a
-- reply of fixed size per ring (the rings never travel).
-- KEYS[1..n] rings, KEYS[n+1] the reservation's marker (written when ARGV[6] = 1): one
-- for all the rings, an entry per ring (see read_marker in window.lua)
-- ARGV: now_ms (0 = Redis TIME), n, requests, input, output, marker (1 = leave markers),
--       force (1 = charge even over the limits, for after-the-fact accounting), then per
--       ring (7 each): precision_ms, slots, limit_requests, limit_input, limit_output,
--       ttl_ms, marker_ttl_ms
-- Returns {1, now, per ring: requests, input, output, tail} when admitted,
--         {0, now, ring (1..n), limit (1..3), retry_ms, per ring: requests, input, output,
--          reset_requests, reset_input, reset_output} when denied.
local now = now_ms(ARGV[1])
local n = tonumber(ARGV[2])
local want = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local marker = tonumber(ARGV[6]) == 1
local force = tonumber(ARGV[7]) == 1

local rings = {}
local all_fit = true
for i = 1, n do
  local a = 8 + 7 * (i - 1)
  local r = {key = KEYS[i], precision = tonumber(ARGV[a]), slots = tonumber(ARGV[a + 1]),
    limit = {tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])},
    ttl = tonumber(ARGV[a + 5]), marker_ttl = tonumber(ARGV[a + 6])}
  use_ring(r.key, r.precision)
  r.max = layout(r.key).max
  r.h, r.b, r.cur, r.moved = advance(r.key, math.floor(now / r.precision), r.slots)
  -- A slot that would overflow its width denies too (retry in the next bucket); a forced
  -- charge saturates instead.
  r.fits = true
  if not force then
    r.fits = r.cur[1] + want[1] <= r.max[1] and r.cur[2] + want[2] <= r.max[2]
      and r.cur[3] + want[3] <= r.max[3]
    for k = 1, 3 do
      if r.h[k + 2] + want[k] > r.limit[k] then r.fits = false end
    end
  end
  if not r.fits then all_fit = false end
  rings[i] = r
end

if not all_fit then
  -- Each ring that does not fit says when it would; room only grows while nothing
  -- arrives, so the latest of those is the first instant every ring has room. The ring
  -- named is the one with that wait (the first on a tie).
  local reply = {0, now, 0, 0, 0}
  local worst, wait = 0, -1
  for i = 1, n do
    local r = rings[i]
    local tail = r.h[2]
    local reset, retry = scan_window(r.key, r.h, r.slots, r.precision, now,
      (not r.fits) and want or nil, r.limit)
    if not r.fits and retry > wait then worst, wait = i, retry end
    -- A denial writes only what moved. The TTL stands: the last write set it to outlast
    -- everything the ring holds; only an empty ring (made just now) needs one.
    if r.moved or r.h[2] ~= tail then write_header(r.key, r.h) end
    if r.h[3] == 0 and r.h[4] == 0 and r.h[5] == 0 then redis.call('PEXPIRE', r.key, r.ttl) end
    reply[#reply + 1] = r.h[3]; reply[#reply + 1] = r.h[4]; reply[#reply + 1] = r.h[5]
    reply[#reply + 1] = reset[1]; reply[#reply + 1] = reset[2]; reply[#reply + 1] = reset[3]
  end
  -- The first limit of that ring that does not fit; a refusal for a full slot names requests.
  local denied = 1
  local h, limit = rings[worst].h, rings[worst].limit
  for k = 3, 1, -1 do
    if h[k + 2] + want[k] > limit[k] then denied = k end
  end
  reply[3] = worst; reply[4] = denied; reply[5] = wait
  return reply
end

local reply = {1, now}
local entries, marker_ttl = {}, 0
for i = 1, n do
  local r = rings[i]
  local h, cur = r.h, r.cur
  -- Only what the slot can hold is added, so the totals stay the sums of the slots.
  local add = {math.min(want[1], r.max[1] - cur[1]), math.min(want[2], r.max[2] - cur[2]),
    math.min(want[3], r.max[3] - cur[3])}
  h[3] = h[3] + add[1]; h[4] = h[4] + add[2]; h[5] = h[5] + add[3]
  -- The tail is kept exact (the oldest non-empty bucket, or the head) by every script, so
  -- only buckets leaving the window can make it stale: it is looked for again only when
  -- the head moved. The scan stops before the head, whose counts are in the header.
  if r.moved then settle_tail(r.key, h, r.slots) end
  -- r.b is the head: the request is counted in the header, written by one SETRANGE.
  change_slot(r.key, h, r.b, r.slots, cur, add)
  write_header(r.key, h)
  -- The TTL is set once per bucket: set anywhere in bucket b, a window and two buckets
  -- outlast everything b holds, so a later write in the same bucket need not renew it.
  if r.moved then redis.call('PEXPIRE', r.key, r.ttl) end
  if marker then
    -- What was actually added (a forced charge may saturate), so a refund or settlement
    -- by this marker never takes back more than this charge put in.
    entries[#entries + 1] = marker_entry(ring_field(r.key),
      {bucket = r.b, epoch = h[6], amounts = add, expires = now + r.marker_ttl})
    if r.marker_ttl > marker_ttl then marker_ttl = r.marker_ttl end
  end
  reply[#reply + 1] = h[3]; reply[#reply + 1] = h[4]; reply[#reply + 1] = h[5]
  reply[#reply + 1] = h[2]
end
if marker then
  redis.call('SET', KEYS[n + 1], table.concat(entries), 'PX', marker_ttl)
end
return reply
