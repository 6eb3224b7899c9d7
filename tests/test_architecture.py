"""The structural rules of issue 12, checked on the repository's hand-written Python.

* no module over 500 lines;
* no function or method over 60 lines (from its `def` line to its last line,
  docstring included, decorators not);
* no import cycle among the modules of the project's own packages (imports inside
  functions count: they still tie the two modules together);
* the shared library (shared/delf_common) imports no service package and no tool:
  arrows point from tools to services to shared, never up;
* the seams of issue 23 (re-exports, where settings are read, storage backends):
  tests/test_architecture_seams.py, with these files and helpers.

"Hand-written": every .py file git knows (tracked, or new and not ignored) under
shared/, services/, tools/, scripts/ and tests/, except the generated gRPC stubs
(`*_pb2.py`, `*_pb2_grpc.py`). Each failure lists every offender as file:line.

The checkers are plain functions over a folder, so their self-tests
(tests/test_architecture_checks.py) run them on deliberately bad snippets: the rules
cannot pass because the checker saw nothing.
"""
from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_FOLDERS = ("shared", "services", "tools", "scripts", "tests")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
PROJECT_PACKAGES = ("delf_common", "delf_tools", "delf_extractor", "delf_indexer",
                    "delf_verifier", "delf_gateway", "delf_web")
SHARED_PACKAGE = "delf_common"
ABOVE_SHARED = ("delf_extractor", "delf_indexer", "delf_verifier", "delf_gateway", "delf_web", "delf_tools")


# --------------------------------------------------------------------------- files


def hand_written_files(root: Path) -> list[Path]:
    """The .py files git knows under the scanned folders (tracked, or untracked and
    not ignored, so a new module is checked before its first commit), generated
    stubs left out. Outside a git checkout: every .py file under those folders."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SCANNED_FOLDERS],
            cwd=root, check=True, capture_output=True, text=True).stdout.splitlines()
        paths = [root / line for line in listed]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for folder in SCANNED_FOLDERS for p in (root / folder).rglob("*.py")
                 if ".venv" not in p.parts]
    return sorted({p for p in paths
                   if p.suffix == ".py" and p.is_file() and not p.name.endswith(GENERATED_SUFFIXES)})


def rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def module_name(path: Path) -> str | None:
    """`services/gateway/delf_gateway/server.py` -> `delf_gateway.server`; None for a
    file outside the project's packages (tests, scripts)."""
    parts = list(path.with_suffix("").parts)
    for i in range(len(parts) - 1, -1, -1):  # the innermost project package folder
        if parts[i] in PROJECT_PACKAGES:
            name = parts[i:]
            if name[-1] == "__init__":
                name = name[:-1]
            return ".".join(name)
    return None


# --------------------------------------------------------------------------- sizes


def long_modules(root: Path, files: list[Path], limit: int = MAX_MODULE_LINES) -> list[str]:
    out = []
    for path in files:
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{rel(path, root)}:1: {n} lines")
    return out


def long_functions(root: Path, files: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function and method (nested ones too) longer than `limit` lines, counted
    from its `def` line (ast's lineno, which leaves decorators out) to its last line."""
    out = []

    def visit(node: ast.AST, prefix: str, path: Path) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    n = child.end_lineno - child.lineno + 1
                    if n > limit:
                        out.append(f"{rel(path, root)}:{child.lineno}: {qualname}() is {n} lines")
                visit(child, qualname + ".", path)
            else:
                visit(child, prefix, path)

    for path in files:
        visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "", path)
    return out


# --------------------------------------------------------------------------- imports


@dataclasses.dataclass(frozen=True)
class Import:
    """One import statement's target, where it stands, and whether it only runs for
    type checkers (`if TYPE_CHECKING:`), which does not make a runtime cycle."""

    source: str  # the importing module
    target: str  # the absolute dotted name imported (a module, or a package's attribute)
    where: str  # file:line
    type_only: bool


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_in(path: Path, module: str, root: Path) -> list[Import]:
    """Every import in the module, at any depth (inside functions too)."""
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        where = f"{rel(path, root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found.extend(Import(module, alias.name, where, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            for alias in node.names:
                target = base if alias.name == "*" else f"{base}.{alias.name}"
                found.append(Import(module, target, where, type_only))
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)
    return found


