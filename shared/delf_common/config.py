"""Configuration of every service, read from the environment.

Every setting has a default that runs on one machine (the embedded default that
`make up` starts). The README's configuration table is generated from
``SETTINGS`` below (``python -m delf_common.config --markdown``), so the two
cannot drift apart.
"""
from __future__ import annotations

import dataclasses
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
        Setting("DELF_COLLECTION", "delf", str,
                "Name prefix of the Milvus collections (`<name>_features`, `<name>_images`).", "indexer"),
        Setting("DELF_MODEL", "effnet-lite0", str,
                "Extractor model configuration (`effnet-lite0`, `delf-resnet50`).", "extractor, gateway (stats)"),
        Setting("DELF_DEVICE", "auto", str,
                "Torch device for the extractor: `auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`.",
                "extractor"),
        Setting("DELF_WEIGHTS_DIR", "", str,
                "Folder searched for weight files (e.g. torchvision's `resnet50-11ad3fa6.pth`); "
                "the torch hub cache is searched too.", "extractor"),
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
        Setting("DELF_WORKER_BATCH", 8, int,
                "Most photos an extractor worker takes from its queue at once.", "extractor"),
        Setting("DELF_VISIBILITY_TIMEOUT_S", 3600.0, float,
                "Seconds before a task taken by a worker that died without acknowledging it "
                "(killed, out of memory, host lost) is handed to another worker; keep it above the "
                "longest task, retries included. A warm shutdown (SIGTERM) hands tasks back at once.",
                "extractor, indexer, verifier"),
        Setting("DELF_MAX_QUEUE", 1000, int,
                "Most tasks waiting in one service's queue: beyond it the gateway answers searches and "
                "`AddImage` with RESOURCE_EXHAUSTED, refuses new ingest jobs and slows running ones "
                "(it waits, within the caller's deadline, before sending the next photo).", "gateway"),
        Setting("DELF_METRICS_PORT", 0, int,
                "Port of the Prometheus `/metrics` HTTP endpoint of each service (gateway and workers). "
                "0: off (the local default).", "gateway, extractor, indexer, verifier"),
        Setting("DELF_LOG_LEVEL", "INFO", str, "Log level of every service.", "all"),
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
        default = os.pathsep.join(s.default) if isinstance(s.default, tuple) else s.default
        lines.append(f"| `{s.env}` | `{default}` | {s.services} | {s.help} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    if "--markdown" in sys.argv:
        print(markdown_table())
    else:
        for name in SETTINGS:
            print(f"{name}={get(name)!r}")
