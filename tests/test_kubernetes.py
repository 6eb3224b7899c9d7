"""The Kubernetes manifests (deploy/kubernetes/) are valid and agree with the code.

Offline: every manifest listed in kustomization.yaml is validated against the Kubernetes
JSON schemas of the PyPI package `kubernetes-validate` (strict: unknown fields are
errors); KEDA's ScaledObject (a CRD it has no schema for) against a small JSON schema of
the fields used here. Then the cross-checks tests/test_deployment.py makes for compose:
DELF_* variables are settings of delf_common.config and parse, images and commands are
those of the compose services, worker queues and KEDA list names are built like
delf_common.contract.queue_name builds them. The last tests break a manifest on
purpose and expect each check to say so.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

kv = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

from delf_common import config  # noqa: E402 - after the sys.path / environment setup above
from test_deployment import WORKERS, command_argv, load_compose, option  # noqa: E402 - after the sys.path / environment setup above

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "deploy" / "kubernetes"
HELM_VALUES = "milvus-values.yaml"  # helm values for the Milvus chart, not a manifest
DELF_SERVICES = ("gateway", "extractor", "indexer", "verifier")
# The oldest Kubernetes these manifests are checked for, and the newest the package knows.
KUBERNETES_VERSIONS = ("1.28.0", kv.latest_version())
UID = 10001  # the `app` user of every services/*/Dockerfile

_STR_INT = {"type": "string", "pattern": r"^[0-9]+$"}
KEDA_SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "minLength": 1},
                                    "labels": {"type": "object"}}},
        "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string", "minLength": 1}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object"},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {
                        "type": {"const": "redis"},
                        "authenticationRef": {"type": "object", "required": ["name"]},
                        "metadata": {
                            "type": "object", "required": ["address", "listName", "listLength"],
                            "additionalProperties": False,
                            "properties": {"address": {"type": "string", "pattern": r"^[a-z0-9.-]+:[0-9]+$"},
                                           "listName": {"type": "string", "minLength": 1},
                                           "listLength": _STR_INT, "activationListLength": _STR_INT,
                                           "databaseIndex": _STR_INT,
                                           "enableTLS": {"enum": ["true", "false"]}}},
                    }}},
            },
        },
    },
}


# --------------------------------------------------------------------------- loading

def kustomization() -> dict:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


def manifest_files() -> list[Path]:
    return [K8S_DIR / name for name in kustomization()["resources"]]


def load_documents() -> list[tuple[str, dict]]:
    """(file name, object) for every object of every manifest kustomization.yaml lists."""
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [doc for _, doc in load_documents()]


def named(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def main_container(workload: dict) -> dict:
    return pod_spec(workload)["containers"][0]


def config_data(docs: list[dict]) -> dict[str, str]:
    """The data of every ConfigMap, merged (there is one: delf-config)."""
    out: dict[str, str] = {}
    for cm in named(docs, "ConfigMap").values():
        out.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
    return out


def container_env(container: dict, docs: list[dict]) -> dict[str, str | None]:
    """The container's environment: its ConfigMaps (envFrom) then `env` (None: from a Secret)."""
    configmaps = named(docs, "ConfigMap")
    env: dict[str, str | None] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref and ref["name"] in configmaps:
            env.update({k: str(v) for k, v in (configmaps[ref["name"]].get("data") or {}).items()})
    for item in container.get("env") or []:
        env[item["name"]] = str(item["value"]) if "value" in item else None
    return env


def queue_of(worker: str, docs: list[dict]) -> str:
    """The Celery queue of a worker Deployment, with the ConfigMap's DELF_QUEUE_PREFIX."""
    from delf_common.contract import queue_name

    prefix = config_data(docs).get("DELF_QUEUE_PREFIX", config.SETTINGS["DELF_QUEUE_PREFIX"].default)
    return queue_name(WORKERS[worker][0], prefix)


# --------------------------------------------------------------------------- checks

def schema_errors(doc: dict, version: str) -> list[str]:
    """Schema violations of one object: Kubernetes' own schema, or ours for ScaledObject."""
    name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    if doc.get("kind") == "ScaledObject":
        validator = jsonschema.Draft202012Validator(KEDA_SCALED_OBJECT_SCHEMA)
        return [f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(doc)]
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        return [f"{name} (Kubernetes {version}): {'/'.join(map(str, exc.absolute_path))}: {exc.message}"]
    except kv.SchemaNotFoundError as exc:
        return [f"{name}: {exc.message}"]
    return []


