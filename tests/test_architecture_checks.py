"""The self-tests of tests/test_architecture.py's checkers: each one run on deliberately bad
snippets in a temporary folder, so a rule cannot pass because its checker saw nothing."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_architecture import (  # the checkers, not their tests
    import_cycles, long_functions, long_modules, module_name, shared_imports_upward, unjustified_noqas,
)
from test_architecture_seams import (
    INDEXER, backend_branches, re_exports, settings_reads_outside_settings, shared_settings_reads,
)


def test_self_check_noqa(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os  # noqa: F401 - re-exported\nimport re  # noqa\nimport io  # noqa: F401\n")
    assert [line.split(":")[1] for line in unjustified_noqas(tmp_path, [f])] == ["2", "3"]


def _write(root: Path, relpath: str, text: str) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _function(name: str, lines: int, indent: str = "") -> str:
    """A function of exactly `lines` lines, decorated (the decorator does not count)."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 2))
    return f"{indent}@staticmethod\n{indent}def {name}():\n{body}{indent}    return 0\n"


def test_self_check_sizes(tmp_path):
    ok = _write(tmp_path, "services/a/delf_indexer/ok.py",
                _function("fits", 60) + "class C:\n" + _function("fits_too", 60, "    "))
    bad = _write(tmp_path, "services/a/delf_indexer/bad.py",
                 "class C:\n" + _function("too_long", 61, "    ") + _function("outer", 5))
    big = _write(tmp_path, "shared/delf_common/big.py", "x = 1\n" * 501)
    edge = _write(tmp_path, "shared/delf_common/edge.py", "x = 1\n" * 500)
    assert long_functions(tmp_path, [ok]) == []
    assert long_functions(tmp_path, [bad]) == ["services/a/delf_indexer/bad.py:3: C.too_long() is 61 lines"]
    assert long_modules(tmp_path, [big, edge]) == ["shared/delf_common/big.py:1: 501 lines"]


def test_self_check_cycles(tmp_path):
    files = [
        _write(tmp_path, "services/x/delf_extractor/__init__.py", ""),
        _write(tmp_path, "services/x/delf_extractor/extract.py", "from delf_extractor import pca\n"),
        # the cycle closes inside a function and through a relative import
        _write(tmp_path, "services/x/delf_extractor/pca.py", "def f():\n    from .extract import g\n"),
        _write(tmp_path, "services/x/delf_extractor/models.py",
               "import delf_extractor.pca\nimport delf_extractor.typed\n"),
        _write(tmp_path, "services/x/delf_extractor/typed.py",
               "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from delf_extractor import models\n"),
        _write(tmp_path, "shared/delf_common/config.py", "import os\n"),
    ]
    assert import_cycles(tmp_path, files) == [
        "cycle delf_extractor.extract <-> delf_extractor.pca:\n"
        "    services/x/delf_extractor/extract.py:1: delf_extractor.extract imports delf_extractor.pca\n"
        "    services/x/delf_extractor/pca.py:2: delf_extractor.pca imports delf_extractor.extract"]
    # models -> pca and the type-only typed -> models make no cycle
    assert import_cycles(tmp_path, [f for f in files if f.name != "pca.py"]) == []


def test_self_check_upward_imports(tmp_path):
    files = [
        _write(tmp_path, "shared/delf_common/__init__.py", ""),
        _write(tmp_path, "shared/delf_common/cli.py",
               "import os\nfrom . import config\n\ndef main():\n    from delf_indexer.store import S\n"),
        _write(tmp_path, "shared/delf_common/config.py", "import delf_tools.manifest as m\n"),
        _write(tmp_path, "services/g/delf_gateway/server.py", "from delf_common import config\n"),
    ]
    assert shared_imports_upward(tmp_path, files) == [
        "shared/delf_common/cli.py:5: delf_common.cli imports delf_indexer.store.S",
        "shared/delf_common/config.py:1: delf_common.config imports delf_tools.manifest"]


def test_self_check_module_names():
    assert module_name(Path("services/gateway/delf_gateway/server.py")) == "delf_gateway.server"
    assert module_name(Path("shared/delf_common/__init__.py")) == "delf_common"
    assert module_name(Path("tools/delf_tools/cli.py")) == "delf_tools.cli"
    assert module_name(Path("tests/test_shared.py")) is None


