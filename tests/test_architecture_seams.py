"""The seams of issue 23, checked on the repository's hand-written Python (the files and
helpers of tests/test_architecture.py; self-tests in tests/test_architecture_checks.py).

* no re-export: in services/, shared/ and tools/ a noqa for F401 (an import the module
  itself does not use) marks only a side-effect import, a plain ``import a.b`` whose reason
  starts with "registers" (``import delf_x.tasks  # noqa: F401 - registers its tasks on the
  shared app``); a name is imported from the module that defines it;
* settings are read once: in a service package (services/*/delf_*/) the environment's
  settings are read (``config.get(...)``, ``config.milvus_uri()``, ``config.data_dir()``)
  only in a module named ``settings.py``, where the service's frozen settings objects are
  built; everything else is handed those objects. In the shared library
  (shared/delf_common) they are read only in the functions of ``SHARED_SETTINGS_READERS``,
  where a settings object or a long-lived object (an app, a store, a client, a handler) is
  built: a new read elsewhere fails until it is passed in;
* storage backends: only ``delf_indexer/backends/`` names a backend or branches on its
  kind, and every registered backend class implements ``StorageBackend``.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_architecture import FILES, NOQA, ROOT, rel, report

SETTINGS_READS = ("get", "milvus_uri", "data_dir")  # the functions of delf_common.config that read the environment


def settings_reads_outside_settings(root: Path, files: list[Path]) -> list[str]:
    """Reads of the environment's settings (``config.get(...)`` and the like) in a service
    package's module other than its ``settings.py``."""
    out = []
    for path in files:
        parts = rel(path, root).split("/")
        if parts[0] != "services" or len(parts) < 4 or not parts[2].startswith("delf_") or path.name == "settings.py":
            continue
        calls = [node.func for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.Call)]
        out += [f"{rel(path, root)}:{func.lineno}: config.{func.attr}(...)"
                for func in sorted(calls, key=lambda f: f.lineno)
                if isinstance(func, ast.Attribute) and func.attr in SETTINGS_READS
                and isinstance(func.value, ast.Name) and func.value.id == "config"]
    return out


INDEXER = "services/indexer/delf_indexer/"
BACKEND_NAMES = {"lite", "server", "is_lite_uri", "LITE_INDEXES", "SERVER_INDEXES", "_fast", "fast",
                 "release_server", "_lite_snapshot", "LiteFastPath", "LiteBackend", "ServerBackend", "kind"}


def backend_branches(root: Path, files: list[Path], kinds: set[str]) -> list[str]:
    """In delf_indexer outside backends/: names of a backend (attributes, variables, imports
    of a backend's module) and comparisons with a backend's kind ("lite" == ...)."""
    out = []
    for path in files:
        where = rel(path, root)
        if not where.startswith(INDEXER) or where.startswith(INDEXER + "backends/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.attr] if isinstance(node, ast.Attribute) else [node.id] if isinstance(node, ast.Name)
                     else [a.asname or a.name for a in node.names] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("delf_indexer.backends."):
                names.append(node.module)
            if isinstance(node, ast.Compare):
                names += [c.value for c in [node.left, *node.comparators]
                          if isinstance(c, ast.Constant) and c.value in kinds]
            out += [(where, node.lineno, name) for name in names
                    if name in BACKEND_NAMES | kinds or name.startswith("delf_indexer.backends.")
                    and name != "delf_indexer.backends.base"]
    return [f"{where}:{line}: {name}" for where, line, name in sorted(out)]


# Where the shared library reads the environment's settings: module:function, each one
# building a settings object or a long-lived object, once (a process, an app, a store).
SHARED_SETTINGS_READERS = {
    "celery_app:broker_transport_options": "make_app's",
    "celery_app:make_app": "the Celery app",
    "celery_app:Heartbeat.__init__": "a worker's heartbeat thread",
    "celery_app:Heartbeat.start": "its Redis connection",
    "client:DelfClient.__init__": "a client",
    "fetch:FetchPolicy.from_env": "a service's settings",
    "images:ImageLimits.from_env": "a service's settings",
    "jobs:JobTimings.from_env.read": "a JobStore's",
    "jobs:JobStore.__init__": "a JobStore",
    "logs:formatter": "logs.setup's handler",
    "logs:setup": "the process's logging",
    "metrics:_multiprocess_setup": "at import, once per process",
    "metrics:start_server": "the /metrics server",
    "tracing:mode": "tracing.setup's",
}


def shared_settings_reads(root: Path, files: list[Path]) -> list[str]:
    """`module:function` (dotted for methods and nested functions, `<module>` at the top
    level) of every settings read (``config.get(...)`` and the like) in shared/delf_common,
    as `where: module:function`."""
    out = []

    def visit(node: ast.AST, scope: list[str], path: Path) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, scope + [child.name], path)
                continue
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and child.func.attr in SETTINGS_READS and isinstance(child.func.value, ast.Name)
                    and child.func.value.id in ("config", "_config")):
                out.append(f"{rel(path, root)}:{child.lineno}: {path.stem}:{'.'.join(scope) or '<module>'}")
            visit(child, scope, path)

    for path in files:
        if rel(path, root).startswith("shared/delf_common/"):
            visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), [], path)
    return out


