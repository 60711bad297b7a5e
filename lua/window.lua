-- window.lua: the ring layout shared by every llm-ratelimit script (prepended to each).
--
-- One Redis string per key and window shape holds the whole sliding window:
--   header (60 bytes): head bucket, tail bucket, requests, input, output totals, epoch
--     (Redis TIME in µs when this ring was created), each an i64; then the head bucket's
--     own counts: requests, input, output, each a u32
--   then `slots` slots: requests, input, output (10 bytes: u16, u32, u32; 12 bytes, three
--     u32s, in buckets of a second or more — see NARROW and WIDE below)
--   then one block sum per `block_len(slots)` consecutive slots (the last block may be
--     shorter), 3 x i64 (24 bytes): the sums of requests, input and output over its slots
-- Bucket x lives in slot x % slots, except the head: its counts live in the header and its
-- slot stays zero until the head moves on, when they are written there. So the usual
-- admission (a request in the head's bucket) and a settlement there read and write the
-- header only: one GETRANGE and one SETRANGE per ring.
-- The window at bucket b is the buckets b-slots+1 .. b, with slots = window/precision + 1,
-- so it always covers at least the exact window.
-- The totals are the sums over the window (the slots and the head's counts), kept up to
-- date as buckets leave, so a decision reads five numbers instead of summing the ring.
-- The block sums (of the slots, so never of the head's counts) let a denial find when it
-- fits, and when each limit next gains room, by skipping whole blocks: O(sqrt(slots))
-- slots read instead of the whole window, so a request that fits only after nearly the
-- whole window leaves costs about what an admission does. Every write to a slot writes its
-- block sum in the same script call.
-- The epoch tells rings apart: a ring recreated after idling a whole window, or after Redis
-- evicted it (or someone deleted it), has a new one, so a reservation marker written for
-- the old ring cannot change the new one's buckets.

local HDR_BYTES = 60
local BLOCK_BYTES = 24
local U16_MAX = 65535
local U32_MAX = 4294967295
local BATCH = 128

-- A slot's counters: requests, input tokens, output tokens, big-endian. Requests are a u16
-- in buckets shorter than a second (65,535 in a bucket is over 65,535 a second) and a u32
-- in longer ones (a day ring's one-minute buckets, which all of a pool's keys share), so no
-- bucket caps a key or a pool below its limits. A script names each ring's precision, and
-- so its slot width, before it touches the ring (use_ring).
local NARROW = {bytes = 10, format = 'I2I4I4', max = {U16_MAX, U32_MAX, U32_MAX}, runs = {}}
local WIDE = {bytes = 12, format = 'I4I4I4', max = {U32_MAX, U32_MAX, U32_MAX}, runs = {}}
local layouts = {}

local function use_ring(ring, precision)
  if precision >= 1000 then layouts[ring] = WIDE else layouts[ring] = NARROW end
end

local function layout(ring)
  return layouts[ring] or error('llm-ratelimit: no slot layout for ' .. ring)
end

-- Slots per block: the square root balances the blocks a scan skips against the slots
-- it reads inside one block.
local function block_len(slots)
  return math.ceil(math.sqrt(slots))
end

local function blocks_at(ring, slots)
  return HDR_BYTES + layout(ring).bytes * slots
end

local function ring_bytes(ring, slots)
  return blocks_at(ring, slots) + BLOCK_BYTES * math.ceil(slots / block_len(slots))
end

local function now_ms(arg)
  local now = tonumber(arg)
  if now == nil or now <= 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end

-- Reads and writes go through GETRANGE/SETRANGE and struct, not BITFIELD: inside a
-- script each BITFIELD op costs about what a whole GETRANGE or SETRANGE does (Redis parses
-- and answers each op), so a ring's fields are read and written as runs of bytes. The
-- layout is BITFIELD's: big-endian, so `i64` is struct's `>i8`, `u16` `>I2`, `u32` `>I4`.
-- (The head bucket's counts in the header are u32s in every ring.)

local HEADER_FORMAT = '>i8i8i8i8i8i8I4I4I4'

-- Reads the header: {head, tail, requests, input, output, epoch, and the head bucket's
-- requests, input, output}; all zero for a missing key.
local function read_header(ring)
  local s = redis.call('GETRANGE', ring, 0, HDR_BYTES - 1)
  if #s < HDR_BYTES then return {0, 0, 0, 0, 0, 0, 0, 0, 0} end
  local head, tail, r, i, o, epoch, hr, hi, ho = struct.unpack(HEADER_FORMAT, s)
  return {head, tail, r, i, o, epoch, hr, hi, ho}
end

-- Writes the whole header, one SETRANGE.
local function write_header(ring, h)
  redis.call('SETRANGE', ring, 0, struct.pack(HEADER_FORMAT, h[1], h[2], h[3], h[4], h[5],
    h[6], h[7], h[8], h[9]))
end

-- The head bucket's counts, as a slot's: {requests, input, output}.
local function head_counts(h)
  return {h[7], h[8], h[9]}
end

local function slot_at(ring, bucket, slots)
  return HDR_BYTES + layout(ring).bytes * (bucket % slots)
end

-- A bucket's slot (never the head's: see head_counts): {requests, input, output}.
local function read_slot(ring, bucket, slots)
  local l = layout(ring)
  local from = slot_at(ring, bucket, slots)
  local r, i, o = struct.unpack('>' .. l.format,
    redis.call('GETRANGE', ring, from, from + l.bytes - 1))
  return {r, i, o}
end

-- Adds d[1..3] to the block sum of the block holding bucket's slot. One field (a
-- settlement changes only output) is one BITFIELD INCRBY, which costs about what one
-- GETRANGE does; more fields are read and written back, two calls, cheaper than a
-- BITFIELD of two or three INCRBYs.
local function add_block(ring, bucket, slots, d)
  if d[1] == 0 and d[2] == 0 and d[3] == 0 then return end
  local from = blocks_at(ring, slots) + BLOCK_BYTES * math.floor((bucket % slots) / block_len(slots))
  local only = nil
  for k = 1, 3 do
    if d[k] ~= 0 then
      if only then only = 0 else only = k end
    end
  end
  if only ~= 0 then
    redis.call('BITFIELD', ring, 'INCRBY', 'i64', (from + 8 * (only - 1)) * 8, d[only])
    return
  end
  local r, i, o = struct.unpack('>i8i8i8', redis.call('GETRANGE', ring, from, from + BLOCK_BYTES - 1))
  redis.call('SETRANGE', ring, from, struct.pack('>i8i8i8', r + d[1], i + d[2], o + d[3]))
end

-- Sets bucket's counts from v to v + d: the head's in the header h (written by the
-- caller), any other bucket's in its slot, with its block sum changed by d in the same
-- call. Every change to counts goes through here, so the block sums stay the sums of
-- their slots.
local function change_slot(ring, h, bucket, slots, v, d)
  if bucket == h[1] then
    h[7] = v[1] + d[1]; h[8] = v[2] + d[2]; h[9] = v[3] + d[3]
    return
  end
  redis.call('SETRANGE', ring, slot_at(ring, bucket, slots),
    struct.pack('>' .. layout(ring).format, v[1] + d[1], v[2] + d[2], v[3] + d[3]))
  add_block(ring, bucket, slots, d)
end

-- A bucket's counts: the head's from the header h, any other's from its slot.
local function counts_of(ring, h, bucket, slots)
  if bucket == h[1] then return head_counts(h) end
  return read_slot(ring, bucket, slots)
end

-- A new ring's epoch: Redis TIME in µs (exact in a Lua double until the year 2255), and
-- never the epoch of the ring it replaces.
local function new_epoch(old)
  local t = redis.call('TIME')
  local e = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if e == old then e = e + 1 end
  return e
end

-- A reservation's marker: one string per reservation, whatever the number of rings it was
-- charged to, holding per ring what the charge added to which bucket of which epoch of the
-- ring, and when that entry stops counting (the store's clock, so a test clock and Redis
-- TIME read alike). Binary, one entry per ring, back to back: the ring's name (its key
-- after the part every ring of the hash tag shares) as a u16 length and its bytes, then
-- bucket, epoch, requests, input, output and expires_ms as big-endian i64. struct packs
-- and reads an entry in a tenth of the time string.format and a pattern match took.
local MARKER_ENTRY = '>Hc0i8i8i8i8i8i8'

local function ring_field(ring)
  local _, e = string.find(ring, '}:v4:', 1, true)
  return string.sub(ring, (e or 0) + 1)
end

-- Reads a marker: {[ring field] = {bucket, epoch, amounts = {r, i, o}, expires}}, or nil.
local function read_marker(key)
  local m = redis.call('GET', key)
  if not m then return nil end
  local entries = {}
  local at = 1
  while at <= #m do
    local f, b, e, r, i, o, x, nxt = struct.unpack(MARKER_ENTRY, m, at)
    entries[f] = {bucket = b, epoch = e, amounts = {r, i, o}, expires = x}
    at = nxt
  end
  return entries
end

local function marker_entry(f, m)
  return struct.pack(MARKER_ENTRY, #f, f, m.bucket, m.epoch,
    m.amounts[1], m.amounts[2], m.amounts[3], m.expires)
end

-- Writes back what is left of a marker (its TTL kept), or deletes it when nothing is.
local function write_marker(key, entries)
  local parts = {}
  for f, m in pairs(entries) do parts[#parts + 1] = marker_entry(f, m) end
  if #parts == 0 then
    redis.call('DEL', key)
  else
    redis.call('SET', key, table.concat(parts), 'KEEPTTL')
  end
end

-- struct formats of n consecutive slots of layout l, made once per length per script call.
local function slot_format(l, n)
  local f = l.runs[n]
  if f == nil then
    f = '>' .. string.rep(l.format, n)
    l.runs[n] = f
  end
  return f
end

-- Reads the slots of buckets first..last (at most `slots` of them) and calls
-- fn(bucket, requests, input, output) for each until fn returns true. With `grow`, the
-- first read is of one slot (a scan that usually stops at once stays cheap) and the next
-- ones whole batches; otherwise every read is a whole batch. Each read is one GETRANGE of
-- consecutive slots (split where the ring wraps), decoded by one struct.unpack: far cheaper
-- per slot than a BITFIELD_RO of three GETs each. Returns true when fn stopped it.
local function each_slot(ring, slots, first, last, fn, grow)
  local l = layout(ring)
  local x = first
  local batch = grow and 1 or BATCH
  while x <= last do
    local upto = math.min(last, x + batch - 1)
    local s0 = x % slots
    -- the last bucket before the ring wraps back to slot 0
    upto = math.min(upto, x + slots - 1 - s0)
    local from = HDR_BYTES + l.bytes * s0
    local n = upto - x + 1
    local bytes = redis.call('GETRANGE', ring, from, from + l.bytes * n - 1)
    -- One struct.unpack for the whole run: a call per slot cost more than the read.
    local v = {struct.unpack(slot_format(l, n), bytes)}
    for k = 0, n - 1 do
      if fn(x + k, v[3 * k + 1], v[3 * k + 2], v[3 * k + 3]) then return true end
    end
    x = upto + 1
    batch = BATCH
  end
end

-- Brings the ring to bucket b: each bucket that leaves the window is subtracted from the
-- totals and its slot zeroed, and the old head's counts move from the header to its slot.
-- Amortised O(1): a bucket leaves once. A ring idle for a whole window is dropped at once.
-- A clock that steps back is held at the last head.
-- Returns the header, the bucket to act in (always the head), that bucket's counts
-- {requests, input, output}, and whether the header changed (it is then the caller's to
-- write); the usual call (same bucket as the last one) is a single read.
local function advance(ring, b, slots)
  local h = read_header(ring)
  if h[1] == 0 or b - h[1] >= slots then
    if h[1] ~= 0 then redis.call('DEL', ring) end
    -- Made at full length at once: one allocation of the right size class, rather than
    -- a string grown (and over-allocated) as later buckets are written. The header, with
    -- the epoch, is the caller's to write.
    redis.call('SETRANGE', ring, ring_bytes(ring, slots) - 1, '\0')
    return {b, b, 0, 0, 0, new_epoch(h[6]), 0, 0, 0}, b, {0, 0, 0}, true
  end
  if b <= h[1] then return h, h[1], head_counts(h), false end
  -- The buckets that leave, in order: each run of them in consecutive slots is zeroed by
  -- one write, and each block's sum loses what its slots held.
  local runs, blocks = {}, {}
  local bl = block_len(slots)
  local function block_change(s, r, i, o)
    local k = math.floor(s / bl)
    local d = blocks[k]
    if d == nil then
      d = {0, 0, 0}
      blocks[k] = d
    end
    d[1] = d[1] + r; d[2] = d[2] + i; d[3] = d[3] + o
  end
  each_slot(ring, slots, h[1] + 1, b, function(x, r, i, o)
    -- the slot still holds bucket x - slots, which leaves the window now
    if r ~= 0 or i ~= 0 or o ~= 0 then
      h[3] = h[3] - r; h[4] = h[4] - i; h[5] = h[5] - o
      local s = x % slots
      local last = runs[#runs]
      if last and last[2] == s - 1 then last[2] = s else runs[#runs + 1] = {s, s} end
      block_change(s, -r, -i, -o)
    end
  end, false)
  -- The old head's counts go to its slot (zero until now), in the same write as the run
  -- of leaving slots right after it when there is one: on a busy ring, one write.
  local l = layout(ring)
  local hs = h[1] % slots
  local first = 1
  if h[7] ~= 0 or h[8] ~= 0 or h[9] ~= 0 then
    local bytes = struct.pack('>' .. l.format, h[7], h[8], h[9])
    if runs[1] and runs[1][1] == hs + 1 then
      bytes = bytes .. string.rep('\0', l.bytes * (runs[1][2] - runs[1][1] + 1))
      first = 2
    end
    redis.call('SETRANGE', ring, HDR_BYTES + l.bytes * hs, bytes)
    block_change(hs, h[7], h[8], h[9])
  end
  for k = first, #runs do
    local run = runs[k]
    redis.call('SETRANGE', ring, HDR_BYTES + l.bytes * run[1],
      string.rep('\0', l.bytes * (run[2] - run[1] + 1)))
  end
  for k, d in pairs(blocks) do add_block(ring, k * bl, slots, d) end
  h[1] = b
  h[7], h[8], h[9] = 0, 0, 0
  return h, b, {0, 0, 0}, true
end

-- Moves the tail (a lower bound of the oldest non-empty bucket) to the oldest bucket in
-- the window that holds anything, or to the head. Amortised O(1): the tail only moves
-- forward, and a busy key's tail slot is non-empty, found by the first one-slot read.
-- Every script leaves the tail exact, so a script need call this only when buckets left
-- the window (the head moved) or the oldest bucket emptied.
local function settle_tail(ring, h, slots)
  local first = h[1] - slots + 1
  if h[2] < first then h[2] = first end
  if (h[3] == 0 and h[4] == 0 and h[5] == 0) or h[2] >= h[1] then
    h[2] = h[1]
    return
  end
  local found = h[1]
  each_slot(ring, slots, h[2], h[1] - 1, function(x, r, i, o)
    if r ~= 0 or i ~= 0 or o ~= 0 then found = x; return true end
  end, true)
  h[2] = found
end

-- Scans the window from its oldest non-empty bucket forward and stops as soon as the
-- answers are known, so the usual denial (at the limit, asking for a little) reads a slot
-- or two. Whole blocks are passed on their block sums unless one holds an answer (a
-- limit's oldest usage, or the bucket whose leaving makes the request fit), which is then
-- read slot by slot: at most about 2 * sqrt(slots) slots and one read of the block sums,
-- however full the window. Answers, as WindowShape::resets and WindowShape::retry_after
-- do in Rust:
--   resets: per limit, the wait until its oldest counted usage leaves the window (0 = none);
--   retry (only when `want` is given): the wait until `want` fits beside the totals if
--   nothing else arrives; a request that fits the totals (refused because its bucket's
--   slot is full) waits for the next bucket.
-- Moves the tail to the oldest non-empty bucket on the way. h is the header after
-- advance, b the head bucket, now the script's clock.
local function scan_window(ring, h, slots, precision, now, want, limit)
  local b = h[1]
  local function wait_until(t)
    local w = t - now
    if w < 1 then w = 1 end
    return w
  end
  local function leaves_at(x) return (x + slots) * precision end
  local reset = {0, 0, 0}
  local open = 0
  for k = 1, 3 do
    if h[k + 2] > 0 then open = open + 1 end
  end
  local freed = {0, 0, 0}
  -- Whether want fits once freed and (r, i, o) more have left.
  local function fits(r, i, o)
    return h[3] - freed[1] - r + want[1] <= limit[1] and h[4] - freed[2] - i + want[2] <= limit[2]
      and h[5] - freed[3] - o + want[3] <= limit[3]
  end
  local retry = nil
  if want == nil then
    retry = 0
  elseif fits(0, 0, 0) then
    retry = wait_until((b + 1) * precision)
  end
  local first = b - slots + 1
  if h[2] < first then h[2] = first end
  local tail = nil
  -- One bucket, slot by slot; true once every answer is known.
  local function visit(x, r, i, o)
    if r == 0 and i == 0 and o == 0 then return false end
    if tail == nil then tail = x end
    if open > 0 then
      local v = {r, i, o}
      for k = 1, 3 do
        if reset[k] == 0 and v[k] > 0 then
          reset[k] = wait_until(leaves_at(x))
          open = open - 1
        end
      end
    end
    if retry == nil then
      freed[1] = freed[1] + r; freed[2] = freed[2] + i; freed[3] = freed[3] + o
      if fits(0, 0, 0) then retry = wait_until(leaves_at(x)) end
    end
    return open == 0 and retry ~= nil
  end
  local bl = block_len(slots)
  local sums = nil
  local x = h[2]
  local done = false
  -- The buckets before the head, from their slots; the head's counts are in the header.
  while x < b and not done and (open > 0 or retry == nil) do
    local s = x % slots
    local block_end = math.min(s - s % bl + bl, slots) - 1
    local len = block_end - s + 1
    if s % bl == 0 and x + len - 1 < b then
      -- A whole block, holding buckets x .. x + len - 1.
      if sums == nil then
        local from = blocks_at(ring, slots)
        sums = redis.call('GETRANGE', ring, from, ring_bytes(ring, slots) - 1)
      end
      local r, i, o = struct.unpack('>i8i8i8', sums, (s / bl) * BLOCK_BYTES + 1)
      local look = (reset[1] == 0 and r > 0) or (reset[2] == 0 and i > 0)
        or (reset[3] == 0 and o > 0) or (retry == nil and fits(r, i, o))
      if look then
        done = each_slot(ring, slots, x, block_end - s + x, visit, false)
      elseif retry == nil then
        freed[1] = freed[1] + r; freed[2] = freed[2] + i; freed[3] = freed[3] + o
      end
    else
      -- The part of a block before the head or after the tail, slot by slot.
      len = math.min(len, b - x)
      done = each_slot(ring, slots, x, x + len - 1, visit, true)
    end
    x = x + len
  end
  if not done and (open > 0 or retry == nil) then visit(b, h[7], h[8], h[9]) end
  if retry == nil then retry = wait_until(leaves_at(b)) end
  -- A scan that stopped early found the oldest non-empty bucket first; one that found
  -- nothing means the window is empty up to the head.
  h[2] = tail or b
  return reset, retry
end