def env_problems(docs: list[dict]) -> list[str]:
    """DELF_* keys (ConfigMaps, container env) that are no setting or whose value does not parse."""
    found: list[tuple[str, str, str | None]] = []
    for cm in named(docs, "ConfigMap").values():
        found += [(f"ConfigMap/{cm['metadata']['name']}", k, str(v)) for k, v in (cm.get("data") or {}).items()]
    for kind in ("Deployment", "StatefulSet"):
        for name, workload in named(docs, kind).items():
            for c in pod_spec(workload)["containers"]:
                found += [(f"{kind}/{name}", e["name"], e.get("value")) for e in c.get("env") or []]
    problems = []
    for where, key, value in found:
        if not key.startswith("DELF_"):
            continue
        if key not in config.SETTINGS:
            problems.append(f"{where}: {key} is not a setting of delf_common.config.SETTINGS")
            continue
        try:
            if value is not None:
                config.SETTINGS[key].parse(value)
        except ValueError as exc:
            problems.append(f"{where}: {key}={value!r} does not parse: {exc}")
    return problems


def command_problems(docs: list[dict], compose_services: dict) -> list[str]:
    """Each DELF Deployment runs its compose service's image and command (queue from the ConfigMap)."""
    deployments = named(docs, "Deployment")
    problems = []
    for name in DELF_SERVICES:
        if name not in deployments:
            problems.append(f"no Deployment {name!r}")
            continue
        container, service = main_container(deployments[name]), compose_services[name]
        image = container["image"].rsplit(":", 1)[0]
        if image != service["image"].rsplit(":", 1)[0]:
            problems.append(f"{name}: image {container['image']!r}, compose builds {service['image']!r}")
        expected = command_argv(service)
        if name in WORKERS:
            expected = [queue_of(name, docs) if a == option(expected, "-Q") else a for a in expected]
        argv = [str(a) for a in container.get("command") or []] + [str(a) for a in container.get("args") or []]
        if argv != expected:
            problems.append(f"{name}: command {argv}, expected {expected}")
    return problems


