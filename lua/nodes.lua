-- nodes.lua: a node says it is alive and learns how many are. The ZSET maps node id ->
-- the Redis TIME (ms) it was last seen; nodes silent for longer than the TTL are dropped.
-- `on_store_error: local` divides each limit by the count while Redis fails.
-- KEYS[1] the ZSET of live nodes
-- ARGV: node id, ttl_ms
-- Returns the number of live nodes, this one included.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