def test_self_check_settings_reads(tmp_path):
    files = [
        _write(tmp_path, "services/v/delf_verifier/settings.py", "x = config.get('DELF_RATIO')\n"),
        _write(tmp_path, "services/v/delf_verifier/tasks.py",
               "def f(options):\n    return options.get('k') or config.get('DELF_RATIO')\n"
               "y = config.milvus_uri()\nz = config.read_pem('DELF_TLS_CERT', 'a.pem')\n"),
        _write(tmp_path, "tools/delf_tools/cli.py", "x = config.get('DELF_GATEWAY')\n"),
    ]
    assert settings_reads_outside_settings(tmp_path, files) == [
        "services/v/delf_verifier/tasks.py:2: config.get(...)",
        "services/v/delf_verifier/tasks.py:3: config.milvus_uri(...)"]


def test_self_check_re_exports(tmp_path):
    files = [
        _write(tmp_path, "services/g/delf_gateway/server.py",
               "from delf_gateway.checks import (  # noqa: F401 - re-exported: their former home\n"
               "    check_photo,\n)\n"
               "import delf_gateway.tasks  # noqa: F401 - registers its tasks on the shared app\n"
               "import delf_gateway.more  # noqa: F401 - the old name\n"
               "from delf_gateway import tasks  # noqa: F401 - registers its tasks (a from-import binds a name)\n"
               "import os  # noqa: E402 - after the path setup\n"),
        _write(tmp_path, "shared/delf_common/images.py",
               "from delf_common.contract import NOT_FOUND  # noqa: F401 - importable from here\n"
               "from delf_common.contract import X  # noqa: F401 - kept for now\n"),
        _write(tmp_path, "tools/delf_tools/cli.py", "from delf_tools.cli_index import _client  # noqa: F401, E402 - x\n"),
        _write(tmp_path, "services/i/delf_indexer/store.py", "from a import b  # noqa: F401 - re-exported\n"),
        _write(tmp_path, "tests/probe.py", "from a import b  # noqa: F401 - a fixture\n"),
        _write(tmp_path, "scripts/bench.py", "from a import b  # noqa: F401 - re-exported\n"),
    ]
    found = re_exports(tmp_path, files, skipped=("services/i/",),
                       temporary={("shared/delf_common/images.py", "kept for now")})
    assert [":".join(line.split(":")[:2]) for line in found] == [
        "services/g/delf_gateway/server.py:1", "services/g/delf_gateway/server.py:5",
        "services/g/delf_gateway/server.py:6", "shared/delf_common/images.py:1", "tools/delf_tools/cli.py:1"]
    assert len(re_exports(tmp_path, files)) == 7  # nothing skipped or temporary: the indexer's and images' count


def test_self_check_shared_settings_reads(tmp_path):
    files = [
        _write(tmp_path, "shared/delf_common/images.py",
               "class ImageLimits:\n    @classmethod\n    def from_env(cls):\n        return config.get('A')\n"
               "def check_size(data, max_bytes=None):\n"
               "    return max_bytes if max_bytes is not None else config.get('DELF_MAX_IMAGE_BYTES')\n"
               "PREFIX = _config.get('DELF_QUEUE_PREFIX')\n"),
        _write(tmp_path, "services/g/delf_gateway/settings.py", "x = config.get('DELF_GRPC_ADDR')\n"),
    ]
    assert shared_settings_reads(tmp_path, files) == [
        "shared/delf_common/images.py:4: images:ImageLimits.from_env",
        "shared/delf_common/images.py:6: images:check_size",
        "shared/delf_common/images.py:7: images:<module>"]


def test_self_check_backend_branches(tmp_path):
    files = [_write(tmp_path, INDEXER + "store.py", "if self.lite:\n    x = kind == 'server'\n"
                    "from delf_indexer.backends.lite import LiteBackend\n"),
             _write(tmp_path, INDEXER + "backends/lite.py", "if self.lite:\n    pass\n"),
             _write(tmp_path, INDEXER + "tasks.py", "from delf_indexer.backends.base import Hits\n")]
    assert backend_branches(tmp_path, files, {"lite", "server"}) == [
        f"{INDEXER}store.py:1: lite", f"{INDEXER}store.py:2: kind", f"{INDEXER}store.py:2: server",
        f"{INDEXER}store.py:3: LiteBackend", f"{INDEXER}store.py:3: delf_indexer.backends.lite"]