def redis_address(docs: list[dict]) -> tuple[str, int, int]:
    """(Redis Service name, port, database) that DELF_REDIS_URL names."""
    url = config_data(docs)["DELF_REDIS_URL"]
    match = re.fullmatch(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?(?:/(\d+))?", url)
    assert match, f"DELF_REDIS_URL={url!r} is not a redis:// URL"
    return match.group(1), int(match.group(2) or 6379), int(match.group(3) or 0)


def scaling_problems(docs: list[dict]) -> list[str]:
    """Each ScaledObject scales a worker Deployment on its queue, in the Redis the pods use."""
    deployments, services = named(docs, "Deployment"), named(docs, "Service")
    host, port, db = redis_address(docs)
    namespace = kustomization().get("namespace", "default")
    gateway_env = container_env(main_container(deployments["gateway"]), docs) if "gateway" in deployments else {}
    max_queue = int(gateway_env.get("DELF_MAX_QUEUE") or config.SETTINGS["DELF_MAX_QUEUE"].default)
    problems, scaled = [], set()
    for name, so in named(docs, "ScaledObject").items():
        spec = so["spec"]
        target = spec["scaleTargetRef"]["name"]
        if target not in deployments or target not in WORKERS:
            problems.append(f"ScaledObject/{name}: scaleTargetRef {target!r} is no worker Deployment")
            continue
        scaled.add(target)
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if not 1 <= lo <= hi:
            problems.append(f"ScaledObject/{name}: replicas {lo}..{hi}; every search needs one "
                            "worker of each kind, so 1 <= min <= max")
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            if meta["listName"] != queue_of(target, docs):
                problems.append(f"ScaledObject/{name}: listName {meta['listName']!r}, "
                                f"but {target} consumes {queue_of(target, docs)!r}")
            addr_host, _, addr_port = meta["address"].rpartition(":")
            if host not in services or addr_host not in (host, f"{host}.{namespace}.svc",
                                                         f"{host}.{namespace}.svc.cluster.local"):
                problems.append(f"ScaledObject/{name}: address {meta['address']!r} is not the Redis "
                                f"Service {host!r} of namespace {namespace!r}")
            if int(addr_port) != port or int(meta.get("databaseIndex", 0)) != db:
                problems.append(f"ScaledObject/{name}: port/database {addr_port}/{meta.get('databaseIndex', 0)}"
                                f", DELF_REDIS_URL says {port}/{db}")
            if not 0 < int(meta["listLength"]) < max_queue:
                problems.append(f"ScaledObject/{name}: listLength {meta['listLength']} must be below "
                                f"the gateway's DELF_MAX_QUEUE ({max_queue})")
    problems += [f"worker {w!r} has no ScaledObject" for w in sorted(set(WORKERS) - scaled)]
    return problems


def pod_problems(workload: dict) -> list[str]:
    """Resources, non-root user and container hardening of one Deployment or StatefulSet."""
    name = f"{workload['kind']}/{workload['metadata']['name']}"
    spec, problems = pod_spec(workload), []
    security = spec.get("securityContext") or {}
    if not (security.get("runAsNonRoot") and security.get("runAsUser") == UID):
        problems.append(f"{name}: pod securityContext must set runAsNonRoot and runAsUser {UID}")
    for c in spec["containers"]:
        res = c.get("resources") or {}
        for key in ("cpu", "memory"):
            if key not in (res.get("requests") or {}):
                problems.append(f"{name}/{c['name']}: no {key} request")
        if "memory" not in (res.get("limits") or {}):
            problems.append(f"{name}/{c['name']}: no memory limit")
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False or "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
            problems.append(f"{name}/{c['name']}: set allowPrivilegeEscalation: false and drop ALL capabilities")
    return problems


# --------------------------------------------------------------------------- tests

def test_kustomization_lists_every_manifest():
    listed = {p.name for p in manifest_files()}
    missing = [name for name in sorted(listed) if not (K8S_DIR / name).is_file()]
    assert not missing, f"kustomization.yaml lists missing files {missing}"
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml", HELM_VALUES}
    assert on_disk == listed, f"not in kustomization.yaml: {sorted(on_disk - listed)}"
    images = {i["name"] for i in kustomization().get("images") or []}
    assert images == {f"delf/{s}" for s in DELF_SERVICES + ("web",)}, f"kustomization images: {images}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_matches_its_schema(docs, version):
    problems = [p for doc in docs for p in schema_errors(doc, version)]
    assert not problems, "\n".join(problems)


def test_every_object_kind_is_expected(docs):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for name in DELF_SERVICES:
        assert ("Deployment", name) in kinds, f"no Deployment {name}"
    for expected in [("Service", "gateway"), ("Service", "redis"), ("StatefulSet", "redis"),
                     ("ConfigMap", "delf-config")]:
        assert expected in kinds, f"missing {expected}"
    images = [c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
              for c in pod_spec(d)["containers"]]
    assert not [i for i in images if "milvus" in i], "Milvus comes from its Helm chart, not from these manifests"


def test_every_delf_variable_is_a_known_setting_and_parses(docs):
    problems = env_problems(docs)
    assert not problems, "\n".join(problems)


def test_images_and_commands_match_the_compose_services(docs):
    problems = command_problems(docs, load_compose()["services"])
    assert not problems, "\n".join(problems)


def test_workers_scale_on_their_queue_with_keda(docs):
    problems = scaling_problems(docs)
    assert not problems, "\n".join(problems)


def test_every_pod_has_resources_and_runs_as_the_image_user(docs):
    problems = [p for kind in ("Deployment", "StatefulSet") for w in named(docs, kind).values()
                for p in pod_problems(w)]
    assert not problems, "\n".join(problems)


def test_only_the_extractor_asks_for_a_gpu(docs):
    for name, deployment in named(docs, "Deployment").items():
        res = main_container(deployment)["resources"]
        gpu = (res.get("limits") or {}).get("nvidia.com/gpu")
        if name == "extractor":
            assert gpu == 1, f"extractor: limit nvidia.com/gpu to 1 (one worker process per GPU), got {gpu}"
            env = container_env(main_container(deployment), docs)
            assert str(env.get("DELF_DEVICE", "")).startswith("cuda"), "extractor: DELF_DEVICE=cuda"
        else:
            assert gpu is None, f"{name} must not ask for a GPU"


def test_gateway_service_and_probes(docs):
    gateway = main_container(named(docs, "Deployment")["gateway"])
    env = container_env(gateway, docs)
    assert env.get("DELF_GRPC_ADDR") in ("0.0.0.0:50051", "[::]:50051"), "gateway must bind 0.0.0.0:50051"
    ports = {p.get("name"): p["containerPort"] for p in gateway["ports"]}
    assert ports.get("grpc") == 50051 and ports.get("metrics") == int(env["DELF_METRICS_PORT"])
    service = named(docs, "Service")["gateway"]["spec"]
    assert any(p["port"] == 50051 and p["targetPort"] in ("grpc", 50051) for p in service["ports"])
    ready = gateway["readinessProbe"]
    exec_cmd = " ".join((ready.get("exec") or {}).get("command", []))
    assert "delf_gateway.healthcheck" in exec_cmd or (ready.get("grpc") or {}).get("port") == 50051, \
        "gateway readiness: `python -m delf_gateway.healthcheck` or a grpc probe on 50051"
    assert gateway.get("livenessProbe"), "gateway: needs a liveness probe"


def test_redis_persists_and_is_what_every_pod_uses(docs):
    host, port, _ = redis_address(docs)
    assert host == "redis" and any(p["port"] == port for p in named(docs, "Service")["redis"]["spec"]["ports"])
    redis = named(docs, "StatefulSet")["redis"]
    argv = main_container(redis)["command"]
    assert option(argv, "--appendonly") == "yes" and option(argv, "--maxmemory-policy") == "noeviction", argv
    mounts = {m["mountPath"]: m["name"] for m in main_container(redis)["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in redis["spec"].get("volumeClaimTemplates") or []}
    assert mounts.get("/data") in claims, "redis: /data must be a persistent volume claim"
    for name in DELF_SERVICES:
        refs = [s["configMapRef"]["name"] for s in main_container(named(docs, "Deployment")[name]).get("envFrom", [])
                if "configMapRef" in s]
        assert refs == ["delf-config"], f"{name}: take the shared environment from the ConfigMap delf-config"


def test_indexer_uses_the_milvus_of_the_helm_release(docs):
    env = container_env(main_container(named(docs, "Deployment")["indexer"]), docs)
    assert env.get("DELF_MILVUS_URI") == "http://milvus:19530", \
        "indexer: DELF_MILVUS_URI must name the Helm release's Service (empty would be Milvus Lite)"
    values = yaml.safe_load((K8S_DIR / HELM_VALUES).read_text())
    assert values["cluster"]["enabled"] is True, "milvus-values.yaml: distributed mode (cluster.enabled)"
    scaling = (ROOT / "docs" / "SCALING.md").read_text()
    assert "helm install milvus" in scaling and HELM_VALUES in scaling, \
        "docs/SCALING.md must give the helm command with deploy/kubernetes/milvus-values.yaml"


# --------------------------------------------------------------------------- the checks can fail

def broken(docs: list[dict], kind: str, name: str, edit) -> list[dict]:
    out = copy.deepcopy(docs)
    edit(named(out, kind)[name])
    return out


def test_schema_validation_catches_a_broken_deployment(docs):
    def wrong_type(d):
        d["spec"]["replicas"] = "two"

    def unknown_field(d):
        main_container(d)["imagee"] = "typo"

    for edit in (wrong_type, unknown_field):
        bad = named(broken(docs, "Deployment", "gateway", edit), "Deployment")["gateway"]
        assert schema_errors(bad, KUBERNETES_VERSIONS[0]), f"{edit.__name__} was not caught"
    so = named(broken(docs, "ScaledObject", "extractor", lambda d: d["spec"].pop("scaleTargetRef")),
               "ScaledObject")["extractor"]
    assert schema_errors(so, KUBERNETES_VERSIONS[0]), "a ScaledObject without scaleTargetRef passed"


def test_cross_checks_catch_broken_manifests(docs):
    def bad_list(d):
        d["spec"]["triggers"][0]["metadata"]["listName"] = "delf.extrct"

    def bad_target(d):
        d["spec"]["scaleTargetRef"]["name"] = "gateway"

    for edit in (bad_list, bad_target):
        assert scaling_problems(broken(docs, "ScaledObject", "extractor", edit)), f"{edit.__name__} passed"

    def unknown_setting(d):
        d["data"]["DELF_NOT_A_SETTING"] = "1"

    def bad_value(d):
        d["data"]["DELF_LOG_FORMAT"] = "xml"

    for edit in (unknown_setting, bad_value):
        assert env_problems(broken(docs, "ConfigMap", "delf-config", edit)), f"{edit.__name__} passed"

    def wrong_queue(d):
        d["data"]["DELF_QUEUE_PREFIX"] = "other"  # the workers' -Q and list names still say delf

    renamed = broken(docs, "ConfigMap", "delf-config", wrong_queue)
    assert command_problems(renamed, load_compose()["services"]) and scaling_problems(renamed)

    def root(d):
        pod_spec(d)["securityContext"]["runAsUser"] = 0

    assert pod_problems(named(broken(docs, "Deployment", "verifier", root), "Deployment")["verifier"])
