"""Ingest manifests: the photos of one job listed in a CSV or JSON Lines file.

CSV (``.csv``): a header row with the columns ``id`` and ``location``; every other
column becomes a string metadata entry (empty cells are left out), and a column named
``metadata`` may hold a JSON object instead (both are merged, the named columns win)::

    id,location,city,metadata
    louvre-1,photos/louvre1.jpg,Paris,"{""year"": ""2019""}"
    eiffel,https://example.com/e.jpg,Paris,

Tab-separated (``.tsv``, the manifests of ``delf eval``): a header row and one photo per
line, no quoting; the photo's column is ``location`` or ``path``, and without an ``id``
column a photo's id is its path without the extension (``paris/louvre1.jpg`` ->
``paris/louvre1``, as ``delf eval`` names it); every other column (``group``, ``note``
...) becomes metadata, as in a CSV::

    path	group
    paris/louvre1.jpg	louvre

JSON Lines (``.jsonl``): one object per line with ``id``, ``location`` and an optional
``metadata`` object; blank lines are skipped::

    {"id": "louvre-1", "location": "photos/louvre1.jpg", "metadata": {"city": "Paris"}}

A location is an http(s) URL (fetched by the server's workers, when it allows URL
ingest) or a file path; a relative path is relative to the manifest's folder. Other
URL schemes (``file://``, ``ftp://`` ...) are refused. Metadata values that are JSON
numbers or booleans become their JSON text (``3``, ``true``); nested values are refused.

Every problem is reported with its line number (``ManifestError.errors``), before
anything is sent.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

from delf_common.fetch import url_scheme

SUFFIXES = (".csv", ".tsv", ".jsonl")
MAX_ERRORS = 20
JSONL_KEYS = ("id", "location", "metadata")
_EXTRA = "\0extra"  # DictReader's key for fields beyond the header


class ManifestError(ValueError):
    """A manifest that cannot be used; `errors` lists "path:line: problem" strings."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        more = "" if len(errors) < MAX_ERRORS else f"\n(first {MAX_ERRORS} problems shown)"
        super().__init__("\n".join(errors) + more)


@dataclasses.dataclass
class Entry:
    line: int
    image_id: str
    location: str              # as written in the manifest
    metadata: dict[str, str]
    url: bool                  # an http(s) URL
    path: Path | None = None   # a local file (resolved against the manifest's folder)


