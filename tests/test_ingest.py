"""Bulk ingestion from manifests and URLs, and resuming jobs, on a real running system.

One system for the module (gateway, Celery workers, Redis db 14, Milvus Lite) with
URL ingest on, loopback allowed (DELF_URL_ALLOW_PRIVATE=1) and only 127.0.0.1 as an
allowed host, so a local http.server can serve photos. What the defaults refuse (URL
ingest off, loopback and private ranges) is checked on in-process gateways in
tests/test_security.py and by the fetcher's own tests in tests/test_fetch.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import redis

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TEST_REDIS_URL, RunningSystem, redis_available, system_env
from photo_server import PhotoServer, small_photo

from delf_common.manifest import ManifestError, read_manifest
from delf_common.proto.delf.v1 import delf_pb2

JOB_TIMEOUT_S = 240


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def web():
    server = PhotoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def ingest_system(tmp_path_factory):
    if not redis_available(TEST_REDIS_URL):
        pytest.fail(f"no Redis at {TEST_REDIS_URL}")
    root = tmp_path_factory.mktemp("ingest")
    (root / "photos").mkdir()
    env = system_env(root, DELF_INGEST_ROOTS=str(root / "photos"), DELF_URL_INGEST="1",
                     DELF_URL_ALLOW_PRIVATE="1", DELF_URL_ALLOWED_HOSTS="127.0.0.1",
                     DELF_MAX_IMAGE_BYTES=str(4 * 1024 * 1024))
    running = RunningSystem(root, env)
    running.start()
    yield running
    code = running.stop()
    if code not in (0, None):
        print(f"launcher exited with {code}:\n{running.tail()}")


@pytest.fixture(scope="module")
def iclient(ingest_system):
    c = ingest_system.client()
    yield c
    c.close()


def wait_job(client, job_id: str, finished: int | None = None, timeout: float = JOB_TIMEOUT_S):
    """Until the job completes (or, with `finished`, until that many items are done or failed)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(job_id)
        if finished is None and job.state == delf_pb2.JOB_STATE_COMPLETED:
            return job
        if finished is not None and job.done + job.failed >= finished:
            return job
        assert time.monotonic() < deadline, f"job stuck: {job}"
        time.sleep(0.3)


def cli(system, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "delf_tools.cli", "--gateway", system.address, *args],
                          capture_output=True, text=True, timeout=300, check=check)


# --------------------------------------------------------------------------- manifests


def test_csv_manifest_through_the_cli_indexes_photos_with_metadata(ingest_system, iclient, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "coffee.jpg").write_bytes(small_photo("coffee"))
    elsewhere = tmp_path / "elsewhere.jpg"
    elsewhere.write_bytes(small_photo("chelsea"))
    manifest = tmp_path / "photos.csv"
    manifest.write_text(
        "id,location,city,metadata\n"
        'csv-coffee,sub/coffee.jpg,Paris,"{""year"": 2019, ""tag"": ""cup""}"\n'
        f"csv-cat,{elsewhere},,\n"
    )
    out = cli(ingest_system, "ingest", str(manifest), "--quiet")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "COMPLETED" in out.stdout and "indexed 2" in out.stdout
    coffee = iclient.get_image("csv-coffee")
    assert dict(coffee.metadata) == {"city": "Paris", "year": "2019", "tag": "cup"}
    assert coffee.num_features > 0
    assert dict(iclient.get_image("csv-cat").metadata) == {}  # empty cells are left out


def test_jsonl_manifest_with_a_url_and_a_refused_host(ingest_system, iclient, web, tmp_path):
    (tmp_path / "rocket.jpg").write_bytes(small_photo("rocket"))
    web.bodies["/astronaut.jpg"] = small_photo("astronaut")
    manifest = tmp_path / "photos.jsonl"
    lines = [
        {"id": "jl-rocket", "location": "rocket.jpg", "metadata": {"kind": "rocket", "n": 1}},
        {"id": "jl-web", "location": web.url("/astronaut.jpg"), "metadata": {"src": "web"}},
        # localhost resolves to loopback, allowed here, but is not in DELF_URL_ALLOWED_HOSTS
        {"id": "jl-localhost", "location": web.url("/astronaut.jpg", host="localhost")},
    ]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    named = []
    job = iclient.ingest_manifest(manifest, on_job=named.append)
    assert named == [job.job_id]  # the id came before the stream was sent
    job = wait_job(iclient, job.job_id)
    assert (job.total, job.done, job.failed) == (3, 2, 1), job
    reasons = {e.image_id: e.reason for e in job.errors}
    assert "DELF_URL_ALLOWED_HOSTS" in reasons["jl-localhost"]
    assert dict(iclient.get_image("jl-rocket").metadata) == {"kind": "rocket", "n": "1"}
    fetched = iclient.get_image("jl-web")
    assert dict(fetched.metadata) == {"src": "web"} and fetched.num_features > 0
    assert web.hits("/astronaut.jpg") == 1  # the refused host was never contacted


