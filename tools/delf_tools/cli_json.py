"""`--json`: what a `delf` command prints as one JSON document on stdout, nothing else there.

A protobuf answer is written in the proto3 JSON mapping of its message in
protos/delf/v1/delf.proto, with the field names as written there (`image_id`, `next_page_token`),
every field present (zeros, empty lists), enums by name (`JOB_STATE_COMPLETED`) and 64-bit
counts as numbers; bytes (thumbnails, never asked by the commands) would be base64.
Progress bars, hints and errors go to stderr, as without --json.
"""
from __future__ import annotations

import json
import sys

from google.protobuf import json_format
from google.protobuf.message import Message


def as_dict(message: Message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)


def print_json(document, out=None) -> None:
    """One JSON document (a protobuf message, or a dict of plain values and messages) on stdout."""
    out = out or sys.stdout
    json.dump(_plain(document), out, ensure_ascii=False, indent=2)
    out.write("\n")
    out.flush()


def _plain(value):
    if isinstance(value, Message):
        return as_dict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
