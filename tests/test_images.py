"""The service images: each services/*/Dockerfile is the one compose builds, copies only
what exists and is not ignored, runs as a non-root user, starts the same worker as
compose, and only the extractor's carries torch; .dockerignore keeps the context small.

Nothing here needs Docker: the Dockerfiles and requirements are read as text (helpers
in tests/deployment_files.py).
"""
from __future__ import annotations

import fnmatch
import re
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from deployment_files import (
    DELF_SERVICES, GPU_PACKAGES, PACKAGES, PROJECT_PACKAGES, ROOT, WORKERS, command_argv, dockerfile_instructions,
    dockerfile_of, python_files,
    load_compose, option, requirement_names, service_package_dir,
)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


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


@pytest.mark.parametrize("name", DELF_SERVICES + ("web",))
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
def test_dockerfile_default_command_matches_compose(services, name):
    """`docker run` of the bare image starts the same worker as compose."""
    import json

    cmds = [a for i, a in dockerfile_instructions(ROOT / "services" / name / "Dockerfile") if i == "CMD"]
    if not cmds:
        return
    argv = json.loads(cmds[-1]) if cmds[-1].startswith("[") else shlex.split(cmds[-1])
    from delf_common import config
    from delf_common.contract import queue_name

    default = config.SETTINGS["DELF_QUEUE_PREFIX"].default
    assert option(argv, "-Q", "--queues") == queue_name(WORKERS[name][0], default), \
        f"services/{name}/Dockerfile: CMD should consume {queue_name(WORKERS[name][0], default)!r}, got {argv}"
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


def _project_imports(folder: Path) -> set[str]:
    """The project's top-level packages that the modules under `folder` import."""
    import ast

    found = set()
    for path in python_files(folder):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            found.update(n.split(".")[0] for n in names if n.split(".")[0] in PROJECT_PACKAGES)
    return found


@pytest.mark.parametrize("name", DELF_SERVICES + ("web",))
def test_an_image_copies_only_the_packages_its_service_imports(services, name):
    """The image carries exactly the project packages its service runs: its own and what
    that imports (the shared library, which imports no service or tool), nothing else."""
    _, dockerfile = dockerfile_of(services, name)
    sources = {s.rstrip("/") for i, a in dockerfile_instructions(dockerfile) if i in ("COPY", "ADD")
               and "--from" not in a for s in copy_sources(a)}
    by_folder = {folder.relative_to(ROOT).as_posix(): pkg for pkg, folder in PROJECT_PACKAGES.items()}
    copied = {by_folder[s] for s in sources if s in by_folder}
    own = PACKAGES[name]
    needed = {own} | _project_imports(service_package_dir(name))
    needed |= {p for pkg in set(needed) for p in _project_imports(PROJECT_PACKAGES[pkg])}
    assert copied == needed, f"services/{name}/Dockerfile copies {sorted(copied)}; {own} runs {sorted(needed)}"
    assert "delf_tools" not in needed, f"{own} imports the tools"