@pytest.mark.parametrize("name, text, words", [
    ("m.csv", "id,path\na,b.jpg\n", ":1: the header needs the columns id and location"),
    ("m.csv", "id,location\na,x.jpg\n,x.jpg\nc,x.jpg,extra\n", ":3: missing id"),
    ("m.csv", "id,location\na,x.jpg\nb,x.jpg\nc,x.jpg,extra\n", ":4: 3 fields but the header has 2"),
    ("m.csv", "id,location,metadata\na,x.jpg,{not json\n", ":2: the metadata column is not JSON"),
    ("m.csv", "id,location\na,x.jpg\na,x.jpg\n", ":3: id 'a' already appears on line 2"),
    ("m.csv", "id,location\na,missing.jpg\n", ":2: location 'missing.jpg': no such file"),
    ("m.csv", "id,location\na,file:///etc/passwd\n", ":2: location 'file:///etc/passwd': only local paths"),
    ("m.jsonl", '{"id": "a", "location": "x.jpg"}\n{"id": "b", "location": \n', ":2: not a JSON object"),
    ("m.jsonl", '{"id": "a", "locaton": "x.jpg"}\n', ":1: unknown key 'locaton'"),
    ("m.jsonl", '\n\n{"id": "a", "location": "x.jpg", "metadata": [1]}\n', ":3: metadata must be a JSON object"),
    ("m.jsonl", '{"id": "a", "location": "x.jpg", "metadata": {"k": {"x": 1}}}\n', ":1: metadata 'k' must be"),
    ("m.jsonl", '["a", "x.jpg"]\n', ":1: expected a JSON object, got list"),
    ("m.tsv", "photo\tgroup\nx.jpg\tg\n", ":1: the header needs the columns location (or path)"),
    ("m.tsv", "path\tgroup\nx.jpg\tg\nx.jpg\tg\n", ":3: id 'x' already appears on line 2"),
    ("m.tsv", "path\tgroup\nx.jpg\tg\tmore\n", ":2: 3 fields but the header has 2"),
    ("m.tsv", "path\tgroup\nnope.jpg\tg\n", ":2: location 'nope.jpg': no such file"),
])
def test_malformed_manifests_are_refused_with_the_line(tmp_path, name, text, words):
    (tmp_path / "x.jpg").write_bytes(b"a photo")
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert f"{path}{words}" in str(err.value), str(err.value)


def test_a_tsv_manifest_reads_as_eval_reads_it(tmp_path):
    """`delf ingest` takes `delf eval`'s manifests: tab-separated, a path column, ids from
    the paths; one reader (delf_common.manifest.read_table) serves both commands."""
    from delf_tools.evaluation import read_conditions
    from delf_tools.evaluation import read_manifest as eval_rows

    (tmp_path / "a").mkdir()
    for name in ("a/one.jpg", "two.JPG"):
        (tmp_path / name).write_bytes(b"a photo")
    path = tmp_path / "MANIFEST.tsv"
    path.write_text('path\tgroup\tnote\na/one.jpg\tg1\tcond=night; "dark"\ntwo.JPG\tg2\t\n\n')
    entries = read_manifest(path)
    assert [(e.image_id, e.location, e.metadata) for e in entries] == [
        ("a/one", "a/one.jpg", {"group": "g1", "note": 'cond=night; "dark"'}), ("two", "two.JPG", {"group": "g2"})]
    assert eval_rows(path) == [("a/one.jpg", "g1"), ("two.JPG", "g2")]
    assert read_conditions(path) == {"a/one.jpg": "night"}
    with_ids = tmp_path / "ids.tsv"
    with_ids.write_text("id\tlocation\ncustom\ttwo.JPG\n")
    assert [(e.image_id, e.path.name) for e in read_manifest(with_ids)] == [("custom", "two.JPG")]


