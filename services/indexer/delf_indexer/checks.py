"""The indexer's input rules: image ids, metadata and filters, and filter-expression quoting.

Everything a caller hands the store that ends up inside a Milvus expression or a
VARCHAR field is checked here first; ``quote`` makes a string a safe literal.
"""
from __future__ import annotations

import json
import re

MAX_ID_LENGTH = 512  # bytes (UTF-8): the VARCHAR length of image_id
METADATA_MAX_LENGTH = 65535  # bytes of the metadata as JSON text
FILTER_KEY = re.compile(r"^[\w.:/-]{1,128}$")  # metadata keys a filter may name
FILTER_MAX_PAIRS = 16
FILTER_MAX_VALUE_BYTES = 1024


def quote(value: str) -> str:
    """A string literal for a Milvus filter expression (double-quoted, escaped).

    Backslash and double quote are escaped, control characters become \\n, \\t or
    \\uXXXX; everything else (quotes ', unicode) is kept verbatim. Both the server
    (Go strconv.Unquote) and Milvus Lite parse these escapes, so an id can never
    close the literal and inject an expression.
    """
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return json.dumps(value, ensure_ascii=False)


def check_filter(filter: dict | None) -> dict[str, str]:
    """A metadata filter as the store takes it: {key: value}, every pair must match exactly.

    Keys: 1-128 word characters or ``. : / -`` (no quotes or spaces, so a key is the same
    JSON path on every Milvus version); values: any text without control characters, at
    most 1024 bytes (UTF-8); at most 16 pairs. ValueError says what is wrong.
    """
    if filter is None:
        return {}
    if not isinstance(filter, dict):
        raise ValueError(f"a filter is a map of metadata keys to values, got {type(filter).__name__}")
    if len(filter) > FILTER_MAX_PAIRS:
        raise ValueError(f"the filter has {len(filter)} pairs; the limit is {FILTER_MAX_PAIRS}")
    out = {}
    for key, value in filter.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError("filter keys and values must be strings")
        if not FILTER_KEY.match(key):
            raise ValueError(f"filter key {key[:40]!r} is not 1-128 letters, digits or _ . : / -")
        if len(value.encode("utf-8")) > FILTER_MAX_VALUE_BYTES:
            raise ValueError(f"the filter value of {key!r} is longer than {FILTER_MAX_VALUE_BYTES} bytes")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"the filter value of {key!r} contains control characters")
        out[key] = value
    return out


def metadata_matches(row: dict, filter: dict[str, str]) -> bool:
    """Whether an images row's metadata (JSON text) holds every pair of a checked filter."""
    meta = json.loads(row["metadata"]) if row.get("metadata") else {}
    return all(meta.get(k) == v for k, v in filter.items())


def check_image_id(image_id: str) -> None:
    if not isinstance(image_id, str) or not image_id:
        raise ValueError("image_id must be a non-empty string")
    if len(image_id.encode("utf-8")) > MAX_ID_LENGTH:
        raise ValueError(f"image_id is longer than {MAX_ID_LENGTH} bytes (UTF-8)")


def metadata_text(metadata: dict | None) -> tuple[dict[str, str], str]:
    """An image's metadata as the store keeps it: (string keys and values, its JSON text).
    ValueError when the JSON text is longer than METADATA_MAX_LENGTH bytes."""
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    text = json.dumps(metadata, ensure_ascii=False, sort_keys=True)
    if len(text.encode("utf-8")) > METADATA_MAX_LENGTH:
        raise ValueError(f"metadata is longer than {METADATA_MAX_LENGTH} bytes as JSON")
    return metadata, text
