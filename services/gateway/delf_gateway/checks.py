"""Request checks: what the gateway verifies before any task is sent.

Each check either returns the cleaned value or raises RequestError, which the error
interceptor (delf_gateway.interceptors) turns into a gRPC status with a message a
person can act on (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...).
"""
from __future__ import annotations

import grpc
import numpy as np

from delf_common import contract, fetch
from delf_common.images import ImageLimits, ImageRejected, probe_image

# The limits are the contract's (the indexer applies the same functions).
MAX_ID_LENGTH = contract.MAX_ID_BYTES  # UTF-8 bytes
MAX_METADATA_BYTES = contract.METADATA_MAX_BYTES


class RequestError(Exception):
    """Ends a call with a gRPC status; raised anywhere below a handler."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def status_code(name: str) -> grpc.StatusCode:
    """The gRPC status code named `name` (a worker's error code), INTERNAL when unknown."""
    return getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL)


def _checked(rule, value):
    """`rule(value)` (a delf_common.contract check), its ContractError as a RequestError."""
    try:
        return rule(value)
    except contract.ContractError as exc:
        raise RequestError(status_code(exc.code), str(exc)) from None


def check_image_id(image_id: str) -> str:
    """At most 512 UTF-8 bytes (contract.check_image_id), refused before any work."""
    return _checked(contract.check_image_id, image_id)


def check_metadata(metadata) -> dict[str, str]:
    return _checked(contract.check_metadata, dict(metadata))


def check_job_id(job_id: str) -> str:
    """The format `delf_common.jobs` makes (contract.check_job_id): nothing else reaches Redis."""
    return _checked(contract.check_job_id, job_id)


def check_location(location: str, policy: fetch.FetchPolicy) -> None:
    """URL locations: the checks that need no network (URL ingest on, http/https, host
    allowed, no literal private address; the gateway settings' `policy`); the extractor
    resolves and checks again before it connects. Paths are checked by the extractor
    (DELF_INGEST_ROOTS)."""
    if not location:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the location is empty")
    if fetch.is_url(location):
        try:
            fetch.check_url(location, policy)
        except fetch.FetchError as exc:
            raise RequestError(status_code(exc.code), exc.message) from None


def check_photo(data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """Header-level checks (bytes, pixels, format: the gateway settings' `limits`); the
    extractor decodes fully.
    Returns the photo's displayed (width, height): EXIF orientation applied, the frame the
    extractor's features, a search `box` and the region corners all use."""
    try:
        width, height, _ = probe_image(data, limits)
    except ImageRejected as exc:
        raise RequestError(status_code(exc.code), exc.message) from None
    return width, height


def check_filter(pairs) -> dict[str, str]:
    """The metadata filter: every key/value pair must equal the image's (exact strings).
    The indexer applies the same function (contract.check_filter)."""
    return _checked(contract.check_filter, dict(pairs))


def check_box(box, width: int, height: int) -> tuple[float, float, float, float]:
    """The query box clipped to the image (its displayed frame, `check_photo`); it must
    keep some area inside it."""
    values = (box.x0, box.y0, box.x1, box.y1)
    if not all(np.isfinite(values)):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the box has a non-finite coordinate")
    x0, y0 = max(box.x0, 0.0), max(box.y0, 0.0)
    x1, y1 = min(box.x1, float(width)), min(box.y1, float(height))
    if x1 <= x0 or y1 <= y0:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the box ({box.x0:g},{box.y0:g})-({box.x1:g},{box.y1:g}) does not overlap the "
            f"{width}x{height} image (x0 < x1 and y0 < y1 are required)",
        )
    return x0, y0, x1, y1
