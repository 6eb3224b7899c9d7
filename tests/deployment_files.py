"""What the deployment tests read: docker-compose.yml (with `${VAR:-default}`
interpolation resolved to its defaults), the Dockerfiles and requirements files as
text, and where each service's package lives (pyproject's package-dir).

Used by tests/test_deployment.py (the compose file), tests/test_monitoring.py (its
`monitoring` profile: Prometheus, Grafana and the dashboard), tests/test_images.py (the
Dockerfiles), tests/test_requirements.py (requirements vs imports) and
tests/test_kubernetes.py.
"""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"

INFRA = ("redis", "etcd", "minio", "milvus")
DELF_SERVICES = ("gateway", "extractor", "indexer", "verifier")
WORKERS = {  # compose service -> (Celery service name of delf_common.celery_app, package)
    "extractor": ("extract", "delf_extractor"),
    "indexer": ("index", "delf_indexer"),
    "verifier": ("verify", "delf_verifier"),
}
PACKAGES = {"gateway": "delf_gateway", "web": "delf_web", **{s: pkg for s, (_, pkg) in WORKERS.items()}}
SCALABLE = tuple(WORKERS)
MONITORING = ("prometheus", "grafana")  # the services of the `monitoring` profile
GPU_PACKAGES = {"torch", "torchvision", "torchaudio", "triton", "xformers"}


# --------------------------------------------------------------------------- helpers

_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value):
    """Compose's `${VAR:-default}` interpolation, every variable unset (its default)."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            if m.group(4):  # $VAR, unset
                return ""
            op, default = m.group(2), m.group(3)
            return default if op in (":-", "-") else ""
        return _INTERPOLATION.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def load_compose() -> dict:
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    with COMPOSE_FILE.open() as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), \
        "docker-compose.yml has no `services:` mapping"
    return interpolate(data)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def command_argv(service: dict) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def option(argv: list[str], *names: str) -> str | None:
    """Value of `-Q x`, `-Qx`, `--queues x` or `--queues=x` in a command line."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg[len(name) + 1:]
            if not name.startswith("--") and arg.startswith(name) and len(arg) > len(name):
                return arg[len(name):]
    return None


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short form: no condition
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def published_ports(service: dict) -> list[str]:
    """Port entries that publish on the host (everything under `ports:`)."""
    return [str(p) for p in service.get("ports") or []]


def container_port(entry) -> int:
    if isinstance(entry, dict):
        return int(entry["target"])
    text = str(entry).split("/")[0]
    return int(text.rsplit(":", 1)[-1])


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount (a source starting with . or /)."""
    out = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            source, target = str(volume.get("source", "")), str(volume.get("target", ""))
        else:
            source, target = (str(volume).split(":") + [""])[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def package_dirs() -> dict[str, Path]:
    """Top-level project package -> its source folder, from pyproject's package-dir."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items() if "." not in name}


PROJECT_PACKAGES = package_dirs()


def service_package_dir(service: str) -> Path:
    return PROJECT_PACKAGES[PACKAGES[service]]


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts) if folder.is_dir() else []


def dockerfile_of(services: dict, name: str) -> tuple[Path, Path]:
    build = services[name].get("build")
    assert build, f"service {name!r} has no `build:`; it must build services/{name}/Dockerfile"
    if isinstance(build, str):
        context, dockerfile = ROOT / build, "Dockerfile"
    else:
        context, dockerfile = ROOT / build.get("context", "."), build.get("dockerfile", "Dockerfile")
    return context.resolve(), (context / dockerfile).resolve()


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    if current:
        lines.append(current)
    out = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def requirement_names(path: Path) -> set[str]:
    names = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        assert match, f"{path.relative_to(ROOT)}: cannot read requirement {raw!r}"
        names.add(normalize(match.group(0)))
    return names


def normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()

