"""The HTTP/JSON API (services/web, delf_web) against the running system: every route,
bearer tokens refused and accepted, and a table of bad input answered 4xx with the
contract's message, never 500, with nothing stored changed."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests

from conftest import free_port
from photos import jpeg, png, sample_photo
from web_probe import Http, needs_listing

pytestmark = pytest.mark.slow

PHOTO = jpeg(sample_photo("coffee"))
OTHER = jpeg(sample_photo("astronaut"))


@pytest.fixture(scope="module")
def http(system):
    return Http(system.http_url)


@pytest.fixture(scope="module")
def anchor(http):
    """One photo added through the API (the module's own id), removed at the end."""
    r = http("PUT", "/api/v1/images/web/anchor", files={"photo": ("a.jpg", PHOTO)},
             data={"metadata": json.dumps({"source": "web-test"})})
    assert r.status_code == 200, r.text
    yield r.json()
    http("DELETE", "/api/v1/images/web/anchor")


def counts(http) -> tuple[int, int]:
    s = http.get("/api/v1/stats").json()
    return s["images"], s["descriptors"]


def test_add_get_thumbnail_search_delete(http, anchor):
    assert anchor["image_id"] == "web/anchor" and anchor["metadata"] == {"source": "web-test"}
    assert anchor["width"] > 0 and anchor["num_features"] > 0
    got = http.get("/api/v1/images/web/anchor").json()
    assert got["image_id"] == "web/anchor" and got["width"] == anchor["width"]
    thumb = http.get(anchor["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"

    # Other tests index the same sample photo under their own ids in the shared system:
    # this module's searches are filtered to its own photos.
    found = http.post("/api/v1/search", files={"photo": ("q.jpg", PHOTO)},
                      data={"top_k": "3", "filter": "source=web-test"}).json()
    best = found["matches"][0]
    assert best["image_id"] == "web/anchor" and best["verified"] and len(best["corners"]) == 4
    assert "correspondences" not in best
    by_id = http.post("/api/v1/search/by-id", json={"image_id": "web/anchor", "top_k": 2})
    assert by_id.status_code == 200, by_id.text
    assert "web/anchor" not in [m["image_id"] for m in by_id.json()["matches"]]  # not itself
    evidence = http.post("/api/v1/search", files={"photo": ("q.jpg", PHOTO)},
                         data={"top_k": "1", "correspondences": "true", "filter": "source=web-test"}).json()["matches"][0]
    assert evidence["image_id"] == "web/anchor" and any(c["inlier"] for c in evidence["correspondences"])
    boxed = http.post("/api/v1/search", files={"photo": ("q.jpg", PHOTO)},
                      data={"box": "0,0,300,300", "filter": "source=web-test"}).json()
    assert [m["image_id"] for m in boxed["matches"]][:1] == ["web/anchor"]
    filtered = http.post("/api/v1/search", files={"photo": ("q.jpg", PHOTO)}, data={"filter": "source=elsewhere"})
    assert "web/anchor" not in [m["image_id"] for m in filtered.json()["matches"]]


def test_post_images_adds_and_delete_removes(http):
    r = http.post("/api/v1/images", data={"image_id": "web/other"}, files={"photo": ("o.png", png(sample_photo("astronaut")))})
    assert r.status_code == 200, r.text
    gone = http("DELETE", "/api/v1/images/web/other")
    assert gone.status_code == 200 and gone.json()["descriptors_removed"] > 0
    assert http.get("/api/v1/images/web/other").status_code == 404


def test_ingest_job_runs_to_completion_and_streams_progress(http):
    r = http.post("/api/v1/jobs", files=[("photos", ("web-job-1.jpg", OTHER)), ("photos", ("web-job-2.jpg", b"not a photo"))])
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    with http.get(f"/api/v1/jobs/{job_id}/events", stream=True) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in events.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    states = [json.loads(line[6:]).get("state") for line in lines]
    assert "COMPLETED" in states
    job = http.get(f"/api/v1/jobs/{job_id}").json()
    assert (job["state"], job["total"], job["done"], job["failed"]) == ("COMPLETED", 2, 1, 1)
    assert job["errors"][0]["image_id"] == "web-job-2" and job["errors"][0]["reason"]
    assert http.post(f"/api/v1/jobs/{job_id}/cancel").status_code in (200, 409)
    assert http.post(f"/api/v1/jobs/{job_id}/resume").status_code in (200, 409)
    http("DELETE", "/api/v1/images/web-job-1")


def test_stats_health_openapi_docs_console(http):
    answer = http.get("/api/v1/stats", headers={"x-request-id": "web-test-stats-42"})
    stats = answer.json()
    assert stats["images"] >= 0 and stats["model"]
    assert answer.headers["x-request-id"] == "web-test-stats-42"  # sent on to the gateway, and back
    assert http.get("/api/v1/health").json() == {"web": "SERVING", "gateway": "SERVING"}
    spec = http.get("/openapi.json").json()
    assert {"/api/v1/search", "/api/v1/images", "/api/v1/jobs/{job_id}/events"} <= set(spec["paths"])
    docs = http.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert http.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    console = http.get("/")
    assert console.status_code == 200 and "<title>DELF search</title>" in console.text
    assert "http" not in console.text.split("<body>")[0].replace("http-equiv", "")  # nothing fetched from elsewhere


@needs_listing
def test_list_images_pages_by_id(http, anchor):
    http("PUT", "/api/v1/images/web/anchor2", files={"photo": ("b.jpg", OTHER)})
    try:
        first = http.get("/api/v1/images", params={"page_size": 1, "filter": "source=web-test"}).json()
        assert [i["image_id"] for i in first["images"]] == ["web/anchor"]
        ids, token = [], ""
        while True:
            page = http.get("/api/v1/images", params={"page_size": 2, "page_token": token}).json()
            ids += [i["image_id"] for i in page["images"]]
            token = page["next_page_token"]
            if not token:
                break
        assert ids == sorted(ids) and {"web/anchor", "web/anchor2"} <= set(ids)
    finally:
        http("DELETE", "/api/v1/images/web/anchor2")


@needs_listing
def test_list_jobs_newest_first(http):
    jobs = http.get("/api/v1/jobs", params={"page_size": 5}).json()["jobs"]
    assert jobs and [j["created_at"] for j in jobs] == sorted((j["created_at"] for j in jobs), reverse=True)


# --------------------------------------------------------------------------- bad input

LONG_ID = "x" * 600
BAD_INPUT = [
    # (what, method, path, request kwargs, expected status)
    ("no photo", "POST", "/api/v1/search", {"data": {"top_k": "3"}}, 400),
    ("empty photo", "POST", "/api/v1/search", {"files": {"photo": ("q.jpg", b"")}}, 400),
    ("not a photo", "POST", "/api/v1/search", {"files": {"photo": ("q.jpg", b"hello world" * 10)}}, 400),
    ("top_k 0", "POST", "/api/v1/search", {"files": {"photo": ("q.jpg", PHOTO)}, "data": {"top_k": "0"}}, 400),
    ("top_k 101", "POST", "/api/v1/search", {"files": {"photo": ("q.jpg", PHOTO)}, "data": {"top_k": "101"}}, 400),
    ("top_k text", "POST", "/api/v1/search", {"files": {"photo": ("q.jpg", PHOTO)}, "data": {"top_k": "ten"}}, 400),
    ("box of 3", "POST", "/api/v1/search", {"files": {"photo": ("q.jpg", PHOTO)}, "data": {"box": "1,2,3"}}, 400),
    ("box inverted", "POST", "/api/v1/search", {"files": {"photo": ("q.jpg", PHOTO)}, "data": {"box": "50,50,10,10"}}, 400),
    ("box nan", "POST", "/api/v1/search", {"files": {"photo": ("q.jpg", PHOTO)}, "data": {"box": "nan,0,9,9"}}, 400),
    ("filter no =", "POST", "/api/v1/search", {"files": {"photo": ("q.jpg", PHOTO)}, "data": {"filter": "oops"}}, 400),
    ("filter bad key", "POST", "/api/v1/search", {"files": {"photo": ("q.jpg", PHOTO)}, "data": {"filter": "a b=c"}}, 400),
    ("not multipart", "POST", "/api/v1/search", {"json": {"photo": "x"}}, 400),
    ("by-id unknown", "POST", "/api/v1/search/by-id", {"json": {"image_id": "web/no-such-image"}}, 404),
    ("by-id empty", "POST", "/api/v1/search/by-id", {"json": {"image_id": ""}}, 400),
    ("by-id no body", "POST", "/api/v1/search/by-id", {"data": b"{not json"}, 400),
    ("by-id top_k str", "POST", "/api/v1/search/by-id", {"json": {"image_id": "web/anchor", "top_k": "x"}}, 400),
    ("by-id filter int", "POST", "/api/v1/search/by-id", {"json": {"image_id": "web/anchor", "filter": {"a": 1}}}, 400),
    ("by-url file:", "POST", "/api/v1/search/by-url", {"json": {"url": "file:///etc/passwd"}}, 403),
    ("by-url metadata IP", "POST", "/api/v1/search/by-url", {"json": {"url": "http://169.254.169.254/x.jpg"}}, 403),
    ("get unknown", "GET", "/api/v1/images/web/no-such-image", {}, 404),
    ("get id too long", "GET", f"/api/v1/images/{LONG_ID}", {}, 400),
    ("get id control", "GET", "/api/v1/images/a%01b", {}, 400),
    ("delete unknown", "DELETE", "/api/v1/images/web/no-such-image", {}, 404),
    ("thumbnail unknown", "GET", "/api/v1/thumbnails/web/no-such-image", {}, 404),
    ("put no photo", "PUT", "/api/v1/images/web/x", {"data": {"metadata": "{}"}}, 400),
    ("put not a photo", "PUT", "/api/v1/images/web/x", {"files": {"photo": ("x.jpg", b"GIF89a-no")}}, 400),
    ("put metadata not json", "PUT", "/api/v1/images/web/x", {"files": {"photo": ("x.jpg", PHOTO)},
                                                              "data": {"metadata": "{oops"}}, 400),
    ("put metadata not str", "PUT", "/api/v1/images/web/x", {"files": {"photo": ("x.jpg", PHOTO)},
                                                             "data": {"metadata": '{"a": 1}'}}, 400),
    ("put metadata huge", "PUT", "/api/v1/images/web/x", {"files": {"photo": ("x.jpg", PHOTO)},
                                                          "data": {"metadata": json.dumps({"a": "b" * 20000})}}, 400),
    ("post no id", "POST", "/api/v1/images", {"files": {"photo": ("x.jpg", PHOTO)}}, 400),
    ("job empty", "POST", "/api/v1/jobs", {"data": {"urls": ""}}, 400),
    ("job bad manifest", "POST", "/api/v1/jobs", {"files": {"manifest": ("m.csv", b"nothing,useful\n")}}, 400),
    ("job manifest suffix", "POST", "/api/v1/jobs", {"files": {"manifest": ("m.txt", b"x")}}, 400),
    ("job duplicate ids", "POST", "/api/v1/jobs", {"files": [("photos", ("d.jpg", PHOTO)), ("photos", ("d.png", PHOTO))]}, 400),
    ("job url line", "POST", "/api/v1/jobs", {"data": {"urls": "a b c"}}, 400),
    ("job id malformed", "GET", "/api/v1/jobs/not-a-job", {}, 400),
    ("job unknown", "GET", "/api/v1/jobs/" + "0" * 32, {}, 404),
    ("events unknown", "GET", "/api/v1/jobs/" + "0" * 32 + "/events", {}, 404),
    ("cancel malformed", "POST", "/api/v1/jobs/xyz/cancel", {}, 400),
    ("list page_size 0", "GET", "/api/v1/images", {"params": {"page_size": 0}}, 400),
    ("list jobs page_size", "GET", "/api/v1/jobs", {"params": {"page_size": 100000}}, 400),
    ("wrong method", "PATCH", "/api/v1/stats", {}, 405),
    ("no such route", "GET", "/api/v1/nothing", {}, 404),
]


@pytest.mark.parametrize("what,method,path,kwargs,status", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_answers_4xx_with_a_message(http, anchor, what, method, path, kwargs, status):
    before = counts(http)
    r = http(method, path, **kwargs)
    assert r.status_code == status, (what, r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error["code"] and error["message"] and "Traceback" not in error["message"]
    assert counts(http) == before
    assert http.get("/api/v1/images/web/anchor").json()["metadata"] == {"source": "web-test"}


def test_bad_input_table_is_large_enough():
    assert len(BAD_INPUT) >= 20


def test_oversized_photo_is_413(http, system):
    big = b"\xff\xd8" + b"\0" * (8 * 1024 * 1024 + 10)  # the system's DELF_MAX_IMAGE_BYTES is 8 MiB
    r = http.post("/api/v1/search", files={"photo": ("big.jpg", big)})
    assert r.status_code == 413 and "DELF_MAX_IMAGE_BYTES" in r.json()["error"]["message"]


# --------------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def guarded(system, tmp_path_factory):
    """A second web service with DELF_AUTH_TOKENS, in front of the same gateway."""
    addr = f"127.0.0.1:{free_port()}"
    env = {**system.env, "DELF_HTTP_ADDR": addr, "DELF_GATEWAY": system.address, "DELF_AUTH_TOKENS": "s3cret,other"}
    log = open(tmp_path_factory.mktemp("web") / "web.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "delf_web"], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(f"http://{addr}/api/v1/health", timeout=2)
            break
        except requests.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "the web service did not start"
            time.sleep(0.3)
    yield f"http://{addr}"
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic czNjcmV0", "Bearer", "s3cret"])
def test_routes_refuse_requests_without_an_accepted_token(guarded, header):
    headers = {"Authorization": header} if header else {}
    for method, path in [("GET", "/api/v1/stats"), ("GET", "/api/v1/images/web/anchor"),
                         ("POST", "/api/v1/search/by-id"), ("GET", "/api/v1/jobs/" + "0" * 32),
                         ("DELETE", "/api/v1/images/web/anchor")]:
        r = requests.request(method, guarded + path, headers=headers, json={"image_id": "web/anchor"}, timeout=30)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["code"] == "UNAUTHENTICATED"


def test_an_accepted_token_is_let_through(guarded):
    for token in ("s3cret", "other"):
        r = requests.get(guarded + "/api/v1/stats", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200 and "images" in r.json()
    assert requests.get(guarded + "/api/v1/health", timeout=30).status_code == 200  # open, like gRPC health
    assert requests.get(guarded + "/", timeout=30).status_code == 200
