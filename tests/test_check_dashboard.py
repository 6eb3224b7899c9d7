"""Every panel of the Grafana dashboard shows data: scripts/check_dashboard.py starts `delf
up` and a real Prometheus (Debian's `prometheus`; skipped when it is not installed),
runs a small workload (two ingest jobs with one undecodable photo each, searches, a bad
search) and each panel's PromQL through Prometheus' HTTP API.

One run (about 50 s): the dashboard plus one panel reading a metric nobody exports, which
must be the only query reported empty (and make the script exit 1).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import redis_available, redis_db_url

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
pytestmark = pytest.mark.skipif(not Path(PROMETHEUS).is_file(), reason="no prometheus binary (apt-get install prometheus)")
pytest.importorskip("skimage")

BOGUS = {"id": 999, "type": "timeseries", "title": "Nobody exports this", "gridPos": {"x": 0, "y": 99, "w": 12, "h": 8},
         "targets": [{"refId": "A", "expr": "sum(rate(delf_no_such_metric_total[$__rate_interval]))"}]}


@pytest.mark.slow
def test_every_panel_returns_data_from_a_real_prometheus(tmp_path):
    url = redis_db_url()
    if not redis_available(url):
        pytest.fail(f"no Redis at {url}")
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/delf.json").read_text())
    expected = {(p["title"], t["refId"]) for p in dashboard["panels"] for t in p["targets"]}
    dashboard["panels"].append(BOGUS)
    board = tmp_path / "delf.json"
    board.write_text(json.dumps(dashboard))
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/check_dashboard.py"), "--dashboard", str(board), "--prometheus", PROMETHEUS,
         "--redis-url", url, "--data-dir", str(tmp_path / "data"), "--json", str(report)],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    rows = json.loads(report.read_text())["queries"]
    empty = {(r["panel"], r["ref"]) for r in rows if r["status"] != "ok"}
    assert empty == {("Nobody exports this", "A")}, done.stdout[-4000:]
    assert {(r["panel"], r["ref"]) for r in rows if r["status"] == "ok"} == expected
    by_panel = {r["panel"]: r for r in rows if r["ref"] == "A"}
    assert {tuple(sorted(lbl.items())) for lbl in by_panel["Worker liveness"]["labels"]} == {
        (("worker", w),) for w in ("extractor", "indexer", "verifier")}
    assert by_panel["Stored in the index"]["max"] > 0
    assert "empty: Nobody exports this A" in done.stdout
