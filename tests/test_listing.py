"""Issue 22, items 3 and 4, against the running system: every command that prints results
speaks JSON with --json (one document on stdout); `delf images` / `delf jobs` list through
ListImages and ListJobs, whose bad input is INVALID_ARGUMENT; `delf ingest` takes the .tsv
manifests `delf eval` takes; `delf resume` leaves a moving job alone and says so, and says
a finished job is finished.

The listing of 10,000 images (no repeat, no skip, with deletes and adds between pages) is
in tests/test_listing_scale.py."""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
import redis

sys.path.insert(0, str(Path(__file__).parent))

from photos import jpeg, random_crop, sample_photo

from delf_common.proto.delf.v1 import delf_pb2
from delf_tools import cli

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 300


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def as_json(out: str):
    """stdout holds one JSON document and nothing else."""
    return json.loads(out)


def _photos(folder: Path, names: dict[str, str], seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, sample in names.items():
        (folder / f"{name}.jpg").write_bytes(jpeg(random_crop(sample_photo(sample), rng, 0.6, 0.9)[::2, ::2].copy()))


@pytest.fixture(scope="module")
def indexed(system, client, tmp_path_factory):
    """Two photos ingested from a .tsv manifest of `delf eval`'s form (path, group), through
    `delf ingest --json`; their ids are the paths without the extension."""
    root = tmp_path_factory.mktemp("listing")
    _photos(root / "lst", {"coffee": "coffee", "rocket": "rocket"}, seed=3)
    manifest = root / "set.tsv"
    manifest.write_text("path\tgroup\tnote\nlst/coffee.jpg\tcup\tcond=day\nlst/rocket.jpg\tlaunch\t\"quoted\"\n")
    yield {"root": root, "manifest": manifest, "ids": ["lst/coffee", "lst/rocket"]}
    for image_id in ("lst/coffee", "lst/rocket"):
        try:
            client.delete_image(image_id)
        except grpc.RpcError:
            pass


def test_ingest_takes_the_tsv_manifests_of_eval_and_answers_json(system, indexed, capsys):
    code, out, err = run(capsys, "--gateway", system.address, "ingest", str(indexed["manifest"]), "--json",
                         "--quiet")
    assert code == 0, err
    job = as_json(out)
    assert job["state"] == "JOB_STATE_COMPLETED" and (job["total"], job["done"], job["failed"]) == (2, 2, 0), job
    code, out, err = run(capsys, "get", "lst/rocket", "--json", "--gateway", system.address)
    info = as_json(out)
    assert code == 0 and info["image_id"] == "lst/rocket" and info["num_features"] > 0, (out, err)
    assert info["metadata"] == {"group": "launch", "note": '"quoted"'}  # quotes are plain text in a .tsv


def test_search_stats_job_images_and_jobs_speak_json(system, indexed, client, capsys):
    photo = indexed["root"] / "lst" / "coffee.jpg"
    code, out, err = run(capsys, "search", str(photo), "--top-k", "2", "--json", "--gateway", system.address)
    found = as_json(out)
    assert code == 0 and found["matches"][0]["image_id"] == "lst/coffee", (out, err)
    assert {"score", "votes", "inliers", "verified", "corners"} <= set(found["matches"][0])
    assert "query_features" in found and "verified_score" in found

    code, out, _ = run(capsys, "stats", "--json", "--gateway", system.address)
    stats = as_json(out)
    assert code == 0 and isinstance(stats["images"], int) and stats["images"] >= 2, stats

    code, out, _ = run(capsys, "jobs", "--json", "--limit", "5", "--gateway", system.address)
    jobs = as_json(out)["jobs"]
    assert code == 0 and 1 <= len(jobs) <= 5, jobs
    assert [j["created_at"] for j in jobs] == sorted((j["created_at"] for j in jobs), reverse=True)
    code, out, _ = run(capsys, "job", jobs[0]["job_id"], "--json", "--gateway", system.address)
    assert code == 0 and as_json(out)["job_id"] == jobs[0]["job_id"]
    code, out, err = run(capsys, "jobs", "--limit", "1", "--gateway", system.address)
    header, row = out.splitlines()[:2]
    assert code == 0 and header.split()[:3] == ["job", "id", "state"] and row.startswith(jobs[0]["job_id"]), out
    assert err.startswith("1 job"), err  # and where to continue, when older ones exist
    code, out, err = run(capsys, "job", jobs[0]["job_id"], "--watch", "--quiet", "--gateway", system.address)
    assert code == 0 and out.startswith(f"job {jobs[0]['job_id']}: COMPLETED"), (out, err)

    code, out, err = run(capsys, "images", "--filter", "group=cup", "--json", "--gateway", system.address)
    listed = as_json(out)
    assert code == 0 and [i["image_id"] for i in listed["images"]] == ["lst/coffee"], listed
    assert listed["next_page_token"] == "" and listed["images"][0]["metadata"]["note"] == "cond=day"
    code, out, err = run(capsys, "images", "--limit", "1", "--after", "lst/coffee", "--gateway", system.address)
    assert code == 0 and out.split("\n")[1].startswith("lst/rocket"), out  # the header, then the row


def test_list_images_pages_and_refuses_bad_input(indexed, client):
    first = client.list_images(page_size=1, filter={"group": "cup"})
    assert [i.image_id for i in first.images] == ["lst/coffee"] and not first.images[0].thumbnail
    every = [i.image_id for i in client.iter_images(page_size=1)]
    assert every == sorted(every) and len(every) == len(set(every)) and set(indexed["ids"]) <= set(every)
    page = client.list_images(page_size=1, page_token="lst/coffee")
    assert page.images[0].image_id == every[every.index("lst/coffee") + 1]

    for request, words in [
        (dict(page_size=1001), "at most 1000"),
        (dict(page_token="x" * 600), "page_token is not an image id"),
        (dict(page_token="a\nb"), "page_token is not an image id"),
        (dict(filter={"bad key": "v"}), "filter key"),
        (dict(filter={f"k{i}": "v" for i in range(17)}), "17 pairs"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            client.list_images(**request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), err.value


def test_list_jobs_pages_newest_first_and_refuses_bad_input(indexed, client):
    for _ in range(3):  # three more jobs, each with one refused item: no work for the workers
        client.wait_job(client.start_ingest_job(iter([delf_pb2.IngestItem(image_id="listing-x")])).job_id)
    seen, token = [], ""
    while True:
        page = client.list_jobs(page_size=2, page_token=token)
        assert len(page.jobs) <= 2 and all(not j.errors for j in page.jobs)
        seen += page.jobs
        token = page.next_page_token
        if not token:
            break
    assert len(seen) >= 4 and len({j.job_id for j in seen}) == len(seen)
    assert [j.created_at for j in seen] == sorted((j.created_at for j in seen), reverse=True)
    assert client.list_jobs().jobs[0].job_id == seen[0].job_id  # page_size 0: 20

    for request, words in [
        (dict(page_size=201), "at most 200"),
        (dict(page_token="not-a-job"), "is not a job id"),
        (dict(page_token="0123456789abcdef0123456789abcdef"), "names no job"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            client.list_jobs(**request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), err.value


def _extractor(system) -> psutil.Process:
    children = json.loads(system.ready_file.read_text())["children"]
    name = next(n for n in children if n.startswith("extract"))
    return psutil.Process(children[name])


def test_resume_leaves_a_moving_job_alone_and_says_a_finished_one_is_finished(system, client, tmp_path, capsys):
    """Issue 22 item 4: photos sent as bytes and still queued (the extractor is paused, so
    they wait in its queue whatever the machine's speed) are not "to be sent again": `delf
    resume` says the job is moving and exits 0, re-sends nothing, and the job completes by
    itself, each photo indexed once."""
    _photos(tmp_path / "moving", {"m-astronaut": "astronaut", "m-chelsea": "chelsea", "m-hubble": "hubble"},
            seed=5)
    before = client.stats().images
    extractor = _extractor(system)
    queue = f"{system.env['DELF_QUEUE_PREFIX']}.extract"
    r = redis.Redis.from_url(system.env["DELF_REDIS_URL"])
    extractor.send_signal(signal.SIGSTOP)
    try:
        code, out, err = run(capsys, "ingest", str(tmp_path / "moving"), "--no-wait", "--json", "--quiet",
                             "--gateway", system.address)
        job_id = as_json(out)["job_id"]
        assert code == 0, err
        code, out, err = run(capsys, "resume", job_id, "--gateway", system.address)
        assert code == 0 and f"job {job_id} is moving: 3 queued or in progress, 0 done" in out, (out, err)
        assert "send" not in err and "--resume" not in out + err, (out, err)  # no advice to upload again
        code, out, _ = run(capsys, "resume", job_id, "--json", "--gateway", system.address)
        answer = as_json(out)
        assert code == 0 and answer["resumed"] is False and "is moving" in answer["reason"], answer
        assert r.llen(queue) <= 3  # nothing was sent again (a paused worker may hold one it took)
        # The server tells queued photos from lost ones (delf_common.inflight): the tasks in the
        # queue are found by their headers. A paused worker blocked in BRPOP may have taken one
        # message that is in neither the queue nor kombu's unacked hash yet: at most one is lost.
        from delf_common.inflight import waiting_items

        names = {"m-astronaut", "m-chelsea", "m-hubble"}
        waiting = waiting_items(r, queue, job_id)
        assert waiting <= names and len(waiting) >= 2, waiting
        resumed = client.resume_job(job_id)  # the RPC re-sends what it must, moving or not
        assert resumed.resent == 0 and resumed.awaiting_upload == 3 - len(waiting), resumed
    finally:
        extractor.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (job := client.get_job(job_id)).state != delf_pb2.JOB_STATE_COMPLETED:
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert (job.done, job.failed) == (3, 0) and client.stats().images - before == 3, job

    code, out, err = run(capsys, "resume", job_id, "--gateway", system.address)
    assert code == 0 and f"job {job_id} is finished: 3 indexed, 0 failed; nothing to resume" in out, (out, err)
    for name in ("m-astronaut", "m-chelsea", "m-hubble"):
        client.delete_image(name)
