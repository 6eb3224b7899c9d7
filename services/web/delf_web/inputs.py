"""Reading the HTTP API's inputs: search options, boxes, filters, metadata, photos.

The limits themselves (ids, metadata, filters) are the contract's (delf_common.contract),
checked here so that bad input is answered 400 with the contract's message before any
call; what only the gateway knows (the photo's content) it checks and answers for.
"""
from __future__ import annotations

import json
import math

from delf_common import contract
from delf_common.images import ImageRejected, check_size
from delf_common.proto.delf.v1 import delf_pb2
from delf_web.errors import ApiError, bad_request

MAX_TOP_K = 100


def top_k(value: int | None) -> int:
    if value is None:
        return 10
    if not 1 <= value <= MAX_TOP_K:
        raise bad_request(f"top_k must be between 1 and {MAX_TOP_K}, not {value}")
    return value


def box(value) -> delf_pb2.Box | None:
    """A Box from "x0,y0,x1,y1" (form, query) or a list of four numbers (JSON); None when empty."""
    if value is None or value == "" or value == []:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, list) or len(parts) != 4:
        raise bad_request("box must be four numbers x0,y0,x1,y1 (pixels of the query photo)")
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise bad_request("box must be four numbers x0,y0,x1,y1 (pixels of the query photo)") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise bad_request("box coordinates must be finite numbers")
    if x1 <= x0 or y1 <= y0:
        raise bad_request("box must have x1 > x0 and y1 > y0")
    return delf_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1)


def pairs(items: list[str] | None) -> dict[str, str]:
    """{key: value} from repeated "key=value" strings (query strings, form fields)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise bad_request(f"a filter is key=value, not {item[:60]!r}")
        out[key] = value
    return out


def search_filter(value) -> dict[str, str]:
    """A filter (repeated key=value strings, or a JSON object) as the contract allows it."""
    if isinstance(value, list):
        value = pairs(value)
    try:
        return contract.check_filter(value)
    except contract.ContractError as exc:
        raise bad_request(str(exc)) from None


def metadata(text: str | None) -> dict[str, str]:
    """Metadata from a JSON object of strings (form field), as the contract allows it."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise bad_request(f"metadata must be a JSON object of strings: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise bad_request("metadata must be a JSON object whose values are strings")
    try:
        return contract.check_metadata(value)
    except contract.ContractError as exc:
        raise bad_request(str(exc)) from None


def image_id(value: str | None) -> str:
    try:
        return contract.check_image_id(value)
    except contract.ContractError as exc:
        raise bad_request(str(exc)) from None


def job_id(value: str) -> str:
    try:
        return contract.check_job_id(value)
    except contract.ContractError as exc:
        raise bad_request(str(exc)) from None


def photo(data: bytes | None, max_bytes: int) -> bytes:
    """The bytes of an uploaded photo: not empty and within `max_bytes` (the settings'
    DELF_MAX_IMAGE_BYTES; else 413), with the gateway's messages
    (delf_common.images.check_size); the gateway checks the rest."""
    try:
        check_size(data or b"", max_bytes)
    except ImageRejected as exc:
        raise ApiError(exc.code, exc.message, status=413 if exc.code == "RESOURCE_EXHAUSTED" else None) from None
    return data


def page_size(value: int | None, limit: int) -> int:
    if value is None:
        return 0
    if not 1 <= value <= limit:
        raise bad_request(f"page_size must be between 1 and {limit}, not {value}")
    return value
