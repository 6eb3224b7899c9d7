#!/usr/bin/env python
"""What ResumeJob's look for tasks on their way costs Redis (issue 22 item 4).

`delf_common.inflight.waiting_items` runs one Lua script in Redis that reads the tail of
every message of the extract queue (and of kombu's unacked hash): Redis does nothing else
meanwhile. This fills an embedded Redis (the one `delf up` starts) with `--tasks` ingest
extract messages of `--photo-kb` KB photos, as the gateway sends them, and times the look.

    .venv/bin/python scripts/bench_inflight.py [--tasks 500] [--photo-kb 1000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=500, help="messages in the extract queue")
    p.add_argument("--photo-kb", type=int, default=1000, help="photo bytes per message, in KB")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    from embedded_redis import EmbeddedRedis

    server = EmbeddedRedis().start()
    try:
        os.environ.update(DELF_REDIS_URL=server.url(0), DELF_QUEUE_PREFIX="bench-inflight")
        import redis

        from delf_common import contract
        from delf_common.celery_app import make_app, queue_prefix
        from delf_common.inflight import waiting_items

        app, job = make_app(), contract.new_job_id()
        queue = contract.queue_for_task(contract.INGEST_EXTRACT, queue_prefix(app))
        photo = os.urandom(args.photo_kb * 1000)
        for k in range(args.tasks):
            item = {"image_id": f"photo-{k}", "metadata": {}, "image": photo, "location": None}
            app.send_task(contract.INGEST_EXTRACT, args=(item, job), queue=queue)
        client = redis.Redis.from_url(server.url(0))
        held = client.memory_usage(queue) or 0
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            found = waiting_items(client, queue, job)
            times.append(time.perf_counter() - t)
            assert found is not None and len(found) == args.tasks
        print(f"| {args.tasks} tasks of {args.photo_kb} KB photos ({held / 1e6:.0f} MB in Redis) | "
              f"{min(times):.3f} s best, {max(times):.3f} s worst of {args.repeat} |")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
