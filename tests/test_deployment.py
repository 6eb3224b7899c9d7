"""The compose file (docker-compose.yml) agrees with the code's configuration: every
service is defined, the DELF_* settings are known and agree between services, the
workers consume their queues, GPU, ports, healthchecks, volumes and start order.

Nothing here needs Docker: the compose file is read with PyYAML (with `${VAR:-default}`
interpolation resolved to its defaults) and the service packages as text. The
Dockerfiles are checked in tests/test_images.py, the requirements in
tests/test_requirements.py; the helpers live in tests/deployment_files.py.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

sys.path.insert(0, str(Path(__file__).parent))

from deployment_files import (  # noqa: E402 - after the sys.path / environment setup above
    COMPOSE_FILE, DELF_SERVICES, INFRA, ROOT, SCALABLE, WORKERS, command_argv, container_port, depends_on,
    dockerfile_instructions, environment, load_compose, option, published_ports, python_files,
    service_package_dir,
)

from delf_common import config  # noqa: E402 - after the sys.path / environment setup above


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


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
def test_workers_consume_their_queue_with_an_existing_celery_app(services, name):
    celery_service, package = WORKERS[name]
    if True:
        service = services[name]
        argv = command_argv(service)
        assert argv[:1] == ["celery"] and "worker" in argv, \
            f"{name}: command should start a Celery worker (`celery -A ... worker ...`), got {argv}"
        prefix = environment(service).get("DELF_QUEUE_PREFIX", config.SETTINGS["DELF_QUEUE_PREFIX"].default)
        from delf_common.contract import queue_name

        expected = queue_name(celery_service, prefix)
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