def test_the_cli_reports_a_bad_manifest_before_sending_anything(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "location": "x.jpg"}\nnot json\n{"id": "b"}\n')
    (tmp_path / "x.jpg").write_bytes(b"a photo")
    # No gateway listens there: the manifest is refused before any connection.
    out = subprocess.run([sys.executable, "-m", "delf_tools.cli", "--gateway", "127.0.0.1:9", "ingest", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"{path}:2: not a JSON object" in out.stderr and f"{path}:3: missing location" in out.stderr


def test_server_paths_send_locations_for_the_server_to_read(ingest_system, iclient, tmp_path):
    inside = ingest_system.root / "photos" / "manifest" / "motorcycle.jpg"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(small_photo("motorcycle"))
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(small_photo("coffee", 1))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,location\nsp-in,manifest/motorcycle.jpg\nsp-out,{outside}\nsp-dots,../outside.jpg\n")
    job = wait_job(iclient, iclient.ingest_manifest(manifest, server_paths=True).job_id)
    assert (job.done, job.failed) == (1, 2), job
    reasons = {e.image_id: e.reason for e in job.errors}
    assert "outside the ingest roots" in reasons["sp-out"] and "'..'" in reasons["sp-dots"]
    assert iclient.get_image("sp-in").num_features > 0


# --------------------------------------------------------------------------- URLs


def test_url_items_refused_at_the_gateway_never_reach_the_network(ingest_system, iclient, web):
    web.bodies["/p.jpg"] = small_photo("chelsea", 1)
    items = [
        delf_pb2.IngestItem(image_id="u-file", location="file:///etc/passwd"),
        delf_pb2.IngestItem(image_id="u-ftp", location=f"ftp://127.0.0.1:{web.port}/p.jpg"),
        delf_pb2.IngestItem(image_id="u-data", location="data:image/jpeg;base64,/9j/4AAQ"),
        delf_pb2.IngestItem(image_id="u-private", location="http://10.1.2.3/p.jpg"),
        delf_pb2.IngestItem(image_id="u-metadata", location="http://169.254.169.254/latest/meta-data/"),
        delf_pb2.IngestItem(image_id="u-creds", location=f"http://user:pw@127.0.0.1:{web.port}/p.jpg"),
    ]
    before = len(web.requests)
    job = wait_job(iclient, iclient.start_ingest_job(items).job_id)
    assert (job.total, job.done, job.failed) == (6, 0, 6)
    reasons = {e.image_id: e.reason for e in job.errors}
    for key in ("u-file", "u-ftp", "u-data"):
        assert "only http and https" in reasons[key], reasons[key]
    assert "DELF_URL_ALLOWED_HOSTS" in reasons["u-private"] and "DELF_URL_ALLOWED_HOSTS" in reasons["u-metadata"]
    assert "credentials" in reasons["u-creds"]
    assert len(web.requests) == before


def test_url_fetch_errors_redirects_and_transient_failures(ingest_system, iclient, web):
    web.bodies["/flaky.jpg"] = small_photo("coffee", 2)
    web.fail_first["/flaky.jpg"] = 2  # two 503s, then the photo: retried with backoff
    web.bodies["/moved-target.jpg"] = small_photo("rocket", 1)
    web.redirects["/moved.jpg"] = "/moved-target.jpg"
    web.redirects["/to-private.jpg"] = "http://10.0.0.1/p.jpg"
    web.bodies["/not-a-photo.jpg"] = b"<html>hello</html>"
    items = [
        delf_pb2.IngestItem(image_id="w-flaky", location=web.url("/flaky.jpg")),
        delf_pb2.IngestItem(image_id="w-moved", location=web.url("/moved.jpg")),
        delf_pb2.IngestItem(image_id="w-to-private", location=web.url("/to-private.jpg")),
        delf_pb2.IngestItem(image_id="w-404", location=web.url("/nothing-here.jpg")),
        delf_pb2.IngestItem(image_id="w-html", location=web.url("/not-a-photo.jpg")),
    ]
    job = wait_job(iclient, iclient.start_ingest_job(items).job_id)
    reasons = {e.image_id: e.reason for e in job.errors}
    assert (job.done, job.failed) == (2, 3), reasons
    assert web.hits("/flaky.jpg") == 3
    assert iclient.get_image("w-flaky").num_features > 0 and iclient.get_image("w-moved").num_features > 0
    assert "DELF_URL_ALLOWED_HOSTS" in reasons["w-to-private"]  # each redirect target is checked again
    assert "HTTP 404" in reasons["w-404"]
    assert "w-html" in reasons


# --------------------------------------------------------------------------- resume


def _extractor_pid(system: RunningSystem) -> int:
    psutil = pytest.importorskip("psutil")
    for child in psutil.Process(system.proc.pid).children(recursive=True):
        if "delf_extractor.tasks" in " ".join(child.cmdline()):
            return child.pid
    pytest.fail("no extractor worker under the launcher")


def _resume_items(system: RunningSystem):
    """Four photos sent as locations the server reads (r-loc-k) and four as bytes (r-mem-k):
    their paths, their bytes and the ingest items."""
    root = system.root / "photos" / "resume"
    root.mkdir(parents=True, exist_ok=True)
    names = ("astronaut", "coffee", "chelsea", "rocket")
    loc_paths, photo_bytes = {}, {}
    items = []
    for k, name in enumerate(names):
        path = root / f"{name}.jpg"
        path.write_bytes(small_photo(name, 3))
        loc_paths[f"r-loc-{k}"] = path
        photo_bytes[f"r-mem-{k}"] = small_photo(name, 4)
        items.append(delf_pb2.IngestItem(image_id=f"r-loc-{k}", location=str(path), metadata={"k": str(k)}))
        items.append(delf_pb2.IngestItem(image_id=f"r-mem-{k}", image=photo_bytes[f"r-mem-{k}"],
                                         metadata={"k": str(k)}))
    return loc_paths, photo_bytes, items


def _start_job_losing_four(system: RunningSystem, iclient, items) -> str:
    """The job's id. The extractor is paused while the job is dispatched; the 4 newest
    messages are then taken off its queue (kombu LPUSHes and BRPOPs: the newest are on
    the left): lost."""
    queue = f"{system.env['DELF_QUEUE_PREFIX']}.extract"
    r = redis.Redis.from_url(TEST_REDIS_URL)
    pid = _extractor_pid(system)

    os.kill(pid, signal.SIGSTOP)
    try:
        job_id = iclient.start_ingest_job(items).job_id
        lost = r.lpop(queue, 4)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert lost is not None and len(lost) == 4
    return job_id


def _indexed(iclient, image_ids) -> set[str]:
    """The ids the index holds (any other is NOT_FOUND)."""
    finished = set()
    for image_id in image_ids:
        try:
            iclient.get_image(image_id)
            finished.add(image_id)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
    return finished


def test_resume_resends_lost_items_and_redoes_nothing(ingest_system, iclient):
    """Messages lost between dispatch and a worker (what kill -9 between BRPOP and kombu's
    unacked record does) leave a job RUNNING forever; ResumeJob plus a resumed stream
    finish it, each photo indexed once, and the photos finished before are not touched."""
    loc_paths, photo_bytes, items = _resume_items(ingest_system)
    stats_before = iclient.stats()
    job_id = _start_job_losing_four(ingest_system, iclient, items)
    job = wait_job(iclient, job_id, finished=4)
    time.sleep(2.0)  # nothing else can arrive: the rest of the messages are gone
    job = iclient.get_job(job_id)
    assert job.state == delf_pb2.JOB_STATE_RUNNING and (job.total, job.done, job.failed) == (8, 4, 0), job
    finished = _indexed(iclient, list(loc_paths) + list(photo_bytes))
    assert len(finished) == 4
    # Redoing a finished photo would now fail it: its file is gone, its bytes are garbage.
    for image_id in finished & set(loc_paths):
        loc_paths[image_id].unlink()

    # 1. ResumeJob re-sends the unfinished location items; the bytes ones wait for the client.
    resumed = iclient.resume_job(job_id)
    unfinished_loc = set(loc_paths) - finished
    unfinished_mem = set(photo_bytes) - finished
    assert (resumed.resent, resumed.awaiting_upload) == (len(unfinished_loc), len(unfinished_mem)), resumed
    job = wait_job(iclient, job_id, finished=8 - len(unfinished_mem))
    assert job.state == delf_pb2.JOB_STATE_RUNNING and job.failed == 0, job

    # 2. The client streams its bytes items again into the job: finished ones are skipped unread.
    again = [delf_pb2.IngestItem(image_id=i, metadata={"k": i[-1]},
                                 image=b"garbage, must not be read" if i in finished else photo_bytes[i])
             for i in photo_bytes]
    answer = iclient.start_ingest_job(again, resume_job=job_id)
    assert answer.job_id == job_id and answer.awaiting_upload == 0
    job = wait_job(iclient, job_id)
    assert (job.total, job.done, job.failed) == (8, 8, 0), job

    # Each photo indexed exactly once: 8 more images, descriptors = the sum of theirs.
    infos = [iclient.get_image(i) for i in list(loc_paths) + list(photo_bytes)]
    stats = iclient.stats()
    assert stats.images - stats_before.images == 8
    assert stats.descriptors - stats_before.descriptors == sum(i.num_features for i in infos)
    assert all(i.metadata["k"] == i.image_id[-1] for i in infos)

    with pytest.raises(grpc.RpcError) as err:
        iclient.resume_job(job_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "completed" in err.value.details()
    for info in infos:
        iclient.delete_image(info.image_id)


def test_the_gateway_sweep_resumes_stalled_jobs(ingest_system, iclient, monkeypatch):
    """DELF_JOB_RESUME_AFTER_S: one round of the gateway's sweep (called here on an
    in-process Gateway sharing the system's Redis and queues) re-sends a stalled job's
    lost items and leaves jobs with recent progress alone."""
    from delf_common import config
    from delf_common.celery_app import make_app
    from delf_common.jobs import JobStore
    from delf_gateway.server import Gateway

    root = ingest_system.root / "photos" / "sweep"
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for k, name in enumerate(("astronaut", "coffee", "chelsea", "motorcycle")):
        (root / f"{name}.jpg").write_bytes(small_photo(name, 6))
        items.append(delf_pb2.IngestItem(image_id=f"s-{k}", location=str(root / f"{name}.jpg")))
    queue = f"{ingest_system.env['DELF_QUEUE_PREFIX']}.extract"
    r = redis.Redis.from_url(TEST_REDIS_URL)
    pid = _extractor_pid(ingest_system)
    os.kill(pid, signal.SIGSTOP)
    try:
        job_id = iclient.start_ingest_job(items).job_id
        assert len(r.lpop(queue, 2)) == 2  # the two newest messages are lost
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_job(iclient, job_id, finished=2)

    for name in config.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name in ("DELF_REDIS_URL", "DELF_QUEUE_PREFIX", "DELF_INGEST_ROOTS"):
        monkeypatch.setenv(name, ingest_system.env[name])
    gateway = Gateway(app=make_app(), jobs=JobStore())
    assert job_id not in gateway.resume_stalled_jobs(idle_s=600)  # progress within 600 s: left alone
    time.sleep(1.5)
    swept = gateway.resume_stalled_jobs(idle_s=1)
    assert swept[job_id] == (2, 0), swept
    assert job_id not in gateway.resume_stalled_jobs(idle_s=1)  # just resumed: that counts as progress
    job = wait_job(iclient, job_id)
    assert (job.total, job.done, job.failed) == (4, 4, 0), job
    for item in items:
        assert iclient.get_image(item.image_id).num_features > 0
        iclient.delete_image(item.image_id)


def test_an_interrupted_stream_can_be_resumed_from_the_client(ingest_system, iclient):
    photos = {f"i-{k}": small_photo(n, 5) for k, n in enumerate(("astronaut", "coffee", "rocket"))}

    named = []
    interrupted = threading.Event()

    class ClientGone(Exception):
        pass

    def slow():  # one photo, then the client is stopped (as by Ctrl-C) before the next
        yield delf_pb2.IngestItem(image_id="i-0", image=photos["i-0"])
        interrupted.wait(30)

    def on_job(job_id):  # the gateway has named the job: now the client goes away
        named.append(job_id)
        raise ClientGone()

    try:
        with pytest.raises(ClientGone):
            iclient.start_ingest_job(slow(), on_job=on_job)
    finally:
        interrupted.set()
    assert len(named) == 1
    job_id = named[0]
    deadline = time.monotonic() + 30
    while (job := iclient.get_job(job_id)).state != delf_pb2.JOB_STATE_CANCELLED:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job.total <= 1
    wait_job(iclient, job_id, finished=job.total)  # i-0 (if it arrived) indexed or skipped as cancelled

    items = [delf_pb2.IngestItem(image_id=i, image=b) for i, b in photos.items()]
    iclient.start_ingest_job(items, resume_job=job_id)
    job = wait_job(iclient, job_id)
    assert (job.total, job.done, job.failed) == (3, 3, 0), job
    for image_id in photos:
        assert iclient.get_image(image_id).num_features > 0
        iclient.delete_image(image_id)

    # An explicit cancel is final.
    other = iclient.start_ingest_job([delf_pb2.IngestItem(image_id="i-x", image=photos["i-0"])])
    iclient.cancel_job(other.job_id)
    with pytest.raises(grpc.RpcError) as err:
        iclient.resume_job(other.job_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cancelled" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        iclient.resume_job("0123456789abcdef0123456789abcdef")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
