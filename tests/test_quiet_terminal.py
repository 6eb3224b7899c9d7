"""Issue 22, item 7: a quiet terminal. `delf up` (and `make up`) shows a few lines (where the
logs are, ready and the gateway's address) and the services' problems; their output, task
lines included, goes to DATA_DIR/logs. Milvus Lite's harmless AllocTimestamp errors: every
index build logged "Exception calling application: Method not implemented!" at ERROR with a
traceback (Lite's in-process server leaves the RPC to the generated base class, which
raises); `lite_patches.quiet_alloc_timestamp` answers the same UNIMPLEMENTED status without
raising, so nothing is logged and pymilvus goes on as before."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import system_env
from delf_common.client import DelfClient
from photos import jpeg, sample_photo

MAX_TERMINAL_LINES = 15  # what `delf up` says: logs, broker, services, ready, stop; no task lines


def test_an_index_build_on_milvus_lite_logs_no_error(tmp_path, caplog):
    from pymilvus import MilvusClient

    from delf_indexer.backends.lite_patches import quiet_alloc_timestamp

    assert quiet_alloc_timestamp() and quiet_alloc_timestamp()  # idempotent
    with caplog.at_level(logging.WARNING):
        client = MilvusClient(str(tmp_path / "quiet.db"))  # a server of its own, started after the patch
        client.create_collection("quiet", dimension=4)      # builds an index: asks for a timestamp
        client.insert("quiet", [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4]}])
        assert [hit["id"] for hit in client.search("quiet", [[0.1, 0.2, 0.3, 0.4]], limit=1)[0]] == [1]
        client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], \
        [r.getMessage() for r in caplog.records]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_delf_up_shows_a_few_lines_and_keeps_the_services_output_in_the_log_folder(tmp_path):
    """`make up` as a user runs it: the terminal says where the logs are and when the system
    is up (a handful of lines, not one per task); every service's output, task lines
    included, is in DATA_DIR/logs; an ingested photo and a search add nothing to the terminal."""
    root = tmp_path
    env = system_env(root)
    data_dir = Path(env["DELF_DATA_DIR"])
    ready = root / "ready"
    out = root / "terminal.out"
    with open(out, "wb") as terminal:
        proc = subprocess.Popen([sys.executable, "-m", "delf_tools.launcher", "--data-dir", str(data_dir),
                                 "--grpc-addr", env["DELF_GRPC_ADDR"], "--ready-file", str(ready)],
                                env=env, stdout=terminal, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text(errors="replace")
            time.sleep(0.5)
        with DelfClient(env["DELF_GRPC_ADDR"], timeout=120) as client:
            client.add_image("quiet-coffee", jpeg(sample_photo("coffee")))
            assert client.search(jpeg(sample_photo("coffee")), top_k=1).matches[0].image_id == "quiet-coffee"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    terminal = out.read_text(errors="replace")
    lines = [ln for ln in terminal.splitlines() if ln.strip()]
    assert "DELF is up: gateway" in terminal and f"logs go to {data_dir / 'logs'}" in terminal, terminal
    assert len(lines) <= MAX_TERMINAL_LINES, terminal
    assert "Method not implemented" not in terminal and "Traceback" not in terminal, terminal
    assert "NOT_SERVING" not in terminal, terminal  # the startup's health warnings stay in the log
    logs = {p.stem: p.read_text(errors="replace") for p in (data_dir / "logs").glob("*.log")}
    assert {"gateway", "index", "extract-1", "verify"} <= set(logs), sorted(logs)
    assert "AddImage" in logs["gateway"] and "Search" in logs["gateway"]
    assert "Method not implemented" not in logs["index"]


def test_problem_lines_are_told_apart_from_the_rest():
    from delf_tools.logsink import is_problem

    assert is_problem("2026-12-05 12:00:00,123 WARNING delf.gateway: health: NOT_SERVING")
    assert is_problem("[2026-12-05 12:00:00,123: ERROR/MainProcess] Task failed")
    assert is_problem('{"ts": "x", "level": "ERROR", "service": "indexer", "message": "m"}')
    assert not is_problem("2026-12-05 12:00:00,123 INFO delf.task: delf.extract ok 0.41 s")
    assert not is_problem('{"ts": "x", "level": "INFO", "service": "gateway", "message": "ERROR in the text"}')
    assert not is_problem("2026-12-05 12:00:00,123 INFO delf.gateway: Search INVALID_ARGUMENT 0.01 s")
    # while the system starts: errors only (the gateway warns that workers are not up yet)
    assert not is_problem("2026-12-05 12:00:00,123 WARNING delf.gateway: health: NOT_SERVING", warnings=False)
    assert is_problem("2026-12-05 12:00:00,123 ERROR delf.indexer: Milvus unreachable", warnings=False)
