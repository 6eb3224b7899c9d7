"""A small Python client for the DELF gateway.

    from delf_common.client import DelfClient
    client = DelfClient("127.0.0.1:50051")
    for match in client.search("query.jpg").matches: print(match.image_id, match.inliers)

Methods return the protobuf messages of `delf.v1` (see protos/delf/v1/delf.proto);
errors raise `grpc.RpcError` with the server's status code and message.

The gateway's address (`target`, default `DELF_GATEWAY`) may be `host`, `host:port` or a
URL such as `http://host:port`; the port defaults to 50051 (`delf_common.addresses`).

Security: `token` (default `DELF_TOKEN`) is sent on every call as the metadata
`authorization: Bearer <token>`; `tls_ca` (default `DELF_TLS_CA`), a PEM file of the
CA or self-signed certificate to trust, makes the client connect with TLS.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import grpc

from delf_common import config
from delf_common.addresses import gateway_target
from delf_common.proto.delf.v1 import delf_pb2, delf_pb2_grpc

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
ImageLike = bytes | str | os.PathLike


def _image_bytes(image: ImageLike) -> bytes:
    if isinstance(image, bytes):
        return image
    return Path(image).read_bytes()


def photos_in(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """(image_id, path) for every photo below `folder`, sorted.

    The id is the path relative to the folder without its extension: the file name
    alone for photos directly in the folder (`a/b.jpg` -> `a/b`).
    """
    root = Path(folder)
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in PHOTO_SUFFIXES:
            found.append((path.relative_to(root).with_suffix("").as_posix(), path))
    return found


def open_channel(target: str, tls_ca: str | None = None, options: Sequence[tuple] = (),
                 env: str = "DELF_TLS_CA") -> grpc.Channel:
    """A TLS channel trusting the PEM file `tls_ca` when given, else a plaintext one."""
    if tls_ca:
        roots = config.read_pem(env, tls_ca)
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots),
                                   options=list(options))
    return grpc.insecure_channel(target, options=list(options))


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (on plaintext and TLS channels alike)."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, d):
        metadata = [m for m in (d.metadata or ()) if m[0] != "authorization"] + [self.header]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class DelfClient:
    def __init__(self, target: str | None = None, timeout: float | None = 300.0,
                 channel: grpc.Channel | None = None, *, token: str | None = None,
                 tls_ca: str | None = None):
        # "host", "host:port", "http://host:port": one reading everywhere, port 50051 by default
        self.target = gateway_target(target or config.get("DELF_GATEWAY"))
        self.token = token if token is not None else config.get("DELF_TOKEN")
        self.tls_ca = tls_ca if tls_ca is not None else config.get("DELF_TLS_CA")
        max_message = config.get("DELF_MAX_MESSAGE_BYTES")
        self.channel = channel or open_channel(
            self.target, self.tls_ca,
            options=[("grpc.max_send_message_length", max_message),
                     ("grpc.max_receive_message_length", max_message)],
        )
        calls = grpc.intercept_channel(self.channel, BearerToken(self.token)) if self.token else self.channel
        self.stub = delf_pb2_grpc.ImageSearchStub(calls)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "DelfClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    # -- search and images ----------------------------------------------------

    def search(self, image: ImageLike | None = None, *, image_id: str | None = None, top_k: int = 10,
               box: tuple[float, float, float, float] | None = None,
               filter: Mapping[str, str] | None = None, correspondences: bool = False,
               timeout: float | None = None) -> delf_pb2.SearchResponse:
        """Photos showing what the query shows. ``filter``: only photos whose metadata
        has every key/value pair (exact strings). ``correspondences``: each match also
        carries its correspondences (``match.correspondences``: query point, indexed
        point, RANSAC inlier or not), the evidence to draw (`delf search --show`)."""
        if top_k < 0:
            raise ValueError(f"top_k must be at least 1 (0: the server's default), not {top_k}")
        request = delf_pb2.SearchRequest(top_k=top_k, filter=dict(filter or {}), correspondences=correspondences)
        if image is not None:
            request.image = _image_bytes(image)
        elif image_id is not None:
            request.image_id = image_id
        else:
            raise ValueError("give a photo (bytes or path) or an image_id")
        if box is not None:
            x0, y0, x1, y1 = box
            request.box.CopyFrom(delf_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1))
        return self.stub.Search(request, timeout=timeout or self.timeout)

    def add_image(self, image_id: str, image: ImageLike, metadata: Mapping[str, str] | None = None,
                  timeout: float | None = None) -> delf_pb2.ImageInfo:
        request = delf_pb2.AddImageRequest(image_id=image_id, image=_image_bytes(image), metadata=metadata or {})
        return self.stub.AddImage(request, timeout=timeout or self.timeout)

    def get_image(self, image_id: str, thumbnail: bool = False) -> delf_pb2.ImageInfo:
        """What the index holds for an id; ``thumbnail``: also its stored thumbnail
        (``info.thumbnail``, JPEG bytes; empty when it has none)."""
        request = delf_pb2.GetImageRequest(image_id=image_id, thumbnail=thumbnail)
        return self.stub.GetImage(request, timeout=self.timeout)

    def delete_image(self, image_id: str) -> delf_pb2.DeleteImageResponse:
        return self.stub.DeleteImage(delf_pb2.DeleteImageRequest(image_id=image_id), timeout=self.timeout)

    def stats(self) -> delf_pb2.GetStatsResponse:
        return self.stub.GetStats(delf_pb2.GetStatsRequest(), timeout=self.timeout)

    def list_images(self, page_size: int = 0, page_token: str = "",
                    filter: Mapping[str, str] | None = None) -> delf_pb2.ListImagesResponse:
        """One page of the indexed images in id order (``page_size`` 0: 100, at most 1000),
        after ``page_token`` (the previous page's ``next_page_token``; "" for the first);
        ``filter``: only photos whose metadata has every pair. Without thumbnails."""
        request = delf_pb2.ListImagesRequest(page_size=page_size, page_token=page_token, filter=dict(filter or {}))
        return self.stub.ListImages(request, timeout=self.timeout)

    def iter_images(self, page_size: int = 0, filter: Mapping[str, str] | None = None,
                    after: str = "") -> Iterator[delf_pb2.ImageInfo]:
        """Every indexed image (matching ``filter``) after the id ``after``, in id order,
        a page at a time."""
        token = after
        while True:
            page = self.list_images(page_size, token, filter)
            yield from page.images
            if not page.next_page_token:
                return
            token = page.next_page_token

    def list_jobs(self, page_size: int = 0, page_token: str = "") -> delf_pb2.ListJobsResponse:
        """One page of the jobs the gateway's Redis keeps, newest first (``page_size`` 0: 20,
        at most 200), after ``page_token`` (the previous page's ``next_page_token``).
        Without per-item errors (``get_job`` has them)."""
        request = delf_pb2.ListJobsRequest(page_size=page_size, page_token=page_token)
        return self.stub.ListJobs(request, timeout=self.timeout)

    # -- bulk ingestion -------------------------------------------------------

    def start_ingest_job(self, items: Iterable[delf_pb2.IngestItem], resume_job: str | None = None,
                         on_job=None) -> delf_pb2.Job:
        """Streams the items to the gateway; returns once the stream is sent.

        `resume_job`: the items continue that interrupted job (call metadata
        `delf-resume-job`): the ones it already finished are skipped by the server, the
        rest are processed, and its unfinished location items are re-sent.
        `on_job(job_id)` is called as soon as the server names the job, before the
        stream is sent (so an interrupted stream can still be resumed)."""
        metadata = [("delf-resume-job", resume_job)] if resume_job else None
        call = self.stub.StartIngestJob.future(iter(items), timeout=None, metadata=metadata)
        try:
            if on_job is not None:  # the server names the job before it reads the stream
                job_id = dict(call.initial_metadata() or ()).get("delf-job-id")
                if job_id:
                    on_job(job_id)
            return call.result()
        except BaseException:  # Ctrl-C: end the stream (the job stays resumable)
            call.cancel()
            raise

    def ingest_folder(self, folder: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                      on_sent=None, resume_job: str | None = None, on_job=None) -> delf_pb2.Job:
        """One job with every photo below `folder` (ids as in `photos_in`)."""
        photos = photos_in(folder)

        def items() -> Iterator[delf_pb2.IngestItem]:
            for n, (image_id, path) in enumerate(photos, 1):
                meta = {"path": str(path.relative_to(folder)), **(metadata or {})}
                yield delf_pb2.IngestItem(image_id=image_id, metadata=meta, image=path.read_bytes())
                if on_sent:
                    on_sent(n, len(photos))

        return self.start_ingest_job(items(), resume_job=resume_job, on_job=on_job)

    def ingest_manifest(self, manifest: str | os.PathLike, server_paths: bool = False, on_sent=None,
                        resume_job: str | None = None, on_job=None) -> delf_pb2.Job:
        """One job with the photos a CSV or JSONL manifest lists (see delf_common.manifest).

        Local files are read here and sent as bytes (paths relative to the manifest's
        folder); http(s) URLs are sent as locations, fetched by the server's workers.
        `server_paths`: send file paths as locations too, as written, for the server to
        read under its DELF_INGEST_ROOTS. Raises ManifestError before sending anything."""
        from delf_common.manifest import read_manifest

        entries = read_manifest(manifest, check_files=not server_paths)

        def items() -> Iterator[delf_pb2.IngestItem]:
            for n, e in enumerate(entries, 1):
                if e.url or server_paths:
                    yield delf_pb2.IngestItem(image_id=e.image_id, metadata=e.metadata, location=e.location)
                else:
                    yield delf_pb2.IngestItem(image_id=e.image_id, metadata=e.metadata, image=e.path.read_bytes())
                if on_sent:
                    on_sent(n, len(entries))

        return self.start_ingest_job(items(), resume_job=resume_job, on_job=on_job)

    def resume_job(self, job_id: str) -> delf_pb2.Job:
        """Re-sends a stalled or interrupted job's unfinished location items; `awaiting_upload`
        counts its unfinished bytes items, which only the client can send again
        (`ingest_folder`/`ingest_manifest` with `resume_job`)."""
        return self.stub.ResumeJob(delf_pb2.GetJobRequest(job_id=job_id), timeout=self.timeout)

    def get_job(self, job_id: str) -> delf_pb2.Job:
        return self.stub.GetJob(delf_pb2.GetJobRequest(job_id=job_id), timeout=self.timeout)

    def cancel_job(self, job_id: str) -> delf_pb2.Job:
        """Stops a job: photos not yet processed are skipped; indexed ones stay."""
        return self.stub.CancelJob(delf_pb2.GetJobRequest(job_id=job_id), timeout=self.timeout)

    def watch_job(self, job_id: str) -> Iterator[delf_pb2.Job]:
        """Progress updates until the job completes or is cancelled."""
        return self.stub.WatchJob(delf_pb2.GetJobRequest(job_id=job_id))

    def wait_job(self, job_id: str) -> delf_pb2.Job:
        last = self.get_job(job_id)
        for update in self.watch_job(job_id):
            last = update
        return last
