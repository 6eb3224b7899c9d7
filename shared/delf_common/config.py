"""Configuration of every service, read from the environment.

Every setting has a default that runs on one machine (the embedded default that
`make up` starts). The README's configuration table is generated from
``SETTINGS`` below (``python -m delf_common.config --markdown``), so the two
cannot drift apart.
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
        Setting("DELF_GATEWAY", "127.0.0.1:50051", str,
                "Gateway address the `delf` CLI and client library connect to.", "client"),
        Setting("DELF_AUTH_TOKENS", (), _csv,
                "Bearer tokens the gateway accepts, separated by commas; every `delf.v1` call must "
                "send `authorization: Bearer <token>` (health and reflection stay open). "
                "Empty: no authentication (the local default).", "gateway"),
        Setting("DELF_TLS_CERT", "", str,
                "PEM certificate (chain) the gateway serves TLS with; set together with `DELF_TLS_KEY`. "
                "Empty (both): plaintext.", "gateway, gateway healthcheck, up"),
        Setting("DELF_TLS_KEY", "", str,
                "PEM private key of `DELF_TLS_CERT`.", "gateway"),
        Setting("DELF_TOKEN", "", str,
                "Bearer token the `delf` CLI and client library send (`--token`).", "client"),
        Setting("DELF_TLS_CA", "", str,
                "PEM of the CA (or self-signed certificate) to trust for the gateway; when set, clients "
                "connect with TLS (`--tls-ca`). Empty: plaintext.", "client, gateway healthcheck, up"),
        Setting("DELF_DATA_DIR", "./data", str,
                "Folder for local state: the Milvus Lite file and the embedded Redis.", "indexer, up"),
        Setting("DELF_MILVUS_URI", "", str,
                "Milvus URI. Empty: Milvus Lite file `$DELF_DATA_DIR/milvus.db`. "
                "A server: `http://host:19530`.", "indexer"),
        Setting("DELF_MILVUS_TOKEN", "", str,
                "Milvus token (`user:password` or an API key) for a server.", "indexer"),
        Setting("DELF_LITE_NLIST", 1024, _positive_int,
                "IVF lists per Milvus Lite segment (of up to 100k descriptors), chosen when the "
                "collection is created (an existing one keeps its own). 1024 (about 4 sqrt(rows)) "
                "scans a smaller part of each segment than coarser lists at the same recall; see "
                "BENCHMARKS.md (Lite IVF lists).", "indexer"),
        Setting("DELF_LITE_NPROBE", 16, _positive_int,
                "IVF lists the indexer's direct Milvus Lite search probes in each large segment "
                "(of DELF_LITE_NLIST; at most all of a segment's lists): fewer is faster, more finds "
                "more true neighbours; see BENCHMARKS.md (search latency against index size).",
                "indexer"),
        Setting("DELF_MILVUS_INDEX", "auto", _milvus_index,
                "Vector index of a Milvus server's descriptor collection, chosen when the collection "
                "is created: HNSW (auto: best latency and recall while the vectors fit in RAM, tens "
                "of millions of 40- to 96-d descriptors per node), IVF_FLAT (fast to build, for bulk loads), "
                "IVF_SQ8 (a quarter of the memory, small recall cost), IVF_PQ (compressed: hundreds "
                "of millions of descriptors; the paper used PQ with an inverted file) or DISKANN "
                "(vectors on SSD, a billion-descriptor index). An existing collection keeps its "
                "index. Milvus Lite (the embedded default) always uses IVF_FLAT, which the "
                "indexer's direct search reads; another value with a Lite file is an error.", "indexer"),
        Setting("DELF_MILVUS_INDEX_PARAMS", {}, _json_object,
                'Build parameters for a Milvus server\'s index as JSON over the type\'s defaults, e.g. '
                '{"nlist": 4096} for IVF_* (more lists: a smaller part of each segment scanned per '
                'probe; about 4 sqrt(rows per segment) is usual) or {"M": 32} for HNSW. Used when the '
                "collection is created. Empty: the defaults of the index type (BENCHMARKS.md).",
                "indexer"),
        Setting("DELF_MILVUS_SEARCH_PARAMS", {}, _json_object,
                'Search parameters for a Milvus server\'s index as JSON, e.g. {"ef": 128} for HNSW '
                'or {"nprobe": 32} for IVF_*, {"search_list": 100} for DISKANN: more recall for more '
                "time. Empty: the defaults of the index type (BENCHMARKS.md).", "indexer"),
        Setting("DELF_COLLECTION", "delf", str,
                "Name prefix of the Milvus collections (`<name>_features`, `<name>_images`).", "indexer"),
        Setting("DELF_MODEL", "effnet-lite0-cat32", str,
                "Extractor model configuration: `effnet-lite0-cat32` (EfficientNet-Lite0's stride-16 "
                "features with its stride-32 stage appended), `effnet-lite0` (the stride-16 features "
                "alone: about 20% less extraction time, 0.04 lower mAP), `effnet-lite0-attn`, `delf-resnet50`; "
                "README \"How a search works\".", "extractor, gateway (stats)"),
        Setting("DELF_DEVICE", "auto", str,
                "Torch device for the extractor: `auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`.",
                "extractor"),
        Setting("DELF_WEIGHTS_DIR", "", str,
                "Folder searched for weight files (e.g. torchvision's `resnet50-11ad3fa6.pth`); "
                "the torch hub cache is searched too.", "extractor"),
        Setting("DELF_PCA", "", str,
                "PCA that reduces the descriptors: a `.npz` written by `delf fit-pca --out PATH`, or "
                "the name of one shipped in the extractor's weights folder. Shipped: for the default "
                "`effnet-lite0-cat32`, `effnet-lite0-cat32-pca96` (its default), `-pca64` and `-pca40` "
                "(fewer dimensions: smaller vectors and faster kNN for 0.005 / 0.024 less landmarks-dev "
                "mAP); for `effnet-lite0` (and `-attn`), `effnet-lite0-pca40` (its default) and "
                "`effnet-lite0-pca64`; BENCHMARKS.md. The PCA must belong to `DELF_MODEL`. Empty: the "
                "model's default. A collection keeps the PCA it was filled with (others are "
                "refused): a new PCA needs a new `DELF_COLLECTION` and a re-ingest.", "extractor"),
        Setting("DELF_MAX_IMAGE_BYTES", 20 * 1024 * 1024, int,
                "Largest accepted encoded photo, in bytes.", "gateway, extractor"),
        Setting("DELF_MAX_IMAGE_PIXELS", 50_000_000, int,
                "Largest accepted photo, in decoded pixels (guards against decompression bombs).",
                "gateway, extractor"),
        Setting("DELF_MIN_IMAGE_SIDE", 32, int,
                "Smallest accepted width or height, in pixels.", "gateway, extractor"),
        Setting("DELF_MAX_MESSAGE_BYTES", 64 * 1024 * 1024, int,
                "Largest gRPC request message the gateway accepts.", "gateway"),
        Setting("DELF_SHORTLIST", 50, int,
                "Images kept after nearest-neighbour voting and passed to RANSAC.", "gateway, indexer"),
        Setting("DELF_FILTER_MAX_IMAGES", 10000, int,
                "Most photos a search's metadata filter may match and still restrict the "
                "nearest-neighbour search itself (an `image_id in [...]` expression in Milvus); "
                "a broader filter is applied to the voted images instead.", "indexer"),
        Setting("DELF_LITE_DIRECT_SEARCH", True, _bool,
                "Milvus Lite only: search the descriptors through Lite's per-segment faiss indexes "
                "in the indexer's process instead of Lite's search API (same rows, tombstones and "
                "filters; several times faster on large indexes). 0: always the search API.",
                "indexer"),
        Setting("DELF_QUERY_FEATURES", 500, int,
                "Most query descriptors (the best-scored) that search the index and can vote; "
                "0: all (up to the extractor's 1000). 500 halves the kNN work at the same "
                "landmarks-dev mAP (BENCHMARKS.md).", "indexer"),
        Setting("DELF_NEIGHBOURS", 10, int,
                "Nearest neighbours per query descriptor that may vote "
                "(one more is fetched for the ratio test).", "indexer"),
        Setting("DELF_RATIO", 0.9, float,
                "Ratio test: a neighbour votes when its distance is below this times the "
                "distance of the next-after-last neighbour.", "indexer"),
        Setting("DELF_MIN_INLIERS", 25, int,
                "RANSAC inliers a candidate needs to count as verified.", "gateway (sent to the verifier)"),
        Setting("DELF_MIN_INLIER_RATIO", 0.15, float,
                "Share of a candidate's correspondences that must be RANSAC inliers for it to count "
                "as verified.", "gateway (sent to the verifier)"),
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
                "subdomains (`example.com` allows `img.example.com`). Empty: any public host "
                "(when `DELF_URL_INGEST` is on).", "gateway, extractor"),
        Setting("DELF_URL_ALLOW_PRIVATE", False, _bool,
                "Let URL items reach loopback and private addresses (127/8, 10/8, 172.16/12, "
                "192.168/16, 100.64/10, ::1, fc00::/7). Link-local (169.254/16, fe80::/10: cloud "
                "metadata), multicast, unspecified and reserved addresses stay refused.",
                "gateway, extractor"),
        Setting("DELF_JOB_RESUME_AFTER_S", 7200.0, float,
                "Ingest jobs with no progress for this many seconds (RUNNING, or RECEIVING with no "
                "item arriving) are resumed by the gateway itself, as by `ResumeJob`: their "
                "unfinished path and URL items are sent again (closes lost-message gaps, e.g. a "
                "worker killed between taking a task and recording it). Keep it above "
                "`DELF_VISIBILITY_TIMEOUT_S` plus the longest task. Bytes items cannot be re-sent by the "
                "server: they are counted as awaiting upload (`delf ingest PATH --resume JOB`). "
                "0: off (resume by hand).",
                "gateway"),
        Setting("DELF_URL_TIMEOUT_S", 30.0, float,
                "Longest one URL fetch may take (connect and read, redirects included); slower "
                "servers are retried with backoff, then the item fails.", "extractor"),
        Setting("DELF_WORKER_BATCH", 0, _non_negative_int,
                "Most ingest photos an extractor worker runs through the network together (it "
                "works on twice as many at once: one batch in the network, the next being read "
                "and decoded). 0: automatic, 16 on CUDA, 1 on CPU (batching does not pay on CPU, "
                "see BENCHMARKS.md).", "extractor"),
        Setting("DELF_WORKER_BATCH_WAIT_MS", 100.0, _non_negative_float,
                "Longest an ingest photo waits for others to fill its batch, in milliseconds; a "
                "batch starts at once when no other photo is being read by the worker.",
                "extractor"),
        Setting("DELF_VISIBILITY_TIMEOUT_S", 3600.0, float,
                "Seconds before a task taken by a worker that died without acknowledging it "
                "(killed, out of memory, host lost) is handed to another worker; keep it above the "
                "longest task, retries included. A warm shutdown (SIGTERM) hands tasks back at once.",
                "extractor, indexer, verifier"),
        Setting("DELF_MALLOC_TUNE", True, _bool,
                "Let the extractor keep freed memory for the next photo instead of handing it back "
                "to the OS (glibc mallopt: mmap threshold 32 MiB, trim threshold and top pad 1 GiB). "
                "Each pyramid level allocates hundreds of MiB; on a 2-core VM without transparent "
                "huge pages, page-faulting them afresh for every photo took 45% of CPU extraction "
                "time (2.1 -> 1.2 s per 1024 px photo, BENCHMARKS.md). The worker's resident memory "
                "then stays near its peak. Off: glibc's defaults.", "extractor"),
        Setting("DELF_QUERY_MAX_SCALE", 0.0, float,
                "When set (e.g. 1.0), search queries are extracted without the pyramid levels above "
                "this scale (indexed photos keep every level of the model). On landmarks-dev, 1.0 "
                "cut query extraction from 0.58 to 0.19 s for the same mAP (0.898 vs 0.899) and "
                "brings a 1M-descriptor search under 1 s on a slow 2-core VM, but the matched "
                "region's corners get coarser (54 warped photos: 87% within 10 px, largest error "
                "14 px, against 98% and 12 px with every level; scripts/bench_corners.py). "
                "0: every level (the default).",
                "extractor"),
        Setting("DELF_MAX_SEARCHES", 16, int,
                "Most searches one gateway process works on at once; beyond it a search is answered "
                "RESOURCE_EXHAUSTED at once, instead of queueing behind work it could not finish within "
                "its deadline. 0: no limit.", "gateway"),
        Setting("DELF_MAX_QUEUE", 1000, int,
                "Most tasks waiting in one service's queue: beyond it the gateway answers searches and "
                "`AddImage` with RESOURCE_EXHAUSTED, refuses new ingest jobs and slows running ones "
                "(it waits, within the caller's deadline, before sending the next photo).", "gateway"),
        Setting("DELF_METRICS_PORT", 0, int,
                "Port of the Prometheus `/metrics` HTTP endpoint of each service (gateway and workers). "
                "0: off (the local default).", "gateway, extractor, indexer, verifier"),
        Setting("DELF_LOG_LEVEL", "INFO", str, "Log level of every service.", "all"),
        Setting("DELF_LOG_FORMAT", "text", _log_format,
                "Log format of every service: `text` (for people) or `json` (one JSON object per line "
                "with `ts`, `level`, `service`, `logger`, `message` and, when known, `request_id`, "
                "`job_id`, `image_id`, `task_id`).", "all"),
        Setting("DELF_HEARTBEAT_S", 5.0, _positive_float,
                "How often each worker writes its heartbeat (liveness and, for the indexer, Milvus "
                "reachability) to Redis; a heartbeat expires after 3 intervals.",
                "extractor, indexer, verifier"),
        Setting("DELF_HEALTH_INTERVAL_S", 2.0, _positive_float,
                "How often the gateway re-checks its dependencies (Redis, worker heartbeats, Milvus) "
                "for its grpc.health.v1 service.", "gateway"),
        Setting("DELF_HEALTH_REQUIRE", ("redis", "extractor", "indexer", "verifier", "milvus"), _health_deps,
                "Dependencies, separated by commas, that must be up for the gateway's overall health "
                "(`\"\"` and `delf.v1.ImageSearch`) to be SERVING; each is also reported under its own "
                "name. Choose from redis, extractor, indexer, verifier, milvus.", "gateway"),
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


if __name__ == "__main__":  # pragma: no cover
    if "--markdown" in sys.argv:
        print(markdown_table())
    else:
        for name in SETTINGS:
            print(f"{name}={get(name)!r}")
