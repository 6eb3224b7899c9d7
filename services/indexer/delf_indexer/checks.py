"""Filter-expression quoting and the metadata match of the indexer.

Everything a caller hands the store that ends up inside a Milvus expression or a
VARCHAR field is checked first, by the functions of delf_common.contract (one definition
of each limit, the gateway calls the same; the indexer imports them from there: the store
checks that an id fits the images collection, ``contract.check_id_fits``, and the indexer's
tasks first apply the whole rule the gateway applies, ``contract.check_image_id``);
``quote`` makes a string a safe literal.
"""
from __future__ import annotations

import json


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
