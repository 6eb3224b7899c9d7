"""Configuration of every service, read from the environment.

Every setting has a default that runs on one machine (the embedded default that
`make up` starts). The settings table of docs/CONFIGURATION.md is generated from
``SETTINGS`` below (``python -m delf_common.config --write-docs``) and a test
checks it is current, so the two cannot drift apart. Help texts say what a setting
does; measured trade-offs belong in BENCHMARKS.md.

A service reads its settings once, into its frozen settings object (``from_env`` in
``delf_<service>/settings.py``), and passes that object down; `get` is called nowhere
else in a service (tests/test_architecture.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Setting:
    env: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    services: str  # which services read it


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {text!r}")


def _paths(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.split(os.pathsep) if p)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("expected text or json")
    return value


TRACING_MODES = ("auto", "off", "otlp", "console")


def _tracing(text: str) -> str:
    value = text.strip().lower() or "auto"
    if value not in TRACING_MODES:
        raise ValueError(f"expected one of {', '.join(TRACING_MODES)}")
    return value


DUPLICATE_MODES = ("index", "skip")


def _duplicates(text: str) -> str:
    value = text.strip().lower() or "index"
    if value not in DUPLICATE_MODES:
        raise ValueError(f"expected one of {', '.join(DUPLICATE_MODES)}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("expected a positive number of seconds")
    return value


MILVUS_INDEX_TYPES = ("auto", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "DISKANN")


def _milvus_index(text: str) -> str:
    value = text.strip().upper().replace("-", "_")
    value = "auto" if value in ("", "AUTO") else value
    if value not in MILVUS_INDEX_TYPES:
        raise ValueError(f"expected one of {', '.join(MILVUS_INDEX_TYPES)}")
    return value


def _json_object(text: str) -> dict:
    if not text.strip():
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError('expected a JSON object, e.g. {"nprobe": 32}')
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("expected a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("expected 0 or a positive integer")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError("expected 0 or a positive number")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError("expected a number from 0 to 1")
    return value


THUMBNAIL_MAX_SIDE = 1024


def _thumbnail_side(text: str) -> int:
    value = int(text)
    if not 0 <= value <= THUMBNAIL_MAX_SIDE:
        raise ValueError(f"expected 0 (no thumbnails) or a side of 1 to {THUMBNAIL_MAX_SIDE} pixels")
    return value


HEALTH_DEPENDENCIES = ("redis", "extractor", "indexer", "verifier", "milvus")


def _health_deps(text: str) -> tuple[str, ...]:
    names = tuple(v.lower() for v in _csv(text))
    unknown = [n for n in names if n not in HEALTH_DEPENDENCIES]
    if unknown:
        raise ValueError(f"unknown dependency {unknown[0]!r}; choose from {', '.join(HEALTH_DEPENDENCIES)}")
    return names


SETTINGS: dict[str, Setting] = {
    s.env: s
    for s in [
        Setting("DELF_REDIS_URL", "redis://127.0.0.1:6379/0", str,
                "Redis used as Celery broker, result backend and job store.", "all"),
        Setting("DELF_QUEUE_PREFIX", "delf", str,
                "Prefix of the Celery queue names (`<prefix>.extract`, `.index`, `.verify`); "
                "lets several deployments share one Redis.", "all"),
        Setting("DELF_GRPC_ADDR", "127.0.0.1:50051", str,
                "Address the gateway listens on (use 0.0.0.0:50051 in a container).", "gateway"),
        Setting("DELF_HTTP_ADDR", "127.0.0.1:8080", str,
                "Address the HTTP/JSON API and web console listen on (`delf up --http-addr`; "
                "0.0.0.0:8080 in a container).", "web, up"),
        Setting("DELF_GATEWAY", "127.0.0.1:50051", str,
                "Gateway address the `delf` CLI, the client library and the web service connect to.", "client, web"),
        Setting("DELF_AUTH_TOKENS", (), _csv,
                "Bearer tokens the gateway accepts, separated by commas; `delf.v1` calls must send "
                "`authorization: Bearer <token>` (health and reflection stay open). "
                "Empty: no authentication. The web service checks the same tokens (`Authorization: Bearer`).",
                "gateway, web"),
        Setting("DELF_TLS_CERT", "", str,
                "PEM certificate (chain) the gateway serves TLS with; set together with `DELF_TLS_KEY`. "
                "Empty (both): plaintext. The web service serves HTTPS with the same pair.",
                "gateway, web, gateway healthcheck, up"),
        Setting("DELF_TLS_KEY", "", str,
                "PEM private key of `DELF_TLS_CERT`.", "gateway, web"),
        Setting("DELF_TOKEN", "", str,
                "Bearer token the `delf` CLI and client library send (`--token`).", "client"),
        Setting("DELF_TLS_CA", "", str,
                "PEM of the CA (or self-signed certificate) to trust for the gateway; when set, clients "
                "connect with TLS (`--tls-ca`). Empty: plaintext.", "client, web, gateway healthcheck, up"),
        Setting("DELF_DATA_DIR", "./data", str,
                "Folder for local state: the Milvus Lite file and the embedded Redis.", "indexer, up"),
        Setting("DELF_MILVUS_URI", "", str,
                "Milvus URI. Empty: Milvus Lite file `$DELF_DATA_DIR/milvus.db`. "
                "A server: `http://host:19530`.", "indexer"),
        Setting("DELF_MILVUS_TOKEN", "", str,
                "Milvus token (`user:password` or an API key) for a server.", "indexer"),
        Setting("DELF_LITE_NLIST", 1024, _positive_int,
                "IVF lists per Milvus Lite segment (a segment holds what one memtable flush wrote, "
                "about 300k descriptors in bulk), set when the collection is created; an existing "
                "collection keeps its own.", "indexer"),
        Setting("DELF_LITE_TRAIN_POINTS", 128, _non_negative_int,
                "Descriptors per IVF list that Milvus Lite's k-means trains on when it indexes a "
                "new segment (a sample; every descriptor is still indexed): fewer makes rows "
                "searchable sooner; 0: Lite's own (up to 256 per list).", "indexer"),
        Setting("DELF_STORED_FEATURES", 500, _non_negative_int,
                "Descriptors the indexer keeps per indexed photo: the best-scored ones; 0: all the "
                "extractor finds. Queries keep DELF_QUERY_FEATURES (docs/SCALING.md).", "indexer"),
        Setting("DELF_DUPLICATES", "index", _duplicates,
                "What the indexer does with a photo whose bytes are identical to a photo already "
                "indexed under another id (the sha256 of the bytes as submitted): `index` indexes it "
                "under its own id too, `skip` does not (it is not searchable or readable under that "
                "id). Either way it is reported: AddImage's `duplicate_of`, the job's `duplicates` "
                "and `duplicate_of`. `index` by default: the id is the caller's key, and a photo "
                "sent under an id is never dropped unasked.", "gateway, indexer"),
        Setting("DELF_LITE_NPROBE", 6, _positive_int,
                "IVF lists the indexer's direct Milvus Lite search probes in each large segment "
                "(at most all of them); a collection under ~1M descriptors probes more, to scan "
                "about this many x 1024 rows per query descriptor: fewer is faster, more finds "
                "more true neighbours.",
                "indexer"),
        Setting("DELF_MILVUS_INDEX", "auto", _milvus_index,
                "Vector index of the descriptor collection, set when it is created; an existing "
                "collection keeps its own. A server: `auto` (HNSW), `HNSW`, `IVF_FLAT`, `IVF_SQ8`, "
                "`IVF_PQ` or `DISKANN`. Milvus Lite: `auto` (IVF_SQ8), `IVF_SQ8` or `IVF_FLAT` "
                "(another value is an error).", "indexer"),
        Setting("DELF_MILVUS_INDEX_PARAMS", {}, _json_object,
                'Build parameters of a Milvus server\'s index as a JSON object over the index type\'s '
                'defaults, e.g. {"nlist": 4096} for IVF_* or {"M": 32} for HNSW; used when the '
                "collection is created. Empty: the type's defaults.", "indexer"),
        Setting("DELF_MILVUS_SEARCH_PARAMS", {}, _json_object,
                'Search parameters of a Milvus server\'s index as a JSON object, e.g. {"ef": 128} for '
                'HNSW, {"nprobe": 32} for IVF_*, {"search_list": 100} for DISKANN. '
                "Empty: the type's defaults.", "indexer"),
        Setting("DELF_COLLECTION", "delf", str,
                "Name prefix of the Milvus collections (`<name>_features`, `<name>_images`).", "indexer"),
        Setting("DELF_MODEL", "effnet-lite0-cat32", str,
                "Extractor preset: `effnet-lite0-cat32`, `effnet-lite0`, `effnet-lite0-attn`, "
                "`effnet-lite0-cat32-attn`, `effnet-lite1-cat32`, `effnet-lite2-cat32` or `delf-resnet50` "
                "(docs/METHOD.md).", "extractor, gateway (stats)"),
        Setting("DELF_DEVICE", "auto", str,
                "Torch device for the extractor: `auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`.",
                "extractor"),
        Setting("DELF_WEIGHTS_DIR", "", str,
                "Folder searched for weight files (e.g. torchvision's `resnet50-11ad3fa6.pth`); "
                "the torch hub cache is searched too.", "extractor"),
        Setting("DELF_PCA", "", str,
                "PCA that reduces the descriptors: a `.npz` written by `delf fit-pca --out PATH`, or "
                "the name of one shipped in the extractor's weights folder (docs/METHOD.md); it must "
                "belong to `DELF_MODEL`. Empty: the model's default. A collection refuses "
                "descriptors of another PCA.", "extractor"),
        Setting("DELF_MAX_IMAGE_BYTES", 20 * 1024 * 1024, int,
                "Largest accepted encoded photo, in bytes.", "gateway, extractor"),
        Setting("DELF_MAX_IMAGE_PIXELS", 50_000_000, int,
                "Largest accepted photo, in decoded pixels (guards against decompression bombs).",
                "gateway, extractor"),
        Setting("DELF_MIN_IMAGE_SIDE", 32, int,
                "Smallest accepted width or height, in pixels.", "gateway, extractor"),
        Setting("DELF_THUMBNAIL_SIDE", 320, _thumbnail_side,
                "Longer side, in pixels, of the JPEG thumbnail the extractor makes of each indexed "
                "photo; the indexer stores it with the photo, `GetImage` returns it on request and "
                "`delf search --show` draws it. At most 1024 px and 48,000 bytes (a lower JPEG quality "
                "or side when needed). 0: no thumbnails.", "extractor"),
        Setting("DELF_MAX_MESSAGE_BYTES", 64 * 1024 * 1024, int,
                "Largest gRPC request message the gateway accepts.", "gateway"),
        Setting("DELF_SHORTLIST", 50, int,
                "Images kept after nearest-neighbour voting and passed to RANSAC.", "gateway, indexer"),
        Setting("DELF_FILTER_MAX_IMAGES", 10000, int,
                "Most photos a metadata filter may match and still restrict the nearest-neighbour "
                "search itself; a broader filter is applied to the voted images instead.", "indexer"),
        Setting("DELF_LITE_DIRECT_SEARCH", True, _bool,
                "Milvus Lite only: search Lite's per-segment faiss indexes in the indexer's process "
                "(same rows, deletions and filters) instead of Lite's search API. "
                "0: always the search API.",
                "indexer"),
        Setting("DELF_LITE_DIRECT_INSERT", True, _bool,
                "Milvus Lite only: write descriptor rows to Lite's write-ahead log and memtable as "
                "columns, in the indexer's process (the same rows, checked by the indexer), instead of "
                "a dict per row through Lite's insert API, and let Lite's memtable flush build its "
                "table with Arrow takes instead of a Python object per cell (the same table). "
                "0: Lite's own code for both.",
                "indexer"),
        Setting("DELF_QUERY_FEATURES", 500, int,
                "Most query descriptors (the best-scored) that search the index and vote; "
                "0: all of them.", "indexer"),
        Setting("DELF_NEIGHBOURS", 7, int,
                "Nearest neighbours per query descriptor that may vote "
                "(one more is fetched for the ratio test).", "indexer"),
        Setting("DELF_RATIO", 0.9, float,
                "Ratio test: a neighbour votes when its distance is below this times the "
                "distance of the next-after-last neighbour.", "indexer"),
        Setting("DELF_VERIFIED_SCORE", 0.9, _unit_float,
                "Score (0-1, `delf_common.ranking`) from which a result counts as verified; every "
                "result is ranked by the same score either way.", "gateway (sent to the verifier)"),
        Setting("DELF_RANSAC_PX", 8.0, float,
                "RANSAC reprojection threshold in query pixels.", "gateway (sent to the verifier)"),
        Setting("DELF_TASK_TIMEOUT_S", 120.0, float,
                "Longest a gateway call waits for workers when the client set no deadline.", "gateway"),
        Setting("DELF_INGEST_ROOTS", (), _paths,
                "Folders (separated by `:`) under which ingest items may name a `location`; "
                "empty: locations are refused.", "extractor"),
        Setting("DELF_URL_INGEST", False, _bool,
                "Accept http(s) URLs as ingest `location`s, fetched by the extractor workers "
                "(1/0). Off: URL items are refused.", "gateway, extractor"),
        Setting("DELF_URL_ALLOWED_HOSTS", (), _csv,
                "Hosts URL items may name, separated by commas; an entry allows that host and its "
                "subdomains. Empty: any public host.", "gateway, extractor"),
        Setting("DELF_URL_ALLOW_PRIVATE", False, _bool,
                "Let URL items reach loopback and private addresses. Link-local (cloud metadata), "
                "multicast, unspecified and reserved addresses stay refused.",
                "gateway, extractor"),
        Setting("DELF_JOB_RESUME_AFTER_S", 7200.0, float,
                "The gateway resumes an ingest job with no progress for this many seconds, as "
                "`ResumeJob` does; keep it above `DELF_VISIBILITY_TIMEOUT_S` plus the longest task. "
                "0: off (resume by hand).",
                "gateway"),
        Setting("DELF_JOB_STALLED_AFTER_S", 120.0, _positive_float,
                "An ingest job with no progress for this many seconds (RUNNING: no item finished; "
                "RECEIVING: no item received) is reported as stalled (`Job.stalled`, `delf job`), "
                "with what it waits for and the command that finishes it; the gateway then sends the "
                "index tasks of its photos already extracted again (once per stall).",
                "gateway"),
        Setting("DELF_URL_TIMEOUT_S", 30.0, float,
                "Longest one URL fetch may take (connect and read, redirects included); slower "
                "servers are retried with backoff, then the item fails.", "extractor"),
        Setting("DELF_WORKER_BATCH", 0, _non_negative_int,
                "Most ingest photos an extractor worker runs through the network together (it holds "
                "twice as many). 0: automatic, 16 on CUDA, 1 on CPU.", "extractor"),
        Setting("DELF_WORKER_BATCH_WAIT_MS", 100.0, _non_negative_float,
                "Longest an ingest photo waits for others to fill its batch, in milliseconds; a "
                "batch starts at once when no other photo is being read by the worker.",
                "extractor"),
        Setting("DELF_VISIBILITY_TIMEOUT_S", 3600.0, float,
                "Seconds before a task held by a worker that died without acknowledging it is "
                "handed to another worker; keep it above the longest task, retries included.",
                "extractor, indexer, verifier"),
        Setting("DELF_MALLOC_TUNE", True, _bool,
                "Let the extractor keep freed memory for the next photo instead of handing it back "
                "to the OS (glibc mallopt: mmap threshold 32 MiB, trim threshold and top pad 1 GiB, "
                "one arena); resident memory stays near its peak. Off: glibc's defaults.",
                "extractor"),
        Setting("DELF_DARK_LIGHTNESS", 50.0, float,
                "A photo whose median lightness (Lab L, 0-255) is below this is brightened and "
                "locally equalised before extraction, indexed photos and queries alike "
                "(`delf_extractor.photometric`); photos at or above it are extracted as they are. "
                "0: never. Photos indexed under another value keep their features until added again "
                "(`delf add ID PHOTO`; an ingest job leaves unchanged photos as they are).",
                "extractor"),
        Setting("DELF_QUERY_MAX_SCALE", 0.0, float,
                "When set (e.g. 1.0), search queries are extracted without the pyramid levels above "
                "this scale (indexed photos keep every level): faster queries, coarser region "
                "corners. 0: every level.",
                "extractor"),
        Setting("DELF_MAX_SEARCHES", 16, int,
                "Most searches one gateway process works on at once; beyond it a search is answered "
                "RESOURCE_EXHAUSTED at once. 0: no limit.", "gateway"),
        Setting("DELF_MAX_QUEUE", 1000, int,
                "Most tasks waiting in one service's queue: beyond it the gateway answers searches and "
                "`AddImage` with RESOURCE_EXHAUSTED, refuses new ingest jobs and slows running ones.",
                "gateway"),
        Setting("DELF_METRICS_PORT", 0, int,
                "Port of the Prometheus `/metrics` HTTP endpoint of each service (gateway and workers). "
                "0: off.", "gateway, extractor, indexer, verifier"),
        Setting("DELF_TRACING", "auto", _tracing,
                "OpenTelemetry traces of searches and ingest items (gateway and workers): `auto` (on, "
                "exporting OTLP, when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` or "
                "`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, else off), `otlp`, `console` (spans "
                "printed to stderr) or `off`. Needs the `tracing` extra (docs/DEPLOYMENT.md).",
                "gateway, extractor, indexer, verifier"),
        Setting("DELF_LOG_LEVEL", "INFO", str, "Log level of every service.", "all"),
        Setting("DELF_LOG_FORMAT", "text", _log_format,
                "Log format of every service: `text` (for people) or `json` (one object per line).",
                "all"),
        Setting("DELF_HEARTBEAT_S", 5.0, _positive_float,
                "How often each worker writes its heartbeat (liveness and, for the indexer, Milvus "
                "reachability) to Redis; a heartbeat expires after 3 intervals.",
                "extractor, indexer, verifier"),
        Setting("DELF_HEALTH_INTERVAL_S", 2.0, _positive_float,
                "How often the gateway re-checks its dependencies (Redis, worker heartbeats, Milvus) "
                "for its grpc.health.v1 service.", "gateway"),
        Setting("DELF_HEALTH_REQUIRE", ("redis", "extractor", "indexer", "verifier", "milvus"), _health_deps,
                "Dependencies, separated by commas, that must be up for the gateway's overall health "
                "to be SERVING: any of redis, extractor, indexer, verifier, milvus.", "gateway"),
    ]
}


class ConfigError(ValueError):
    """A setting in the environment cannot be parsed."""


def get(env: str) -> Any:
    """The current value of one setting (environment, else its default)."""
    setting = SETTINGS[env]
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return setting.default
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{env}={raw!r}: {exc}") from None


def read_pem(env: str, path: str | None = None) -> bytes:
    """The bytes of the PEM file a setting names (or `path`), with a clear error when unreadable."""
    path = path if path is not None else get(env)
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"{env}={path!r}: cannot read the PEM file: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{env}={path!r}: not a PEM file (no -----BEGIN line)")
    return data


def data_dir() -> Path:
    return Path(get("DELF_DATA_DIR")).expanduser().resolve()


def milvus_uri() -> str:
    uri = get("DELF_MILVUS_URI")
    return uri or str(data_dir() / "milvus.db")


def markdown_table() -> str:
    lines = ["| variable | default | used by | meaning |", "|---|---|---|---|"]
    for s in SETTINGS.values():
        sep = "," if s.parse in (_csv, _health_deps) else os.pathsep
        default = sep.join(s.default) if isinstance(s.default, tuple) else s.default
        lines.append(f"| `{s.env}` | `{default}` | {s.services} | {s.help} |")
    return "\n".join(lines)


# The document that holds the generated table (in a source checkout; service images
# do not carry docs/), and the two lines the table sits between.
CONFIGURATION_DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md"
TABLE_BEGIN = "<!-- settings table: generated by `python -m delf_common.config --write-docs` -->"
TABLE_END = "<!-- end of settings table -->"


def write_docs(path: Path = CONFIGURATION_DOC) -> None:
    """Replace the generated table between TABLE_BEGIN and TABLE_END in ``path``."""
    text = path.read_text()
    head, begin, rest = text.partition(TABLE_BEGIN)
    _, end, tail = rest.partition(TABLE_END)
    if not begin or not end:
        raise SystemExit(f"{path}: no {TABLE_BEGIN!r} ... {TABLE_END!r} block to replace")
    path.write_text(f"{head}{TABLE_BEGIN}\n{markdown_table()}\n{TABLE_END}{tail}")


if __name__ == "__main__":  # pragma: no cover
    if "--markdown" in sys.argv:
        print(markdown_table())
    elif "--write-docs" in sys.argv:
        write_docs()
        print(f"wrote the settings table into {CONFIGURATION_DOC}")
    else:
        for name in SETTINGS:
            print(f"{name}={get(name)!r}")
