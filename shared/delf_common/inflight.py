"""Which items of an ingest job still have their extract task on its way: waiting in the
extract queue, or taken by a worker and not yet acknowledged (kombu's ``unacked`` hash,
which hands it out again if that worker dies). Such an item is not lost: a resume need not
send it again, and a photo sent as bytes need not be uploaded again (`ResumeJob`).

Every message the gateway and the workers publish carries the job and image ids in its
headers (``delf_job_id``, ``delf_image_id``: `delf_common.celery_app`). kombu keeps a
message as JSON whose body (the photo, base64) comes first and whose headers come last,
so a Lua script reads only the tail of each message, in Redis: the queue (at most
DELF_MAX_QUEUE messages) and the ``unacked`` entries of that queue, without copying the
photos out of Redis. A message whose tail does not hold the headers (another publisher) is
not counted: its item counts as lost, as it did before this check.
"""
from __future__ import annotations

import json
import logging

import redis

log = logging.getLogger(__name__)

UNACKED_KEY = "unacked"  # kombu's Redis transport default (delf_common.celery_app keeps it)
TAIL_BYTES = 16384       # the headers and properties of a task message (argsrepr <= 1 KiB)

_SCRIPT = """
local job, route, tail = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = '"delf_image_id": "'
local out = {}
local function image_of(m)
  local from = math.max(1, #m - tail)
  if not string.find(m, job, from, true) then return end
  local _, e = string.find(m, key, from, true)
  if not e then return end
  local i, buf = e + 1, {}
  while i <= #m do
    local c = string.sub(m, i, i)
    if c == '\\\\' then table.insert(buf, string.sub(m, i, i + 1)); i = i + 2
    elseif c == '"' then break
    else table.insert(buf, c); i = i + 1 end
  end
  table.insert(out, table.concat(buf))
end
local n = redis.call('LLEN', KEYS[1])
for start = 0, n - 1, 16 do
  for _, m in ipairs(redis.call('LRANGE', KEYS[1], start, start + 15)) do image_of(m) end
end
local cursor = '0'
repeat
  local r = redis.call('HSCAN', KEYS[2], cursor, 'COUNT', 16)
  cursor = r[1]
  for j = 2, #r[2], 2 do
    local m = r[2][j]
    if string.find(m, route, math.max(1, #m - 1024), true) then image_of(m) end
  end
until cursor == '0'
return out
"""


def waiting_items(client: redis.Redis, queue: str, job_id: str) -> set[str] | None:
    """Ids of the job's items whose task waits in `queue` or is held unacknowledged by a
    worker of it; None when Redis cannot say (then nothing is known to wait)."""
    try:
        raws = client.eval(_SCRIPT, 2, queue, UNACKED_KEY, f'"delf_job_id": "{job_id}"', f'"{queue}"]',
                           TAIL_BYTES)
    except redis.RedisError as exc:
        log.warning("cannot read which tasks of job %s wait in %s: %s", job_id, queue, exc)
        return None
    out = set()
    for raw in raws:
        try:
            out.add(json.loads(b'"' + raw + b'"'))
        except ValueError:
            continue
    return out