def is_manifest(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def read_manifest(path: str | os.PathLike, check_files: bool = True) -> list[Entry]:
    """The entries of a CSV or JSONL manifest. `check_files`: local files must exist
    (they are read by this client); off for paths the server reads (``--server-paths``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ManifestError([f"{path}: a manifest must end in .csv, .tsv or .jsonl"])
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(_jsonl_rows(f) if suffix == ".jsonl" else _csv_rows(f, tab=suffix == ".tsv"))
    except UnicodeDecodeError as exc:
        raise ManifestError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except OSError as exc:
        raise ManifestError([f"{path}: cannot read: {exc.strerror or exc}"]) from None

    errors: list[str] = []
    entries: list[Entry] = []
    first_line: dict[str, int] = {}
    base = path.parent
    for line, fields, problem in rows:
        if len(errors) >= MAX_ERRORS:
            break
        if problem is None:
            problem, entry = _entry(line, fields, base, check_files)
            if problem is None and entry.image_id in first_line:
                problem = f"id {entry.image_id!r} already appears on line {first_line[entry.image_id]}"
        if problem is not None:
            errors.append(f"{path}:{line}: {problem}")
            continue
        first_line[entry.image_id] = line
        entries.append(entry)
    if errors:
        raise ManifestError(errors)
    if not entries:
        raise ManifestError([f"{path}: no photos listed"])
    return entries


def read_table(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a .tsv or .csv manifest as {column: value} (blank lines left out), the
    reading ``delf eval`` shares with ``delf ingest``; ManifestError (a ValueError) for a
    file without a header or with more fields than it."""
    path = Path(path)
    tab = path.suffix.lower() != ".csv"
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = _reader(f, tab)
        names = [h.strip() for h in (reader.fieldnames or [])]
        if not names:
            raise ManifestError([f"{path}: no header row"])
        reader.fieldnames = names
        out = []
        for row in reader:
            if _EXTRA in row:
                raise ManifestError([f"{path}:{reader.line_num}: {len(names) + len(row[_EXTRA])} fields but "
                                     f"the header has {len(names)}"])
            if any(v not in (None, "") for v in row.values()):
                out.append({k: v or "" for k, v in row.items()})
        return out


def _reader(f, tab: bool) -> csv.DictReader:
    if tab:  # as `delf eval` always read them: split on tabs, quotes are plain characters
        return csv.DictReader(f, restkey=_EXTRA, delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.DictReader(f, restkey=_EXTRA)


def _csv_rows(f, tab: bool = False):
    reader = _reader(f, tab)
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        yield 1, None, f"malformed header: {exc}"
        return
    if header is None:
        return
    names = [h.strip() for h in header]
    if tab and "location" not in names and "path" in names:
        names[names.index("path")] = "location"  # `delf eval`'s name for the column
    needed = ("location",) if tab else ("id", "location")
    missing = [c for c in needed if c not in names]
    if missing or len(set(names)) != len(names):
        why = (f"the header needs the columns {' and '.join(needed)}{' (or path)' if tab else ''} "
               f"(missing: {', '.join(missing)}; found: {', '.join(names) or 'none'})") if missing \
            else "the header repeats a column name"
        yield 1, None, why
        return
    reader.fieldnames = names
    yield from _table_rows(reader, names, derive_id=tab and "id" not in names)


def _table_rows(reader, names: list[str], derive_id: bool):
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, None, f"malformed CSV: {exc}"
            return
        line = reader.line_num
        if _EXTRA in row:
            yield line, None, f"{len(names) + len(row[_EXTRA])} fields but the header has {len(names)}"
            continue
        if all(v in (None, "") for v in row.values()):
            continue  # a blank line
        location = row.pop("location") or ""
        image_id = _id_of(location) if derive_id else row.pop("id") or ""
        fields = {"id": image_id, "location": location}
        meta_text = row.pop("metadata", None)
        metadata, problem = {}, None
        if meta_text:
            try:
                metadata = json.loads(meta_text)
            except json.JSONDecodeError as exc:
                problem = f"the metadata column is not JSON: {exc.msg} (column {exc.colno})"
        if problem is None and not isinstance(metadata, dict):
            problem = f"the metadata column must be a JSON object, got {type(metadata).__name__}"
        if problem is None:
            metadata = dict(metadata)
            metadata.update({k: v for k, v in row.items() if v not in (None, "")})
            fields["metadata"] = metadata
        yield line, fields, problem


def _id_of(location: str) -> str:
    """A photo's id from its path, as `delf eval` names it: the path without its extension."""
    location = location.strip()
    return location.rsplit(".", 1)[0] if "." in Path(location).name else location


def _jsonl_rows(f):
    for line, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield line, None, f"not a JSON object: {exc.msg} (column {exc.colno})"
            continue
        if not isinstance(obj, dict):
            yield line, None, f"expected a JSON object, got {type(obj).__name__}"
            continue
        unknown = sorted(set(obj) - set(JSONL_KEYS))
        if unknown:
            yield line, None, f"unknown key {unknown[0]!r} (expected id, location and optionally metadata)"
            continue
        if "metadata" in obj and not isinstance(obj["metadata"], dict):
            yield line, None, f"metadata must be a JSON object, got {type(obj['metadata']).__name__}"
            continue
        yield line, obj, None


def _entry(line: int, fields: dict, base: Path, check_files: bool) -> tuple[str | None, Entry | None]:
    image_id, location = fields.get("id"), fields.get("location")
    if not isinstance(image_id, str) or not image_id.strip():
        return "missing id" if image_id in (None, "") else f"id must be a string, got {image_id!r}", None
    if not isinstance(location, str) or not location.strip():
        return ("missing location" if location in (None, "") else
                f"location must be a string, got {location!r}"), None
    image_id, location = image_id.strip(), location.strip()
    metadata: dict[str, str] = {}
    for key, value in (fields.get("metadata") or {}).items():
        if isinstance(value, str):
            metadata[str(key)] = value
        elif isinstance(value, (bool, int, float)):
            metadata[str(key)] = json.dumps(value)
        elif value is None:
            continue
        else:
            return f"metadata {key!r} must be a string, number or boolean, got {type(value).__name__}", None
    scheme = url_scheme(location)
    if scheme is not None:
        if scheme not in ("http", "https"):
            return f"location {location!r}: only local paths and http(s) URLs are accepted", None
        return None, Entry(line, image_id, location, metadata, url=True)
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = base / path
    if check_files and not path.is_file():
        return f"location {location!r}: no such file ({path})", None
    return None, Entry(line, image_id, location, metadata, url=False, path=path)
