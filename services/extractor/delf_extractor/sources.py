"""Where an ingest item's bytes come from, and the rules that keep reading them safe.

An item carries its image bytes, a local ``location`` (which must resolve inside one of
DELF_INGEST_ROOTS: no ``..``, no symlinks out of the root, no file over
DELF_MAX_IMAGE_BYTES), or an http(s) URL (delf_common.fetch's rules). Every refusal is an
`ImageRejected` with a contract error code, so a bad item fails only itself.
"""
from __future__ import annotations

import errno
import os

from delf_common import fetch
from delf_common.contract import INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED
from delf_common.images import ImageRejected
from delf_extractor.settings import ExtractorSettings


def _refuse(code: str, message: str) -> ImageRejected:
    return ImageRejected(code, message)


def resolve_location(location: str, roots: tuple[str, ...]) -> str:
    """The real path of an ingest ``location``, which must lie inside one of ``roots`` (DELF_INGEST_ROOTS).

    A relative location is looked up under each root in turn. Refused: ``..``
    components, URLs, paths outside every root, and symlinks that lead out of the
    root (checked on the fully resolved path).
    """
    if not roots:
        raise _refuse(INVALID_ARGUMENT, "photo locations are not accepted here: DELF_INGEST_ROOTS is empty; "
                                        "send the image bytes instead")
    if not isinstance(location, str) or not location or "\x00" in location:
        raise _refuse(INVALID_ARGUMENT, f"invalid location {location!r}")
    if "://" in location:
        raise _refuse(INVALID_ARGUMENT, f"location {location!r}: only local file paths are accepted")
    if ".." in location.replace("\\", "/").split("/"):
        raise _refuse(INVALID_ARGUMENT, f"location {location!r}: '..' is not allowed")
    real_roots = [os.path.realpath(r) for r in roots]

    def inside(path: str) -> bool:
        return any(os.path.commonpath([root, path]) == root for root in real_roots)

    candidates = [location] if os.path.isabs(location) else [os.path.join(r, location) for r in real_roots]
    for cand in candidates:
        real = os.path.realpath(cand)
        if not inside(real):
            if inside(os.path.abspath(cand)):
                raise _refuse(INVALID_ARGUMENT, f"location {location!r} leads outside the ingest roots "
                                                f"through a symbolic link")
            raise _refuse(INVALID_ARGUMENT, f"location {location!r} is outside the ingest roots "
                                            f"(DELF_INGEST_ROOTS)")
        if os.path.exists(real):
            if not os.path.isfile(real):
                raise _refuse(INVALID_ARGUMENT, f"location {location!r} is not a regular file")
            return real
    raise _refuse(NOT_FOUND, f"location {location!r} not found under the ingest roots")


def read_location(location: str, roots: tuple[str, ...], max_bytes: int) -> bytes:
    """The bytes of an ingest location under ``roots``, refusing files over ``max_bytes``
    (DELF_MAX_IMAGE_BYTES) without reading them."""
    path = resolve_location(location, roots)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise _refuse(NOT_FOUND, f"location {location!r} not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a symlink after the check
            raise _refuse(INVALID_ARGUMENT, f"location {location!r} is a symbolic link") from None
        raise _refuse(INVALID_ARGUMENT, f"location {location!r} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise _refuse(RESOURCE_EXHAUSTED, f"location {location!r} is {size:,} bytes; the limit is "
                                              f"{max_bytes:,} bytes (DELF_MAX_IMAGE_BYTES)")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we read it
        raise _refuse(RESOURCE_EXHAUSTED, f"location {location!r} is over the limit of {max_bytes:,} bytes "
                                          f"(DELF_MAX_IMAGE_BYTES)")
    return data


def read_url(url: str, policy: fetch.FetchPolicy) -> bytes:
    """The bytes of an http(s) URL item, under delf_common.fetch's rules and the settings'
    `policy` (DELF_URL_INGEST, DELF_URL_ALLOWED_HOSTS, no private addresses,
    DELF_MAX_IMAGE_BYTES, DELF_URL_TIMEOUT_S). Raises FetchError: ``transient`` ones are
    retried by the task."""
    return fetch.fetch_url(url, policy)


def item_bytes(item: dict, settings: ExtractorSettings) -> bytes:
    """The bytes of one ingest item: its image bytes, its location's (under the settings'
    ingest roots and byte limit) or its URL's (exactly one)."""
    image, location = item.get("image"), item.get("location")
    if image and location:
        raise _refuse(INVALID_ARGUMENT, "give either the image bytes or a location, not both")
    if location:
        if isinstance(location, str) and fetch.is_url(location):
            return read_url(location, settings.fetch_policy)
        return read_location(location, settings.ingest_roots, settings.image_limits.max_bytes)
    if image is None:
        raise _refuse(INVALID_ARGUMENT, "the item has neither image bytes nor a location")
    if not isinstance(image, (bytes, bytearray)):
        raise _refuse(INVALID_ARGUMENT, f"image must be bytes, got {type(image).__name__}")
    return bytes(image)
