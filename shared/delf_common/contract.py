"""The internal contract between the gateway and the workers, in one place.

What every service agrees on, and nothing else: the Celery task names and the queue
each is routed to; the reply envelope every task answers with (``ok`` / ``error``, read
back by ``failure``); the error codes (gRPC status names); the rules for image ids,
metadata, metadata filters and job ids, each one limit with one checking function that
the gateway (before any work) and the indexer (before Milvus) both call. The typed
messages that travel inside the envelope (candidates, the verify query, verified
matches) are in ``delf_common.messages``, beside ``DelfFeatures``. docs/CONTRACTS.md
describes the whole contract; a rolling upgrade mixes versions, so the wire never
changes shape silently.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Mapping

# --------------------------------------------------------------------------- task names

EXTRACT = "delf.extract"                  # (image: bytes|None, options: dict) -> features wire
INGEST_EXTRACT = "delf.ingest.extract"    # (item: dict, job_id) -> dict for INGEST_INDEX
INDEX_ADD = "delf.index.add"              # (image_id, features wire, metadata) -> image info
INGEST_INDEX = "delf.ingest.index"        # (extract result, job_id) -> None (records job progress)
INDEX_SEARCH = "delf.index.search"        # (features wire, options) -> candidates
INDEX_GET = "delf.index.get"              # (image_id) -> image info | error
INDEX_FEATURES = "delf.index.features"    # (image_id) -> features wire | error
INDEX_DELETE = "delf.index.delete"        # (image_id) -> {"descriptors_removed"} | error
INDEX_STATS = "delf.index.stats"          # () -> {"images", "descriptors", "pca_id"}
INDEX_LIST = "delf.index.list"            # (options: {after, limit, filter}) -> {"images", "more"}
INDEX_KNOWN = "delf.index.known"          # ([{image_id, sha256, metadata}]) -> {"known": {id: {...}}}
VERIFY = "delf.verify"                    # (query, candidates, options) -> verified matches

SERVICES = ("extract", "index", "verify")

# The service (queue) each task is routed to.
ROUTES = {
    EXTRACT: "extract",
    INGEST_EXTRACT: "extract",
    INDEX_ADD: "index",
    INGEST_INDEX: "index",
    INDEX_SEARCH: "index",
    INDEX_GET: "index",
    INDEX_FEATURES: "index",
    INDEX_DELETE: "index",
    INDEX_STATS: "index",
    INDEX_LIST: "index",
    INDEX_KNOWN: "index",
    VERIFY: "verify",
}


def queue_name(service: str, prefix: str) -> str:
    """The Redis list a service's workers consume, e.g. ``delf.extract``; `prefix` is the
    deployment's DELF_QUEUE_PREFIX, read once with the settings of whoever asks (the app:
    ``celery_app.queue_prefix``, the gateway's ``GatewaySettings.queue_prefix``)."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; expected one of {SERVICES}")
    return f"{prefix}.{service}"


def queue_for_task(task_name: str, prefix: str) -> str:
    return queue_name(ROUTES[task_name], prefix)


# --------------------------------------------------------------------------- error codes

# gRPC status names: a task's error code is the status the gateway answers with.
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
PERMISSION_DENIED = "PERMISSION_DENIED"
UNAVAILABLE = "UNAVAILABLE"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
CANCELLED = "CANCELLED"
INTERNAL = "INTERNAL"


# --------------------------------------------------------------------------- the envelope


def ok(**payload) -> dict:
    """A task's answer: ``{"ok": True, **payload}`` (keys in the order given)."""
    return {"ok": True, **payload}


def error(code: str, message: str, **extra) -> dict:
    """An expected failure (bad photo, unknown id): ``{"ok": False, **extra, "error": {"code",
    "message"}}``; ``extra`` keeps what the next step needs (an ingest item's ``image_id``)."""
    return {"ok": False, **extra, "error": {"code": code, "message": message}}


@dataclasses.dataclass(frozen=True)
class Failure:
    """The error of a reply that is not ok."""

    code: str
    message: str


def failure(reply, default_code: str = INTERNAL, default_message: str = "the task failed") -> Failure | None:
    """None when `reply` is ok; else its error, the defaults filling what it lacks."""
    if isinstance(reply, dict) and reply.get("ok"):
        return None
    err = reply.get("error") if isinstance(reply, dict) else None
    err = err if isinstance(err, dict) else {}
    return Failure(str(err.get("code") or default_code), str(err.get("message") or default_message))


# --------------------------------------------------------------------------- input rules


class ContractError(ValueError):
    """Input that breaks a rule below; `code` is the status to answer with."""

    code = INVALID_ARGUMENT


# Image ids: the images collection's primary key is a VARCHAR whose max_length Milvus
# counts in bytes, so the one limit is in UTF-8 bytes (a CJK character takes 3).
MAX_ID_BYTES = 512


def check_id_fits(image_id) -> str:
    """The id, or ContractError: a non-empty string of at most MAX_ID_BYTES UTF-8 bytes,
    what the index can store (the store's own check; its quoting handles any character)."""
    if not isinstance(image_id, str):
        raise ContractError(f"image_id must be a string, got {type(image_id).__name__}")
    if not image_id:
        raise ContractError("image_id is empty")
    size = len(image_id.encode("utf-8", errors="surrogatepass"))
    if size > MAX_ID_BYTES:
        raise ContractError(f"image_id is {size} bytes in UTF-8 ({len(image_id)} characters); the limit is "
                            f"{MAX_ID_BYTES} bytes of UTF-8 (the index's id field counts bytes)")
    return image_id


