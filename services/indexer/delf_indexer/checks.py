"""The indexer's input rules: image ids, metadata and filters, and filter-expression quoting.

Everything a caller hands the store that ends up inside a Milvus expression or a
VARCHAR field is checked first, by the functions of delf_common.contract (one definition
of each limit, the gateway calls the same); ``quote`` makes a string a safe literal.
"""
from __future__ import annotations

import json

from delf_common.contract import (  # noqa: F401 - the rules, under the names the store uses
    FILTER_KEY, FILTER_MAX_PAIRS, FILTER_MAX_VALUE_BYTES, check_filter, metadata_text,
)
# The store checks that an id fits the images collection (512 UTF-8 bytes); the indexer's
# tasks first apply the whole rule the gateway applies (contract.check_image_id).
from delf_common.contract import check_id_fits as check_image_id  # noqa: F401 - the store's name for the contract's rule
from delf_common.contract import MAX_ID_BYTES as MAX_ID_LENGTH  # noqa: F401 - the VARCHAR length of image_id
from delf_common.contract import METADATA_MAX_JSON_BYTES as METADATA_MAX_LENGTH  # noqa: F401 - of metadata


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


def metadata_matches(row: dict, filter: dict[str, str]) -> bool:
    """Whether an images row's metadata (JSON text) holds every pair of a checked filter."""
    meta = json.loads(row["metadata"]) if row.get("metadata") else {}
    return all(meta.get(k) == v for k, v in filter.items())