def project_imports(root: Path, files: list[Path]) -> tuple[set[str], list[Import]]:
    """The project's modules and every import made by one of them."""
    modules = {name: path for path in files if (name := module_name(path)) is not None}
    imports = [imp for name, path in modules.items() for imp in imports_in(path, name, root)]
    return set(modules), imports


def resolve(target: str, modules: set[str]) -> str | None:
    """The project module an import reaches: the longest known prefix of `target`
    (`from a.b import c` reaches module a.b.c when there is one, else a.b)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components of `graph`."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def import_cycles(root: Path, files: list[Path]) -> list[str]:
    """One entry per cycle (a strongly connected component of more than one module),
    listing the imports inside it as file:line."""
    modules, imports = project_imports(root, files)
    edges: dict[tuple[str, str], list[str]] = {}
    for imp in imports:
        target = resolve(imp.target, modules)
        if target is not None and target != imp.source and not imp.type_only:
            edges.setdefault((imp.source, target), []).append(imp.where)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for source, target in edges:
        graph[source].add(target)
    out = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue
        members = set(component)
        lines = [f"{where}: {source} imports {target}"
                 for (source, target), wheres in sorted(edges.items())
                 if source in members and target in members for where in wheres]
        out.append(f"cycle {' <-> '.join(component)}:\n    " + "\n    ".join(lines))
    return out


def shared_imports_upward(root: Path, files: list[Path]) -> list[str]:
    """Imports from a module of the shared library into a service package or the tools."""
    _, imports = project_imports(root, files)
    return [f"{imp.where}: {imp.source} imports {imp.target}"
            for imp in imports
            if imp.source.split(".")[0] == SHARED_PACKAGE and imp.target.split(".")[0] in ABOVE_SHARED]


def report(title: str, offenders: list[str]) -> str:
    return f"{len(offenders)} {title}:\n  " + "\n  ".join(offenders)


# --------------------------------------------------------------------------- the rules


FILES = hand_written_files(ROOT)


def test_the_checks_see_the_project():
    names = {module_name(p) for p in FILES}
    assert {"delf_common.config", "delf_common.client"} <= names, "the file listing missed shared/"
    assert any(p.parts[-2] == "tests" for p in FILES), "the file listing missed tests/"
    assert not any(p.name.endswith(GENERATED_SUFFIXES) for p in FILES)


def test_no_module_is_over_500_lines():
    offenders = long_modules(ROOT, FILES)
    if offenders:
        pytest.fail(report(f"modules over {MAX_MODULE_LINES} lines (split by concern)", offenders), pytrace=False)


def test_no_function_is_over_60_lines():
    offenders = long_functions(ROOT, FILES)
    if offenders:
        pytest.fail(report(f"functions over {MAX_FUNCTION_LINES} lines", offenders), pytrace=False)


NOQA = re.compile(r"#\s*noqa\b(?P<rest>.*)$")
JUSTIFIED_NOQA = re.compile(r":\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*\s+-\s+\S")


def unjustified_noqas(root: Path, files: list[Path]) -> list[str]:
    """noqa comments that do not name their rule codes and say why (as `noqa: E402 - why`)."""
    out = []
    for path in files:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            m = NOQA.search(line)
            if m and not JUSTIFIED_NOQA.match(m.group("rest")):
                out.append(f"{rel(path, root)}:{n}: {line.strip()}")
    return out


def test_every_noqa_names_its_rule_and_says_why():
    # ruff (pyproject.toml) runs in CI and reports a noqa that silences nothing (RUF100).
    offenders = unjustified_noqas(ROOT, FILES)
    if offenders:
        pytest.fail(report("noqa comments without codes and a reason", offenders), pytrace=False)


# The folders where a noqa for F401 is held to the side-effect rule: the project's packages.

def test_no_import_cycle_among_the_project_modules():
    offenders = import_cycles(ROOT, FILES)
    if offenders:
        pytest.fail(report("import cycles", offenders), pytrace=False)


def test_the_shared_library_imports_no_service_and_no_tool():
    offenders = shared_imports_upward(ROOT, FILES)
    if offenders:
        pytest.fail(report("imports from shared/delf_common up into services or tools", offenders), pytrace=False)