def check_image_id(image_id) -> str:
    """The rule for every id a request names (the gateway, the indexer's tasks): it fits
    the index (``check_id_fits``) and holds no control characters. ContractError if not."""
    check_id_fits(image_id)
    if _has_control(image_id):
        raise ContractError("image_id contains control characters")
    return image_id


# Metadata: at most 16 KiB of keys and values (UTF-8), and its JSON text (as the indexer
# stores it, escaped) within the images collection's VARCHAR.
METADATA_MAX_BYTES = 16 * 1024
METADATA_MAX_JSON_BYTES = 65535


def metadata_text(metadata: Mapping | None) -> tuple[dict[str, str], str]:
    """(the metadata as stored: string keys and values, its JSON text), or ContractError."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise ContractError(f"metadata must be a map of strings, got {type(metadata).__name__}")
    meta = {str(k): str(v) for k, v in metadata.items()}
    size = sum(len(k.encode("utf-8", errors="surrogatepass")) + len(v.encode("utf-8", errors="surrogatepass"))
               for k, v in meta.items())
    if size > METADATA_MAX_BYTES:
        raise ContractError(f"metadata is {size} bytes; the limit is {METADATA_MAX_BYTES} "
                            f"(UTF-8 bytes of its keys and values)")
    text = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    stored = len(text.encode("utf-8", errors="surrogatepass"))
    if stored > METADATA_MAX_JSON_BYTES:
        raise ContractError(f"metadata is {stored} bytes as JSON (control characters are escaped); "
                            f"the limit is {METADATA_MAX_JSON_BYTES}")
    return meta, text


def check_metadata(metadata: Mapping | None) -> dict[str, str]:
    """The metadata as stored (string keys and values), or ContractError."""
    return metadata_text(metadata)[0]


# Metadata filters: {key: value}, every pair must equal the photo's (exact strings).
FILTER_KEY = re.compile(r"^[\w.:/-]{1,128}$")  # the same JSON path on every Milvus version
FILTER_MAX_PAIRS = 16
FILTER_MAX_VALUE_BYTES = 1024


def check_filter(filter: Mapping | None) -> dict[str, str]:
    """The filter as the indexer applies it, or ContractError: keys 1-128 word characters
    or ``. : / -``; values any text without control characters, at most 1024 UTF-8 bytes;
    at most 16 pairs. None or empty: no filter."""
    if filter is None:
        return {}
    if not isinstance(filter, Mapping):
        raise ContractError(f"a filter is a map of metadata keys to values, got {type(filter).__name__}")
    if len(filter) > FILTER_MAX_PAIRS:
        raise ContractError(f"the filter has {len(filter)} pairs; the limit is {FILTER_MAX_PAIRS}")
    out = {}
    for key, value in filter.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ContractError("filter keys and values must be strings")
        if not FILTER_KEY.match(key):
            raise ContractError(f"filter key {key[:40]!r} must be 1-128 letters, digits or _ . : / - "
                                f"(no spaces or quotes)")
        size = len(value.encode("utf-8", errors="surrogatepass"))
        if size > FILTER_MAX_VALUE_BYTES:
            raise ContractError(f"the filter value of {key!r} is {size} bytes; the limit is {FILTER_MAX_VALUE_BYTES}")
        if _has_control(value):
            raise ContractError(f"the filter value of {key!r} contains control characters")
        out[key] = value
    return out


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


# --------------------------------------------------------------------------- job ids

# A job id is what `new_job_id` makes (uuid4, 32 lowercase hexadecimal digits); it is
# part of Redis keys (<prefix>:job:<id>, ...:done, ...:items), so nothing else may reach them.
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(job_id) -> bool:
    return isinstance(job_id, str) and JOB_ID.fullmatch(job_id) is not None


# A RECEIVING job whose last item arrived this recently may still have a live stream: it
# is not resumed (the gateway's ResumeJob refuses, `delf resume` calls it moving).
RESUME_STREAM_IDLE_S = 30.0


def check_job_id(job_id) -> str:
    """The id, or ContractError naming the format."""
    if not is_job_id(job_id):
        shown = repr(job_id[:80]) if isinstance(job_id, str) else type(job_id).__name__
        raise ContractError(f"job id {shown} is malformed: a job id is the 32 hexadecimal digits "
                            f"(0-9, a-f) that StartIngestJob answered")
    return job_id


# --------------------------------------------------------------------------- listings

# ListImages (id order) and ListJobs (newest first) answer pages keyed by id: page_token is
# the last id of the previous page. page_size 0 means the default.
IMAGES_PAGE_DEFAULT = 100
IMAGES_PAGE_MAX = 1000
JOBS_PAGE_DEFAULT = 20
JOBS_PAGE_MAX = 200


def check_page_size(page_size, default: int, maximum: int, what: str) -> int:
    """The page size to use (`default` for 0), or ContractError above `maximum`."""
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 0:
        raise ContractError(f"page_size must be a whole number from 0 to {maximum}, got {page_size!r}")
    if page_size > maximum:
        raise ContractError(f"page_size {page_size} is too large: at most {maximum} {what} a page "
                            f"(0 means {default})")
    return page_size or default


def check_image_page_token(token) -> str:
    """An images page token: empty (the first page) or an image id (the last of the previous page)."""
    if token == "":
        return token
    try:
        return check_image_id(token)
    except ContractError as exc:
        raise ContractError(f"page_token is not an image id ({exc}): pass the next_page_token of the "
                            f"previous page, or nothing for the first page") from None


def check_job_page_token(token) -> str:
    """A jobs page token: empty (the first page) or a job id (the last of the previous page)."""
    if token == "" or is_job_id(token):
        return token
    shown = repr(token[:80]) if isinstance(token, str) else type(token).__name__
    raise ContractError(f"page_token {shown} is not a job id: pass the next_page_token of the previous "
                        f"page, or nothing for the first page")
