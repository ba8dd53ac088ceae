-- capsctl job queue: the Lua scripts behind services/queue/jobqueue.py.
--
-- services/queue/jobqueue.py splits this file at the "--!script <name>" lines and registers every
-- script as  PRELUDE .. KEY_FUNCTIONS .. body  (redis.register_script, EVALSHA). A script
-- runs atomically, so every transition below (hash fields, queue/index/lease zsets, counters,
-- the job's event stream) happens all at once or not at all.
--
-- Calling convention (every script):
--   KEYS    empty: keys are built from the prefix (see services/queue/keys.py; the k_<name>()
--           helpers are generated from its TEMPLATES), so all keys must live on one node.
--   ARGV[1] key prefix            ARGV[2] "now" in seconds ('' = Redis server TIME)
--   ARGV[3] event stream MAXLEN   ARGV[4] dead-letter list cap   ARGV[5] notify list cap
--   ARGV[6] TTL (s) set on a job's event stream when it finishes (0 = keep)
--   ARGV[7..] the script's own arguments, read with arg(1), arg(2), ...
--
-- Job states: queued -> running -> succeeded | failed | cancelled, and
-- running -> retrying -> queued (after the backoff) ; running -> queued (lease expired).
-- Fencing: every call from a worker carries the lease token it got from claim; a token that
-- no longer matches (lease expired and the job was requeued/reclaimed) changes nothing.

--!prelude
-- A junk number in a record ("nan", "inf": Lua's tonumber accepts them) must never make an event
-- or transition unencodable: such numbers are written as JSON null.
cjson.encode_invalid_numbers('null')
local P = ARGV[1]
local NOW
if ARGV[2] ~= nil and ARGV[2] ~= '' then
  NOW = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local NOWS = string.format('%.6f', NOW)
local EVENTS_MAXLEN = ARGV[3]
local DEAD_MAX = tonumber(ARGV[4])
local NOTIFY_MAX = tonumber(ARGV[5])
local EVENTS_TTL = tonumber(ARGV[6])
local function arg(i) return ARGV[6 + i] end

-- @@KEY_FUNCTIONS@@

local PRIORITIES = {'high', 'normal', 'low'}
local PRIORITY_OK = {high = true, normal = true, low = true}
-- max_lost of jobs submitted before the field existed (services.spec.jobspec's default)
local DEFAULT_MAX_LOST = 10
-- the per-state timestamp field a transition into that state sets
local TS_FIELD = {queued = 'queued_at', running = 'started_at', retrying = 'retrying_at',
                  succeeded = 'finished_at', failed = 'finished_at', cancelled = 'finished_at'}
local LIGHT = {'state', 'priority', 'kind', 'model', 'attempt', 'retry_base', 'max_retries',
               'gpus', 'cpus', 'seq', 'lease_token', 'worker', 'cancel_requested'}
local FULL = {'state', 'priority', 'kind', 'model', 'attempt', 'retry_base', 'max_retries',
              'gpus', 'cpus', 'seq', 'lease_token', 'worker', 'cancel_requested', 'spec'}

-- True when s is valid UTF-8 as Python's strict decoder sees it (no overlongs, surrogates or
-- code points past U+10FFFF). Clients decode replies as UTF-8, so junk bytes in a record must
-- be caught here rather than blow up in a worker. ASCII-only strings return at once.
local function valid_utf8(s)
  if not string.find(s, '[\128-\255]') then return true end
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    if c < 128 then
      i = i + 1
    else
      local len, lo, hi = 0, 128, 191
      if c >= 194 and c <= 223 then len = 2
      elseif c >= 224 and c <= 239 then
        len = 3
        if c == 224 then lo = 160 elseif c == 237 then hi = 159 end
      elseif c >= 240 and c <= 244 then
        len = 4
        if c == 240 then lo = 144 elseif c == 244 then hi = 143 end
      else
        return false
      end
      if i + len - 1 > n then return false end
      local c2 = string.byte(s, i + 1)
      if c2 < lo or c2 > hi then return false end
      for k = i + 2, i + len - 1 do
        local cc = string.byte(s, k)
        if cc < 128 or cc > 191 then return false end
      end
      i = i + len
    end
  end
  return true
end

-- s, or s with its non-ASCII bytes escaped as \xNN when it is not valid UTF-8.
local function printable(s)
  s = tostring(s)
  if valid_utf8(s) then return s end
  return (string.gsub(s, '[\128-\255]', function(ch) return string.format('\\x%02x', string.byte(ch)) end))
end

-- TYPE of a key as a plain string ('none' when absent).
local function key_type(key)
  local t = redis.call('TYPE', key)
  return type(t) == 'table' and t.ok or t
end

-- A finite number, or nil: Lua's tonumber takes 'nan' and 'inf', which Redis then refuses as
-- a score (and raises halfway through a script).
local function finite(v)
  local x = tonumber(v)
  if x and x == x and x ~= math.huge and x ~= -math.huge then return x end
  return nil
end

-- Move a key aside to a fresh quarantine key (never over an earlier one); returns the new name.
local function move_aside(key)
  local base = k_quarantine(key, math.floor(NOW * 1000))
  local dest, n = base, 1
  while redis.call('EXISTS', dest) == 1 do dest = base .. ':' .. n; n = n + 1 end
  redis.call('RENAME', key, dest)
  return dest
end

-- HINCRBY that never raises: a field holding something other than an integer restarts at n.
local function incr_field(key, field, n)
  local r = redis.pcall('HINCRBY', key, field, n)
  if type(r) == 'table' and r.err then
    redis.call('HSET', key, field, n)
    return n
  end
  return r
end

-- One dead-letter entry plus its counter, with no checks (see sinks_ready).
local function note(id, reason, source)
  local entry = {job_id = printable(id), reason = printable(reason), at = NOW, source = printable(source)}
  redis.call('LPUSH', k_dead(), cjson.encode(entry))
  redis.call('LTRIM', k_dead(), 0, DEAD_MAX - 1)
  incr_field(k_counters(), 'dead_lettered', 1)
end

-- The dead-letter list and the counters hash receive the notes about every other bad key, so
-- they are checked first (once per call) and moved aside without going through themselves.
local SINKS_READY = false
local function sinks_ready()
  if SINKS_READY then return end
  SINKS_READY = true
  local moved = {}
  for _, sink in ipairs({{k_dead(), 'list'}, {k_counters(), 'hash'}}) do
    local t = key_type(sink[1])
    if t ~= 'none' and t ~= sink[2] then
      table.insert(moved, {sink[1], 'a ' .. t .. ' where a ' .. sink[2] .. ' belongs; moved to ' .. move_aside(sink[1])})
    end
  end
  for _, m in ipairs(moved) do note('', m[2], m[1]) end
end

local function count(field, n)
  sinks_ready()
  incr_field(k_counters(), field, n or 1)
end


-- Read some fields of a job hash into a table. Returns nil, reason when the key is missing
-- or is not a hash (garbage must never make a script raise to the worker).
local function job_fields(id, names)
  local vals = redis.pcall('HMGET', k_job(id), unpack(names))
  if type(vals) ~= 'table' or vals.err then return nil, 'job key is not a hash' end
  local j, any = {}, false
  for i, n in ipairs(names) do
    if vals[i] then j[n] = vals[i]; any = true end
  end
  if not any then return nil, 'job hash is missing' end
  return j
end

-- Enough fields to put the job back in a queue?
local function queueable(j)
  return PRIORITY_OK[j.priority] and finite(j.gpus) and finite(j.cpus) and finite(j.seq)
end

local function dead_letter(id, reason, source)
  sinks_ready()
  note(id, reason, source)
end

-- A key of the wrong type where a queue structure should be: move it aside, record why
-- (job_id names the job whose key it was, for per-job keys).
local function quarantine(key, why, job_id)
  dead_letter(job_id or '', why .. '; moved to ' .. move_aside(key), key)
end

-- A Redis script that raises keeps the writes it made before the error, so a key of the wrong
-- type must never be met halfway through a transition. Every script therefore calls
-- ensure_type for each key it will read or write before its first write: a key holding another
-- type is quarantined (renamed aside, with a dead letter saying why) and the script carries on
-- with a fresh, empty key. Checked keys are remembered for the rest of the call, so the write
-- helpers below can check again for free. Returns false when the key was moved aside.
local CHECKED = {}
local function ensure_type(key, want, job_id)
  if CHECKED[key] then return true end
  CHECKED[key] = true
  local t = key_type(key)
  if t == want or t == 'none' then return true end
  quarantine(key, 'a ' .. t .. ' where a ' .. want .. ' belongs', job_id)
  return false
end

-- After a junk leases/delayed zset was moved aside: put back the jobs that the state index says
-- belong there (expiry / backoff end from their records), so no running or retrying job is
-- stranded where requeue_expired / promote_due can no longer see it.
local function reindex(key, state, field)
  for _, p in ipairs(PRIORITIES) do
    local ids = redis.pcall('ZRANGE', k_state(state, p), 0, -1)
    if type(ids) == 'table' and not ids.err then
      for _, id in ipairs(ids) do
        local at = redis.pcall('HGET', k_job(id), field)
        if type(at) == 'string' and finite(at) then redis.call('ZADD', key, finite(at), id) end
      end
    end
  end
end

local function ensure_leases()
  if not ensure_type(k_leases(), 'zset') then reindex(k_leases(), 'running', 'lease_expires_at') end
end

local function ensure_delayed()
  if not ensure_type(k_delayed(), 'zset') then reindex(k_delayed(), 'retrying', 'not_before') end
end

-- The keys a transition of job `id` writes: its event stream and the state indexes given.
local function ensure_transition(id, prio, ...)
  ensure_type(k_events(id), 'stream', id)
  for _, state in ipairs({...}) do ensure_type(k_state(state, prio), 'zset', id) end
end

-- The keys enqueue writes for job j.
local function ensure_enqueue(id, j)
  ensure_type(k_queue(j.priority, j.gpus, j.cpus), 'zset', id)
  ensure_type(k_shapes(j.priority), 'set', id)
  ensure_type(k_notify(), 'list')
end

local function emit(id, etype, data_json)
  ensure_type(k_events(id), 'stream', id)
  redis.call('XADD', k_events(id), 'MAXLEN', '~', EVENTS_MAXLEN, '*',
             'type', etype, 'at', NOWS, 'data', data_json)
end

-- Move a job between states: the (state, priority) index zsets, the state and timestamp
-- fields, one entry appended to the JSON list 'transitions', and a 'state' event.
local function transition(id, old_state, new_state, prio, attempt, extra)
  if old_state then ensure_transition(id, prio, old_state, new_state) else ensure_transition(id, prio, new_state) end
  local jk = k_job(id)
  if old_state then redis.call('ZREM', k_state(old_state, prio), id) end
  redis.call('ZADD', k_state(new_state, prio), NOW, id)
  redis.call('HSET', jk, 'state', new_state, 'updated_at', NOWS, TS_FIELD[new_state], NOWS)
  local entry = {state = new_state, at = NOW, attempt = tonumber(attempt) or 0}
  if old_state then entry.from = old_state end
  if extra then for k, v in pairs(extra) do entry[k] = v end end
  local item = cjson.encode(entry)
  local cur = redis.call('HGET', jk, 'transitions')
  if (not cur) or cur == '' or cur == '[]' or string.sub(cur, -1) ~= ']' then
    cur = '[' .. item .. ']'
  else
    cur = string.sub(cur, 1, -2) .. ',' .. item .. ']'
  end
  redis.call('HSET', jk, 'transitions', cur)
  emit(id, 'state', item)
end

-- A terminal transition plus its outcome counter; the event stream (a log) starts to expire,
-- the job record stays.
local function finish(id, j, old_state, new_state, outcome, extra)
  sinks_ready()
  transition(id, old_state, new_state, j.priority, j.attempt, extra)
  count('finished:' .. (j.kind or '?') .. ':' .. (j.model or '?') .. ':' .. outcome)
  if EVENTS_TTL > 0 then redis.call('EXPIRE', k_events(id), EVENTS_TTL) end
end

-- Put a job id into its (priority, gpus, cpus) queue at its original sequence number, so a
-- requeued or retried job keeps its place among jobs submitted after it; wake one waiter.
local function enqueue(id, j)
  ensure_enqueue(id, j)
  redis.call('ZADD', k_queue(j.priority, j.gpus, j.cpus), finite(j.seq), id)
  redis.call('SADD', k_shapes(j.priority), j.gpus .. ':' .. j.cpus)
  if redis.call('LPUSH', k_notify(), '1') > NOTIFY_MAX then
    redis.call('LTRIM', k_notify(), 0, NOTIFY_MAX - 1)
  end
end

-- Outcome replay: an outcome script remembers the token whose attempt it ended and its reply,
-- so the same outcome recorded again under that token (a WAIT that timed out, a reply lost on
-- the wire) answers as the first time did and changes nothing. nil: not that attempt's
-- outcome, or another outcome (a `fail` after a `complete` stays fenced out).
local function replayed(id, token, outcome)
  if token == nil or token == '' then return nil end
  if redis.call('TYPE', k_job(id)).ok ~= 'hash' then return nil end
  local got = redis.call('HMGET', k_job(id), 'ended_token', 'ended_reply')
  local prefix = outcome .. ':'
  if got[1] == token and type(got[2]) == 'string' and got[2]:sub(1, #prefix) == prefix then
    return got[2]:sub(#prefix + 1)
  end
  return nil
end

local function ended(id, token, outcome, reply)
  redis.call('HSET', k_job(id), 'ended_token', token, 'ended_reply', outcome .. ':' .. tostring(reply))
  return reply
end

-- The job as seen by the holder of `token`, or nil when the token is stale (fencing).
local function fenced(id, token, names)
  if token == nil or token == '' then return nil end
  local j = job_fields(id, names or LIGHT)
  if not j or j.state ~= 'running' or j.lease_token ~= token then return nil end
  return j
end

-- Release the lease of a job leaving 'running'.
local function release(id)
  ensure_leases()
  redis.call('ZREM', k_leases(), id)
  redis.call('HSET', k_job(id), 'lease_token', '')
  redis.call('HDEL', k_job(id), 'lease_expires_at')
end

-- How every script that ends an attempt starts: the job's fields when `token` holds its lease
-- (nil when fenced out), with every key the ending may write checked (`...`: the states it may
-- move to) and the lease released.
local function end_attempt(id, token, ...)
  local j = fenced(id, token)
  if not j then return nil end
  sinks_ready()
  ensure_leases()
  ensure_transition(id, j.priority, 'running', ...)
  release(id)
  return j
end

-- The members of a time-ordered set (k_delayed or k_leases) that are due by NOW, at most limit.
-- For each: check(id, j) validates every key the move will write when the job is in `state`
-- (before the first write, see ensure_type), the member leaves the set, and move(id, j, why)
-- makes the move (j is nil, with why, for a record that is gone or broken); ids it moved are returned.
local function move_due(set_key, state, limit, check, move)
  local ids = redis.call('ZRANGEBYSCORE', set_key, '-inf', NOW, 'LIMIT', 0, limit)
  local out = {}
  for _, id in ipairs(ids) do
    local j, why = job_fields(id, LIGHT)
    if j and j.state == state then check(id, j) end
    redis.call('ZREM', set_key, id)
    if move(id, j, why) then table.insert(out, id) end
  end
  return out
end

-- Retrying jobs whose backoff is over go back to their queue.
local function promote_due(limit)
  ensure_delayed()
  return move_due(k_delayed(), 'retrying', limit, function(id, j)
    if queueable(j) then
      ensure_enqueue(id, j)
      ensure_transition(id, j.priority, 'retrying', 'queued')
    end
  end, function(id, j, why)
    if j and j.state == 'retrying' then
      if queueable(j) then
        redis.call('HDEL', k_job(id), 'not_before')
        enqueue(id, j)
        transition(id, 'retrying', 'queued', j.priority, j.attempt, {reason = 'backoff elapsed'})
        return true
      end
      dead_letter(id, 'retrying job lacks priority/gpus/cpus/seq', 'delayed')
    elseif not j then
      dead_letter(id, why, 'delayed')
    end
    return false
  end)
end

-- Running jobs whose lease expired (worker died, hung or was partitioned away).
-- Policy: losing a worker is an infrastructure loss, not the job's own error, so it never uses
-- up max_retries; it has its own, larger budget max_lost (losses since the last manual retry =
-- lease_expiries - lost_base). Within it the job goes straight back to 'queued' (no backoff;
-- its checkpoint field is kept so the next attempt resumes); a job that kills its worker every
-- time still ends 'failed' after max_lost + 1 losses instead of looping. A job whose cancel
-- was requested becomes 'cancelled'. The old token is cleared, so the lost worker is fenced
-- out even if it comes back.
local function requeue_expired(limit)
  ensure_leases()
  return move_due(k_leases(), 'running', limit, function(id, j)
    sinks_ready()
    ensure_transition(id, j.priority, 'running', 'queued', 'failed', 'cancelled')
    if queueable(j) then ensure_enqueue(id, j) end
  end, function(id, j)
    if not (j and j.state == 'running') then return false end
    local jk = k_job(id)
    local attempt = tonumber(j.attempt) or 0
    local info = {reason = 'lease expired', worker = j.worker or '', cause = 'infrastructure_loss'}
    release(id)
    local lost = incr_field(jk, 'lease_expiries', 1) -
                 (tonumber(redis.call('HGET', jk, 'lost_base')) or 0)
    local max_lost = tonumber(redis.call('HGET', jk, 'max_lost')) or DEFAULT_MAX_LOST
    count('lease_expiries')
    if j.cancel_requested == '1' then
      finish(id, j, 'running', 'cancelled', 'cancelled', info)
    elseif lost > max_lost or not queueable(j) then
      local msg = 'lost its worker ' .. lost .. ' times (lease expired on attempt ' .. attempt ..
                  ', last worker ' .. (j.worker or '?') .. '; max_lost ' .. max_lost .. ')'
      redis.call('HSET', jk, 'error', msg, 'cause', 'infrastructure_loss')
      info.error = msg
      finish(id, j, 'running', 'failed', 'failed', info)
    else
      enqueue(id, j)
      transition(id, 'running', 'queued', j.priority, attempt, info)
    end
    return true
  end)
end

--!script submit
-- arg: 1 id, 2 idempotency key ('' = none), 3 its ttl (s), 4 priority, 5 gpus, 6 cpus,
--      7 kind, 8 model label, 9 spec JSON, 10 max_retries, 11 name, 12 raw idempotency key,
--      13 max_lost
-- returns {job id, 1 if created / 0 if the idempotency key named an existing job with the same
-- spec / 2 if it named one with a different spec (nothing is written), created_at}
local id, idem = arg(1), arg(2)
local spec_sha = redis.sha1hex(arg(9))
local jk = k_job(id)
if redis.call('EXISTS', jk) == 1 then return redis.error_reply('job id collision: ' .. id) end
local j = {priority = arg(4), gpus = arg(5), cpus = arg(6), kind = arg(7), model = arg(8)}
-- every key this script touches is checked before the first write (see ensure_type)
if idem ~= '' then ensure_type(idem, 'string') end
if ensure_type(k_seq(), 'string') then
  local seq = redis.call('GET', k_seq())
  if seq and not string.match(seq, '^%d+$') then quarantine(k_seq(), 'sequence counter is not an integer') end
end
ensure_type(k_jobs(), 'zset')
ensure_type(k_state('queued', j.priority), 'zset')
ensure_enqueue(id, j)
sinks_ready()
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing then
    local old = redis.pcall('HMGET', k_job(existing), 'created_at', 'spec_sha', 'spec')
    if type(old) == 'table' and not old.err and old[1] then
      -- jobs stored before spec_sha existed: hash their stored spec
      if (old[2] or redis.sha1hex(old[3] or '')) ~= spec_sha then return {existing, 2, old[1]} end
      return {existing, 0, old[1]}
    end
  end
end
j.seq = redis.call('INCR', k_seq())
-- The whole record in one HSET, including what transition() would write for 'queued' (this
-- is the hot path of a pipelined submit). No event is written: a stream costs ~4.7 KB of Redis
-- memory from its first entry, which would dominate the footprint of a deep backlog. The
-- job's stream starts at its first claim; the 'queued' entry is in the record's transitions.
local entry = cjson.encode({state = 'queued', at = NOW, attempt = 0, reason = 'submitted'})
redis.call('HSET', jk, 'id', id, 'kind', j.kind, 'model', j.model, 'spec', arg(9),
           'priority', j.priority, 'gpus', j.gpus, 'cpus', j.cpus, 'attempt', 0, 'retry_base', 0,
           'max_retries', arg(10), 'seq', j.seq, 'created_at', NOWS, 'cancel_requested', '0',
           'lease_expiries', 0, 'state', 'queued', 'queued_at', NOWS, 'updated_at', NOWS,
           'transitions', '[' .. entry .. ']')
if arg(11) ~= '' then redis.call('HSET', jk, 'name', arg(11)) end
if arg(12) ~= '' then redis.call('HSET', jk, 'idempotency_key', arg(12), 'idem_ref', idem) end
redis.call('HSET', jk, 'spec_sha', spec_sha, 'max_lost', arg(13))
redis.call('ZADD', k_jobs(), NOW, id)
redis.call('ZADD', k_state('queued', j.priority), NOW, id)
enqueue(id, j)
count('submitted:' .. j.kind .. ':' .. j.model)
if idem ~= '' then redis.call('SET', idem, id, 'EX', tonumber(arg(3))) end
return {id, 1, NOWS}

--!script claim
-- arg: 1 worker id, 2 fresh lease token, 3 available gpus, 4 available cpus, 5 lease seconds,
--      6 housekeeping limit (promote due retries / requeue expired leases first; 0 = skip)
-- Picks the highest-priority, oldest (lowest seq) queued job whose resource shape fits.
-- Each priority has one zset per shape "<gpus>:<cpus>" (set shapes:<priority>), so only the
-- heads of fitting shapes are compared: exact and O(shapes * log n), however many jobs that
-- do not fit are waiting (they stay queued and visible). Junk met on the way (missing or
-- non-hash job key, no/invalid spec JSON, stale entry of a job in another state, a queue key
-- of the wrong type) goes to the dead-letter list with a reason and the search continues.
-- returns {job id, the claimed job's hash as a flat [field, value, ...] list}, nil, or 1 when
-- SCAN_PAGE entries were looked at without a claim: junk that was removed meanwhile, so the
-- caller calls again and the scan goes on where it stopped. A page ends the script rather
-- than falling through to a lower priority, so a higher-priority job stays first however much
-- junk precedes it, and no single run blocks Redis for long.
local SCAN_PAGE = 250
local worker, token = arg(1), arg(2)
local avail_gpus, avail_cpus = tonumber(arg(3)), tonumber(arg(4))
-- Ray's free GPU count is a float sum of fractions (4 x 0.25 may read 0.9999999): a shape fits
-- when it is within half a milli-GPU (services/spec/gpus.py's unit) of what is free.
local GPU_SLACK = 0.0005
local lease = tonumber(arg(5))
local housekeeping = tonumber(arg(6))
if housekeeping > 0 then
  promote_due(housekeeping)
  requeue_expired(housekeeping)
end
local scanned = 0
for _, p in ipairs(PRIORITIES) do
  while true do
    if scanned >= SCAN_PAGE then return 1 end
    scanned = scanned + 1
    local best_id, best_score, best_key
    local shapes = redis.pcall('SMEMBERS', k_shapes(p))
    if type(shapes) == 'table' and shapes.err then
      quarantine(k_shapes(p), 'shape set is not a set')
      shapes = {}
    end
    for _, shape in ipairs(shapes) do
      -- gpus: whole ("2") or a fraction of one GPU ("0.125"), as services/spec/gpus.py writes it
      local g, c = string.match(shape, '^(%d+):(%d+)$')
      if not g then g, c = string.match(shape, '^(%d+%.%d+):(%d+)$') end
      if not g then
        redis.call('SREM', k_shapes(p), shape)
      elseif tonumber(g) <= avail_gpus + GPU_SLACK and tonumber(c) <= avail_cpus then
        local qk = k_queue(p, g, c)
        local head = redis.pcall('ZRANGE', qk, 0, 0, 'WITHSCORES')
        if type(head) == 'table' and head.err then
          quarantine(qk, 'queue key is not a sorted set')
        elseif #head == 0 then
          redis.call('SREM', k_shapes(p), shape)
        else
          local score = tonumber(head[2])
          if best_score == nil or score < best_score then
            best_id, best_score, best_key = head[1], score, qk
          end
        end
      end
    end
    if not best_id then break end

    local j, reason = job_fields(best_id, FULL)
    if j and j.state == 'queued' then
      -- every key the claim (or the rejection) of this job writes, checked before its first write
      local prio = PRIORITY_OK[j.priority] and j.priority or p
      ensure_leases()
      ensure_transition(best_id, prio, 'queued', 'running', 'failed')
    end
    redis.call('ZREM', best_key, best_id)
    if j and j.state ~= 'queued' then
      -- a stray entry for a job that is elsewhere: drop the entry, leave the job alone
      dead_letter(best_id, 'stale queue entry: job is ' .. tostring(j.state), best_key)
    elseif not j then
      dead_letter(best_id, reason, best_key)
    else
      if not j.spec or j.spec == '' then
        reason = 'job hash has no spec'
      elseif not pcall(cjson.decode, j.spec) or string.sub(j.spec, 1, 1) ~= '{' then
        reason = 'spec is not valid JSON'
      elseif not queueable(j) then
        reason = 'job hash lacks priority/gpus/cpus/seq'
      else
        for _, v in ipairs(redis.call('HGETALL', k_job(best_id))) do
          if not valid_utf8(v) then reason = 'job hash holds bytes that are not UTF-8'; break end
        end
      end
      if reason then
        -- a queued job that can never run: fail it so it does not look queued forever
        dead_letter(best_id, reason, best_key)
        if not PRIORITY_OK[j.priority] then j.priority = p end
        redis.call('HSET', k_job(best_id), 'error', 'dead-lettered: ' .. reason)
        finish(best_id, j, 'queued', 'failed', 'dead_lettered', {reason = 'dead-lettered: ' .. reason})
      else
        local attempt = (tonumber(j.attempt) or 0) + 1
        local jk = k_job(best_id)
        local expires = NOW + lease
        redis.call('HSET', jk, 'attempt', attempt, 'worker', worker, 'lease_token', token,
                   'lease_expires_at', string.format('%.6f', expires), 'heartbeat_at', NOWS)
        redis.call('ZADD', k_leases(), expires, best_id)
        transition(best_id, 'queued', 'running', j.priority, attempt, {worker = worker})
        return {best_id, redis.call('HGETALL', jk)}
      end
    end
  end
end
return nil

--!script heartbeat
-- arg: 1 job id, 2 token, 3 lease seconds. returns 0 lease lost, 1 ok, 2 ok but cancel requested
-- A lease that has already expired is lost even while no one has requeued the job yet: its
-- holder may have been paused or cut off for longer than the lease, and requeue_expired may
-- hand the job to another worker at any moment, so it must stop rather than resurrect it.
local id = arg(1)
local names = {unpack(LIGHT)}
table.insert(names, 'lease_expires_at')
local j = fenced(id, arg(2), names)
if not j then return 0 end
local held_until = finite(j.lease_expires_at)
if held_until and held_until < NOW then return 0 end
ensure_leases()
local expires = NOW + tonumber(arg(3))
redis.call('ZADD', k_leases(), expires, id)
redis.call('HSET', k_job(id), 'lease_expires_at', string.format('%.6f', expires), 'heartbeat_at', NOWS)
if j.cancel_requested == '1' then return 2 end
return 1

--!script progress
-- arg: 1 job id, 2 token, 3 progress JSON, 4 also publish a progress event ('1'/'0').
-- returns 1, or 0 when fenced out
local id = arg(1)
if not fenced(id, arg(2)) then return 0 end
if arg(4) ~= '0' then ensure_type(k_events(id), 'stream', id) end
redis.call('HSET', k_job(id), 'progress', arg(3), 'updated_at', NOWS)
if arg(4) ~= '0' then emit(id, 'progress', arg(3)) end
return 1

--!script checkpoint
-- arg: 1 job id, 2 token, 3 checkpoint URI, 4 optional entry JSON {epoch, uri, size, sha256},
-- 5 how many entries to keep. returns 1, or 0 when fenced out
-- 'checkpoints' keeps the last arg(5) entries, oldest first, one per URI (services/checkpoints).
local id = arg(1)
if not fenced(id, arg(2)) then return 0 end
ensure_type(k_events(id), 'stream', id)
redis.call('HSET', k_job(id), 'checkpoint', arg(3), 'checkpoint_at', NOWS, 'updated_at', NOWS)
if arg(4) and arg(4) ~= '' then
  local ok, entry = pcall(cjson.decode, arg(4))
  if ok and type(entry) == 'table' then
    local kept = {}
    local okl, old = pcall(cjson.decode, redis.call('HGET', k_job(id), 'checkpoints') or '[]')
    if okl and type(old) == 'table' then
      for _, e in ipairs(old) do
        if type(e) == 'table' and e.uri ~= entry.uri then kept[#kept + 1] = e end
      end
    end
    kept[#kept + 1] = entry
    local keep = math.max(1, tonumber(arg(5)) or 1)
    local trimmed = {}
    for i = math.max(1, #kept - keep + 1), #kept do trimmed[#trimmed + 1] = kept[i] end
    redis.call('HSET', k_job(id), 'checkpoints', cjson.encode(trimmed))
  end
end
emit(id, 'log', cjson.encode({level = 'info', message = 'checkpoint saved', checkpoint = arg(3)}))
return 1

--!script complete
-- arg: 1 job id, 2 token, 3 result JSON. returns 1, or 0 when fenced out
-- A cancel requested while the job was running but not yet acted on when it finished is
-- dropped: the work is done and its result kept (succeeded), as cancelling a job that already
-- finished does nothing; the transition and a warning event record that the cancel came late.
local id = arg(1)
local j = end_attempt(id, arg(2), 'succeeded')
if not j then return tonumber(replayed(id, arg(2), 'complete') or 0) end
redis.call('HSET', k_job(id), 'result', arg(3))
redis.call('HDEL', k_job(id), 'error', 'traceback')
emit(id, 'result', arg(3))
local extra = nil
if j.cancel_requested == '1' then
  local why = 'finished before the cancel request took effect; cancel dropped, result kept'
  redis.call('HSET', k_job(id), 'cancel_requested', '0')
  emit(id, 'log', cjson.encode({level = 'warning', message = why}))
  extra = {reason = why, cancel_dropped = true}
end
finish(id, j, 'running', 'succeeded', 'succeeded', extra)
return ended(id, arg(2), 'complete', 1)

--!script fail
-- arg: 1 job id, 2 token, 3 error, 4 traceback, 5 retry allowed (1/0), 6 backoff base (s),
--      7 backoff cap (s), 8 the error shortened for the transitions list, 9 the failure cause
--      (services/queue/causes.py; 'unknown' when absent).
-- returns 0 fenced out, 2 retrying, 3 failed, 4 cancelled
-- Attempts used in the current budget = attempt - retry_base (a manual retry starts a new
-- budget), less those that ended in a lost worker (they count against max_lost instead).
-- While that is <= max_retries the job waits 'retrying' for
-- min(cap, base * 2^(used-1)) seconds in the delayed zset, then claim promotes it to queued.
local id = arg(1)
local j = fenced(id, arg(2))
if not j then return tonumber(replayed(id, arg(2), 'fail') or 0) end
local attempt = tonumber(j.attempt) or 0
local losses = redis.call('HMGET', k_job(id), 'lease_expiries', 'lost_base')
local used = attempt - (tonumber(j.retry_base) or 0) - ((tonumber(losses[1]) or 0) - (tonumber(losses[2]) or 0))
local short = arg(8)
local cause = arg(9) or 'unknown'
if cause == '' then cause = 'unknown' end
sinks_ready()
ensure_leases()
ensure_delayed()
ensure_transition(id, j.priority, 'running', 'retrying', 'failed', 'cancelled')
release(id)
redis.call('HSET', k_job(id), 'error', arg(3), 'traceback', arg(4), 'cause', cause)
if j.cancel_requested == '1' then
  finish(id, j, 'running', 'cancelled', 'cancelled', {error = short, reason = 'cancel requested', cause = 'cancelled'})
  return ended(id, arg(2), 'fail', 4)
end
if arg(5) == '1' and used <= (tonumber(j.max_retries) or 0) and queueable(j) then
  local delay = math.min(tonumber(arg(7)), tonumber(arg(6)) * 2 ^ (used - 1))
  local not_before = NOW + delay
  redis.call('HSET', k_job(id), 'not_before', string.format('%.6f', not_before))
  redis.call('ZADD', k_delayed(), not_before, id)
  count('retries')
  transition(id, 'running', 'retrying', j.priority, attempt,
             {error = short, delay = delay, not_before = not_before, cause = cause})
  return ended(id, arg(2), 'fail', 2)
end
finish(id, j, 'running', 'failed', 'failed', {error = short, cause = cause})
return ended(id, arg(2), 'fail', 3)

--!script cancel
-- arg: 1 job id. returns 'cancelled', 'cancel_requested', 'missing', or 'is:<state>' when the
-- job is already finished
local id = arg(1)
local j = job_fields(id, LIGHT)
if not j then return 'missing' end
local info = {reason = 'cancelled by user'}
if j.state == 'queued' then
  sinks_ready()
  if queueable(j) then ensure_type(k_queue(j.priority, j.gpus, j.cpus), 'zset', id) end
  ensure_transition(id, j.priority, 'queued', 'cancelled')
  if queueable(j) then redis.call('ZREM', k_queue(j.priority, j.gpus, j.cpus), id) end
  finish(id, j, 'queued', 'cancelled', 'cancelled', info)
  return 'cancelled'
elseif j.state == 'retrying' then
  sinks_ready()
  ensure_delayed()
  ensure_transition(id, j.priority, 'retrying', 'cancelled')
  redis.call('ZREM', k_delayed(), id)
  redis.call('HDEL', k_job(id), 'not_before')
  finish(id, j, 'retrying', 'cancelled', 'cancelled', info)
  return 'cancelled'
elseif j.state == 'running' then
  if j.cancel_requested ~= '1' then
    ensure_type(k_events(id), 'stream', id)
    redis.call('HSET', k_job(id), 'cancel_requested', '1', 'cancel_requested_at', NOWS)
    emit(id, 'log', cjson.encode({level = 'warning', message = 'cancel requested'}))
  end
  return 'cancel_requested'
end
return 'is:' .. tostring(j.state)

--!script mark_cancelled
-- arg: 1 job id, 2 token. The running worker acknowledges a cancel. returns 1, or 0 fenced out
local id = arg(1)
local j = end_attempt(id, arg(2), 'cancelled')
if not j then return tonumber(replayed(id, arg(2), 'mark_cancelled') or 0) end
finish(id, j, 'running', 'cancelled', 'cancelled', {reason = 'cancelled by user', worker = j.worker or '', cause = 'cancelled'})
return ended(id, arg(2), 'mark_cancelled', 1)

--!script retry
-- arg: 1 job id. failed/cancelled -> queued with a fresh retry budget (retry_base = attempt);
-- attempt keeps counting and 'transitions' keeps the history. returns 'requeued', 'missing',
-- 'invalid', or the current state when it is not failed/cancelled (so a job that is already
-- queued answers 'queued', distinct from success)
local id = arg(1)
local j = job_fields(id, LIGHT)
if not j then return 'missing' end
if j.state ~= 'failed' and j.state ~= 'cancelled' then return tostring(j.state) end
if not queueable(j) then return 'invalid' end
sinks_ready()
ensure_enqueue(id, j)
ensure_transition(id, j.priority, j.state, 'queued')
local jk = k_job(id)
redis.call('HSET', jk, 'retry_base', tonumber(j.attempt) or 0, 'cancel_requested', '0',
           'lost_base', tonumber(redis.call('HGET', jk, 'lease_expiries')) or 0)
redis.call('HDEL', jk, 'error', 'traceback', 'cause', 'result', 'not_before', 'finished_at')
redis.call('PERSIST', k_events(id))
enqueue(id, j)
transition(id, j.state, 'queued', j.priority, j.attempt, {reason = 'manual retry'})
count('manual_retries')
return 'requeued'

--!script dead_letter_claimed
-- arg: 1 job id, 2 token, 3 reason. The worker found the claimed spec invalid (pydantic
-- validation, which Lua cannot do): dead-letter it and fail the job. returns 1 / 0 fenced out
local id = arg(1)
local j = end_attempt(id, arg(2), 'failed')
if not j then return 0 end
redis.call('HSET', k_job(id), 'error', 'dead-lettered: ' .. arg(3))
dead_letter(id, arg(3), 'claim')
finish(id, j, 'running', 'failed', 'dead_lettered', {reason = 'dead-lettered: ' .. arg(3)})
return 1

--!script requeue_expired
-- arg: 1 limit. returns the ids of the expired jobs handled (requeued, failed or cancelled)
return requeue_expired(tonumber(arg(1)))

--!script promote_due
-- arg: 1 limit. returns the ids of retrying jobs moved back to queued
return promote_due(tonumber(arg(1)))

--!script prune
-- arg: 1 age (s): jobs that finished more than this long before NOW go, 2 limit (index entries
-- examined per call, keeping each call short), 3 dry run ('1' = only list what would go).
-- Walks the terminal (state, priority) indexes, whose score is when the job finished, oldest
-- first. A finished job loses its hash, its event stream, its entries in the jobs and state
-- indexes and its idempotency key (when that still names it). An index entry whose job is
-- missing or in another state is a stale entry: it is dropped, the job (if any) is left alone,
-- so an active job (queued, running, retrying) is never touched.
-- returns {index entries examined, pruned job id, ...}
local cutoff = NOW - tonumber(arg(1))
local budget = tonumber(arg(2))
local dry = arg(3) == '1'
if not dry then  -- the keys written below besides DELs (see ensure_type); a dry run writes nothing
  sinks_ready()
  ensure_type(k_jobs(), 'zset')
end
local examined, out = 0, {0}
for _, state in ipairs({'succeeded', 'failed', 'cancelled'}) do
  for _, p in ipairs(PRIORITIES) do
    if budget <= 0 then break end
    local sk = k_state(state, p)
    local ids = redis.pcall('ZRANGEBYSCORE', sk, '-inf', cutoff, 'LIMIT', 0, budget)
    if type(ids) == 'table' and not ids.err then
      for _, id in ipairs(ids) do
        examined = examined + 1
        local f = redis.pcall('HMGET', k_job(id), 'state', 'idem_ref')
        local ok = type(f) == 'table' and not f.err
        if ok and f[1] == state then
          table.insert(out, id)
          if not dry then
            if f[2] and f[2] ~= '' and redis.pcall('GET', f[2]) == id then redis.call('DEL', f[2]) end
            redis.call('DEL', k_job(id), k_events(id))
            redis.call('ZREM', k_jobs(), id)
            redis.call('ZREM', sk, id)
          end
        elseif not dry then
          -- stale entry (job gone, not a hash, or now in another state): drop only the entry
          redis.call('ZREM', sk, id)
        end
      end
      budget = budget - #ids
    end
  end
end
out[1] = examined
if not dry and #out > 1 then count('pruned', #out - 1) end
return out

--!script hand_back
-- arg: 1 job id, 2 token, 3 reason (one line). The holder's attempt lost its infrastructure
-- (a Ray node or a rank's process died under it) and hands the job back at once instead of
-- letting the lease run out. Same policy as an expired lease (requeue_expired): not the job's
-- fault, so it counts against max_lost (lease_expiries counts every lost attempt), never
-- against max_retries; back to 'queued' with no backoff and the checkpoint field kept, so the
-- next attempt resumes; 'failed' once max_lost is used up; 'cancelled' if a cancel was pending.
-- returns 'queued', 'failed', 'cancelled', or 'fenced' (stale token: nothing changed)
local id = arg(1)
local j = fenced(id, arg(2))
if not j then return replayed(id, arg(2), 'hand_back') or 'fenced' end
local jk = k_job(id)
local attempt = tonumber(j.attempt) or 0
local cause = arg(4) or 'infrastructure_loss'
if cause == '' then cause = 'infrastructure_loss' end
local info = {reason = 'infrastructure lost: ' .. arg(3), worker = j.worker or '', cause = cause}
-- every key written below, checked before the first write (see ensure_type)
sinks_ready()
ensure_leases()
ensure_transition(id, j.priority, 'running', 'queued', 'failed', 'cancelled')
if queueable(j) then ensure_enqueue(id, j) end
local lost = incr_field(jk, 'lease_expiries', 1) - (tonumber(redis.call('HGET', jk, 'lost_base')) or 0)
local max_lost = tonumber(redis.call('HGET', jk, 'max_lost')) or DEFAULT_MAX_LOST
count('infrastructure_losses')
release(id)
redis.call('HSET', jk, 'cause', cause)
if j.cancel_requested == '1' then
  finish(id, j, 'running', 'cancelled', 'cancelled', info)
  return ended(id, arg(2), 'hand_back', 'cancelled')
elseif lost > max_lost or not queueable(j) then
  local msg = 'lost its infrastructure ' .. lost .. ' times (last: ' .. arg(3) .. ' on attempt ' .. attempt ..
              ', worker ' .. (j.worker or '?') .. '; max_lost ' .. max_lost .. ')'
  redis.call('HSET', jk, 'error', msg, 'cause', cause)
  info.error = msg
  finish(id, j, 'running', 'failed', 'failed', info)
  return ended(id, arg(2), 'hand_back', 'failed')
end
enqueue(id, j)
transition(id, 'running', 'queued', j.priority, attempt, info)
return ended(id, arg(2), 'hand_back', 'queued')

--!script event_append
-- arg: 1 job id, 2 lease token, 3 event type, 4 data JSON. Appends to the job's event stream
-- only while the job runs under that token (`fenced`, the rule of every write of an attempt);
-- returns the entry id, or false when fenced out. A stream of the wrong type refuses too rather
-- than raise: the queue's next script for the job moves a bad stream aside.
local id = arg(1)
if not fenced(id, arg(2)) then return false end
local t = key_type(k_events(id))
if t ~= 'stream' and t ~= 'none' then return false end
return redis.call('XADD', k_events(id), 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', arg(3), 'at', NOWS,
                  'data', arg(4))

--!script admission_acquire
-- arg: 1 token, 2 TTL in ms. Takes the per-queue admission lock (services.worker.admission);
-- returns 1, or 0 while another holder has it. A lock key of another type, or one without an
-- expiry (only junk has none: every holder sets PX), would block admission forever: it is
-- dropped first.
local key = k_admission()
local t = key_type(key)
if t ~= 'none' and (t ~= 'string' or redis.call('PTTL', key) < 0) then redis.call('DEL', key) end
if redis.call('SET', key, arg(1), 'NX', 'PX', arg(2)) then return 1 end
return 0

--!script admission_renew
-- arg: 1 token, 2 TTL in ms. Restarts the TTL while `token` holds the lock; returns 1, else 0.
if redis.pcall('GET', k_admission()) == arg(1) then return redis.call('PEXPIRE', k_admission(), arg(2)) end
return 0

--!script admission_release
-- arg: 1 token. Lets go while `token` holds the lock; returns 1, else 0 (it expired or passed on).
if redis.pcall('GET', k_admission()) == arg(1) then return redis.call('DEL', k_admission()) end
return 0

--!script rank_node
-- arg: 1 job id, 2 token, 3 Ray node id. Records a node this attempt's ranks run on (fenced), in
-- the job hash's `rank_nodes` ({token, nodes}; an earlier attempt's list is replaced): when a
-- rank fails, the driver asks Ray about exactly these nodes (services.runs.losses.node_loss).
-- returns 1, or 0 when fenced out
local id = arg(1)
if not fenced(id, arg(2)) then return 0 end
local ok, cur = pcall(cjson.decode, redis.call('HGET', k_job(id), 'rank_nodes') or '')
if not ok or type(cur) ~= 'table' or cur.token ~= arg(2) or type(cur.nodes) ~= 'table' then
  cur = {token = arg(2), nodes = {}}
end
for _, n in ipairs(cur.nodes) do if n == arg(3) then return 1 end end
if #cur.nodes < 256 then table.insert(cur.nodes, arg(3)) end
redis.call('HSET', k_job(id), 'rank_nodes', cjson.encode(cur))
return 1
