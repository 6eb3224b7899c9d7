"""Issue 22 item 4: the server tells an ingest item whose extract task is on its way (in the
queue, or taken by a worker and not acknowledged) from a lost one, by the ids the task
messages carry in their headers (delf_common.inflight). Real kombu messages in the tests'
Redis: published by the gateway's Celery app, one taken as a worker takes it."""
from __future__ import annotations

import uuid

import redis

from conftest import redis_db_url
from delf_common import config, contract
from delf_common.inflight import waiting_items

ODD_ID = 'caf\u00e9 "quoted" \\ back'  # escaped in the message's JSON headers


def test_queued_and_taken_tasks_are_found_by_their_job_and_image_ids(monkeypatch):
    monkeypatch.setenv("DELF_REDIS_URL", redis_db_url())
    monkeypatch.setenv("DELF_QUEUE_PREFIX", f"delftest-inflight-{uuid.uuid4().hex[:8]}")
    from delf_common.celery_app import make_app, queue_prefix

    app = make_app()
    queue = contract.queue_for_task(contract.INGEST_EXTRACT, queue_prefix(app))
    job, other = contract.new_job_id(), contract.new_job_id()
    photo = bytes(range(256)) * 400  # a body of 100 KB before the headers
    for job_id, image_id in ((job, "a"), (job, ODD_ID), (job, "b"), (other, "c")):
        item = {"image_id": image_id, "metadata": {}, "image": photo, "location": None}
        app.send_task(contract.INGEST_EXTRACT, args=(item, job_id), queue=queue)
    client = redis.Redis.from_url(config.get("DELF_REDIS_URL"))
    try:
        assert waiting_items(client, queue, job) == {"a", ODD_ID, "b"}
        assert waiting_items(client, queue, other) == {"c"}
        with app.connection_for_read() as conn:  # a worker takes the oldest: kombu's unacked hash
            channel = conn.default_channel
            taken = channel.basic_get(queue, no_ack=False)
            assert taken is not None and client.hlen(channel.unacked_key) >= 1
            assert waiting_items(client, queue, job) == {"a", ODD_ID, "b"}  # queued or held: not lost
            client.rpop(queue)  # the next oldest lost outright (kill -9 in kombu's BRPOP window)
            assert waiting_items(client, queue, job) == {"a", "b"}
            assert waiting_items(client, queue, other) == {"c"}
            channel.basic_ack(taken.delivery_tag)
        assert waiting_items(client, queue, job) == {"b"}  # acknowledged: done with, not waiting
    finally:
        client.delete(queue)
        app.close()