RE_EXPORT_FOLDERS = ("services", "shared", "tools")
SIDE_EFFECT_REASON = re.compile(r"registers\b")


def re_exports(root: Path, files: list[Path], skipped: tuple[str, ...] = (),
               temporary: set[tuple[str, str]] = frozenset()) -> list[str]:
    """noqa-for-F401 lines in services/, shared/ or tools/ that are not a side-effect import:
    a plain `import a.b` (not `from`) whose reason starts with "registers"."""
    out = []
    for path in files:
        name = rel(path, root)
        if name.split("/")[0] not in RE_EXPORT_FOLDERS or name.startswith(skipped):
            continue
        text = path.read_text(encoding="utf-8")
        statements = {node.lineno: node for node in ast.walk(ast.parse(text, str(path))) if isinstance(node, ast.stmt)}
        for n, line in enumerate(text.splitlines(), 1):
            m = NOQA.search(line)
            codes, _, reason = (m.group("rest").partition(" - ") if m else ("", "", ""))
            if "F401" not in codes or (name, reason.strip()) in temporary:
                continue
            if not (isinstance(statements.get(n), ast.Import) and SIDE_EFFECT_REASON.match(reason.strip())):
                out.append(f"{name}:{n}: {line.strip()}")
    return out


def test_no_re_exports_only_side_effect_imports():
    offenders = re_exports(ROOT, FILES)
    if offenders:
        pytest.fail(report("unused imports kept under `noqa: F401` (import the name from its home module; "
                           "a side-effect import is `import a.b  # noqa: F401 - registers ...`)", offenders),
                    pytrace=False)


def test_services_read_settings_only_where_settings_objects_are_built():
    offenders = settings_reads_outside_settings(ROOT, FILES)
    if offenders:
        pytest.fail(report("settings read outside a service's settings.py (add a field to its settings "
                           "object and pass the object down)", offenders), pytrace=False)


def test_only_the_backends_name_a_backend():
    from delf_indexer.backends import BACKENDS

    offenders = backend_branches(ROOT, FILES, set(BACKENDS))
    if offenders:
        pytest.fail(report("backend names outside delf_indexer/backends/ (give StorageBackend a method)",
                           offenders), pytrace=False)


def test_every_registered_backend_implements_the_protocol():
    import inspect

    from delf_indexer.backends import BACKENDS, backend_for
    from delf_indexer.backends.base import StorageBackend

    members = [n for n, v in vars(StorageBackend).items() if isinstance(v, classmethod) or inspect.isfunction(v)
               if not n.startswith("_")]
    assert {"knn", "insert", "image_rows", "settle", "close", "index_settings"} <= set(members)
    for kind, cls in BACKENDS.items():
        assert cls.kind == kind and isinstance(cls.index_types, tuple) and isinstance(cls.sole_writer, bool)
        for name in members:
            ours, theirs = inspect.signature(getattr(StorageBackend, name)), inspect.signature(getattr(cls, name))
            assert list(theirs.parameters) == list(ours.parameters), f"{cls.__name__}.{name}{theirs}"
        assert list(inspect.signature(cls).parameters) == [
            "uri", "token", "settings", "features_name", "lock", "index", "warm"], cls
    assert backend_for("http://milvus:19530").kind == "server" and backend_for("/data/milvus.db").kind == "lite"


def test_the_shared_library_reads_settings_only_where_long_lived_objects_are_built():
    reads = shared_settings_reads(ROOT, FILES)
    offenders = [r for r in reads if r.split(": ", 1)[1] not in SHARED_SETTINGS_READERS]
    if offenders:
        pytest.fail(report("settings read in shared/delf_common outside SHARED_SETTINGS_READERS (take the "
                           "value as a parameter, from the calling service's settings object)", offenders),
                    pytrace=False)
    stale = sorted(set(SHARED_SETTINGS_READERS) - {r.split(": ", 1)[1] for r in reads})
    assert not stale, f"SHARED_SETTINGS_READERS names functions that no longer read settings: {stale}"
