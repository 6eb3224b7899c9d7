"""Tasks left behind by a worker that died: handed out again at once by `delf up`.

With ``task_acks_late`` a task taken by a worker waits in kombu's ``unacked`` hash (in
Redis) until the worker acknowledges it. A worker that dies without a warm shutdown
(kill -9, OOM, the whole machine) cannot hand it back, and kombu hands it to another
worker only once it is older than ``DELF_VISIBILITY_TIMEOUT_S`` (an hour by default,
which must exceed the longest task). `delf up` knows better: it saw the worker die.

`restore_orphans` puts back on their queue the unacknowledged tasks of the given
queues that no live worker holds: it reads the ``unacked`` hash first, then asks the
live workers (Celery ``inspect``: active and reserved tasks) which task ids they hold,
and restores the others through kombu (``restore_by_tag``: atomic, skips a task
acknowledged meanwhile). A task restored while a worker that did not answer still runs
it is done twice, which the ingest tasks survive (an id indexed again is replaced, a job
counts an item once). Tasks are idempotent per docs/CONTRACTS.md.

A message can also be lost outright: a worker killed while kombu's BRPOP hands it over
(popped from the queue, not yet in ``unacked``). For the index step of an ingest job,
`hand_out_again` then also sends again the index tasks of every unfinished job's
extracted photos (delf_common.parked: their features wait in Redis); duplicates of tasks
still queued or restored are no-ops.
"""
from __future__ import annotations

import json
import logging

log = logging.getLogger("delf.up")

INSPECT_TIMEOUT_S = 1.0


def _unacked(channel, queues: set[str]) -> dict[bytes, str]:
    """delivery tag -> task id of every unacknowledged message routed to one of `queues`."""
    client = channel.client
    found: dict[bytes, str] = {}
    for tag, raw in client.hscan_iter(channel.unacked_key, count=1000):
        try:
            message, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        if routing_key in queues or exchange in queues:
            headers = message.get("headers") or {}
            found[tag] = str(headers.get("id") or message.get("properties", {}).get("correlation_id") or "")
    return found


def held_by_live_workers(app, exclude: set[str] = frozenset()) -> set[str] | None:
    """Task ids that the live workers (other than the nodes in `exclude`) are running or hold
    reserved; None when the broker cannot be asked."""
    try:
        inspect = app.control.inspect(timeout=INSPECT_TIMEOUT_S)
        replies = [inspect.active() or {}, inspect.reserved() or {}]
    except Exception as exc:  # noqa: BLE001 - broker away: restore nothing now
        log.warning("cannot ask the workers which tasks they hold: %s", exc)
        return None
    held: set[str] = set()
    for reply in replies:
        for node, tasks in reply.items():
            if node in exclude:
                continue
            held.update(str(t.get("id")) for t in tasks or () if isinstance(t, dict))
    return held


def restore_orphans(app, queues: set[str], ask_workers: bool = True, exclude: set[str] = frozenset()) -> int:
    """Puts the unacknowledged tasks of `queues` that no live worker holds back on their queue.
    `ask_workers`=False: no worker can be alive (a broker of our own, before any worker
    started). Returns how many were restored."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        orphans = _unacked(channel, queues)
        if not orphans:
            return 0
        if ask_workers:
            held = held_by_live_workers(app, exclude)
            if held is None:
                return 0
            orphans = {tag: task_id for tag, task_id in orphans.items() if task_id not in held}
        for tag in orphans:
            channel.qos.restore_by_tag(tag, client=channel.client)
    return len(orphans)


def hand_out_again(app, queues: set[str], ask_workers: bool = True, exclude: set[str] = frozenset()) -> int:
    """`restore_orphans`, then, when `queues` hold the index queue, the index tasks of the
    unfinished jobs' extracted photos (delf_common.parked), said in a line. Returns how many
    tasks were restored (not counting those re-sent)."""
    from delf_common.celery_app import queue_prefix
    from delf_common.contract import INGEST_INDEX, queue_for_task
    from delf_common.parked import resend_parked_of_jobs
    from delf_tools.logsink import say

    restored = restore_orphans(app, queues, ask_workers=ask_workers, exclude=exclude)
    if queue_for_task(INGEST_INDEX, queue_prefix(app)) in queues:
        resent = resend_parked_of_jobs(app)
        if n := sum(resent.values()):
            say(f"re-sent the index tasks of {n} extracted photo{'s' if n != 1 else ''} of "
                f"{len(resent)} unfinished job{'s' if len(resent) != 1 else ''} (a message lost with a worker "
                f"is found again this way; duplicates are no-ops)")
    return restored
