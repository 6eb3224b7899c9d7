"""Ingest jobs: start one (uploaded photos, a manifest, URLs), follow, cancel, resume, list."""
from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path, PurePosixPath
from typing import Annotated
from urllib.parse import urlsplit

import grpc
from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from delf_common.manifest import ManifestError, read_manifest
from delf_common.proto.delf.v1 import delf_pb2
from delf_web import convert, inputs
from delf_web.context import Ctx, context
from delf_web.errors import ApiError, bad_request, from_rpc_error

router = APIRouter(prefix="/api/v1", tags=["jobs"])
MAX_PAGE = 200
# Each event stream holds a worker thread while it waits for the job's next change: at
# most this many at once (429 beyond: poll GET /jobs/{id}), each at most an hour long.
MAX_EVENT_STREAMS = 16
EVENT_STREAM_S = 3600.0
_streams = {"open": 0}
_streams_lock = threading.Lock()


def _photo_items(photos: list[UploadFile], metadata: dict[str, str], max_bytes: int) -> list[delf_pb2.IngestItem]:
    items = []
    for upload in photos:
        name = PurePosixPath(upload.filename or "").name
        image_id = inputs.image_id(PurePosixPath(name).stem or name)
        items.append(delf_pb2.IngestItem(image_id=image_id, metadata={"path": name, **metadata},
                                         image=inputs.photo(upload.file.read(), max_bytes)))
    return items


def _manifest_items(manifest: UploadFile) -> list[delf_pb2.IngestItem]:
    """A CSV or JSONL manifest's entries, as locations: URLs, or paths the server reads
    under DELF_INGEST_ROOTS (as `delf ingest MANIFEST --server-paths`)."""
    name = PurePosixPath(manifest.filename or "manifest").name
    suffix = PurePosixPath(name).suffix.lower()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"manifest{suffix}"
        path.write_bytes(manifest.file.read())
        try:
            entries = read_manifest(path, check_files=False)
        except ManifestError as exc:
            raise bad_request(str(exc).replace(str(path), name)) from None
    return [delf_pb2.IngestItem(image_id=e.image_id, metadata=e.metadata, location=e.location) for e in entries]


def _url_items(text: str, metadata: dict[str, str]) -> list[delf_pb2.IngestItem]:
    """One item per line: `URL` (its id: the file name without extension) or `ID URL`."""
    items = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise bad_request(f"a urls line is `URL` or `ID URL`, not {line[:80]!r}")
        url = parts[-1]
        image_id = parts[0] if len(parts) == 2 else PurePosixPath(urlsplit(url).path).stem
        items.append(delf_pb2.IngestItem(image_id=inputs.image_id(image_id), metadata={"url": url, **metadata},
                                         location=url))
    return items


@router.post("/jobs", summary="Start an ingest job: uploaded photos, a manifest, URLs (any mix)")
def start_job(ctx: Annotated[Ctx, Depends(context)],
              photos: Annotated[list[UploadFile], File(description="photos; id: the file name without extension")] = [],  # noqa: B006 - FastAPI copies a default, never shares it
              manifest: Annotated[UploadFile | None, File(description="a CSV or JSONL manifest (URLs, server paths)")] = None,
              urls: Annotated[str, Form(description="one per line: URL, or ID URL")] = "",
              metadata: Annotated[str, Form(description="a JSON object of strings added to every photo")] = "") -> dict:
    extra = inputs.metadata(metadata)
    items = _photo_items(photos, extra, ctx.settings.max_image_bytes) + _url_items(urls, extra)
    if manifest is not None:
        items += _manifest_items(manifest)
    if not items:
        raise bad_request("the job has no photos: send photos, a manifest or urls")
    seen: set[str] = set()
    for item in items:
        if item.image_id in seen:
            raise bad_request(f"id {item.image_id!r} appears twice in the job")
        seen.add(item.image_id)
    return convert.job(ctx.gateway.stream_in("StartIngestJob", items, ctx.metadata))


@router.get("/jobs", summary="List jobs, newest first, a page at a time")
def list_jobs(ctx: Annotated[Ctx, Depends(context)],
              page_size: Annotated[int | None, Query(description=f"1-{MAX_PAGE}; default 20")] = None,
              page_token: Annotated[str, Query(description="the previous page's next_page_token")] = "") -> dict:
    request = delf_pb2.ListJobsRequest(page_size=inputs.page_size(page_size, MAX_PAGE), page_token=page_token)
    reply = ctx.call("ListJobs", request)
    return {"jobs": [convert.job(j) for j in reply.jobs], "next_page_token": reply.next_page_token}


def _job_call(ctx: Ctx, method: str, job_id: str) -> dict:
    return convert.job(ctx.call(method, delf_pb2.GetJobRequest(job_id=inputs.job_id(job_id))))


@router.get("/jobs/{job_id}", summary="A job's state, progress and per-photo errors")
def get_job(job_id: str, ctx: Annotated[Ctx, Depends(context)]) -> dict:
    return _job_call(ctx, "GetJob", job_id)


@router.post("/jobs/{job_id}/cancel", summary="Stop a job (indexed photos stay)")
def cancel_job(job_id: str, ctx: Annotated[Ctx, Depends(context)]) -> dict:
    return _job_call(ctx, "CancelJob", job_id)


@router.post("/jobs/{job_id}/resume", summary="Resume an interrupted job")
def resume_job(job_id: str, ctx: Annotated[Ctx, Depends(context)]) -> dict:
    return _job_call(ctx, "ResumeJob", job_id)


def _events(ctx: Ctx, job_id: str):
    with _streams_lock:
        _streams["open"] += 1
    call = ctx.gateway.stream_out("WatchJob", delf_pb2.GetJobRequest(job_id=job_id), ctx.metadata,
                                  timeout=EVENT_STREAM_S)
    try:
        for job in call:
            yield f"event: job\ndata: {json.dumps(convert.job(job))}\n\n"
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            error = from_rpc_error(exc)
            yield f"event: error\ndata: {json.dumps({'code': error.code, 'message': error.message})}\n\n"
    finally:
        call.cancel()
        with _streams_lock:
            _streams["open"] -= 1
    yield "event: end\ndata: {}\n\n"


@router.get("/jobs/{job_id}/events", summary="Server-sent events: the job after each change, until it ends",
            response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
def job_events(job_id: str, ctx: Annotated[Ctx, Depends(context)]) -> StreamingResponse:
    _job_call(ctx, "GetJob", job_id)  # an unknown or malformed id: 404 / 400 before the stream
    if _streams["open"] >= MAX_EVENT_STREAMS:
        raise ApiError("RESOURCE_EXHAUSTED", f"{MAX_EVENT_STREAMS} event streams are open already: "
                                             f"poll GET /api/v1/jobs/{job_id} instead")
    return StreamingResponse(_events(ctx, job_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
