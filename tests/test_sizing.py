"""scripts/sizing.py: the arithmetic on a small hand-made benchmark JSON (every expected
number worked out by hand in the comments), and the command line end to end."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sizing.py"

_spec = importlib.util.spec_from_file_location("sizing", SCRIPT)
sizing = importlib.util.module_from_spec(_spec)
sys.modules["sizing"] = sizing  # dataclasses look their module up
_spec.loader.exec_module(sizing)

GIB = 1024 ** 3

# Made up for the test, not measurements. The Lite entry is the largest but must be ignored
# while a server entry exists; the reference is the 10,000-photo server entry.
MEASUREMENTS = [
    {"photos": 100_000, "descriptors": 50_000_000, "backend": "lite", "ram_bytes_per_photo": 9e9,
     "disk_bytes_per_photo": 9e9, "fill_rows_per_s": 1.0, "search_bytes_median_s": 1.0,
     "search_bytes_p95_s": 1.0, "search_id_median_s": 1.0, "map": 0.9, "precision_at_1": 1.0,
     "map_without_distractors": 0.9},
    {"photos": 1_000, "descriptors": 500_000, "backend": "server", "ram_bytes_per_photo": 1.0,
     "disk_bytes_per_photo": 1.0, "fill_rows_per_s": 1.0, "search_bytes_median_s": 1.0,
     "search_bytes_p95_s": 1.0, "search_id_median_s": 1.0, "map": 0.9, "precision_at_1": 1.0,
     "map_without_distractors": 0.9},
    {"photos": 10_000, "descriptors": 5_000_000, "backend": "server", "index": "HNSW",
     "ram_bytes_per_photo": 400_000, "disk_bytes_per_photo": 250_000, "fill_rows_per_s": 10_000,
     "search_bytes_median_s": 1.2, "search_bytes_p95_s": 1.5, "search_id_median_s": 0.4,
     "map": 0.9, "precision_at_1": 1.0, "map_without_distractors": 0.95},
]


def test_reference_is_the_largest_server_measurement():
    assert sizing.reference(MEASUREMENTS)["photos"] == 10_000
    assert sizing.reference(MEASUREMENTS[:1])["backend"] == "lite"  # no server: the largest of any
    with pytest.raises(ValueError):
        sizing.reference([])
    assert sizing.descriptors_per_photo(MEASUREMENTS[2]) == 500


def test_milvus_arithmetic():
    # 1M photos x 400,000 B x 1.5 headroom = 6e11 B
    assert sizing.index_ram_bytes(1e6, 400_000, 1.5) == 6e11
    # 64 GiB x 0.8 = 51.2 GiB = 54,975,581,388.8 B usable; 6e11 / that = 10.9 -> 11 nodes
    assert sizing.query_nodes(6e11, 64, 0.8) == 11
    assert sizing.query_nodes(100 * GIB, 64, 0.8) == 2   # 100 / 51.2 = 1.95
    assert sizing.query_nodes(1.0, 64, 0.8) == 1
    # 6e11 B / 11 nodes / 16 segments = 3,409,090,909 B = 3251.2 MiB -> 4096
    assert sizing.segment_size_mb(6e11, 11, 16) == 4096
    assert sizing.segment_size_mb(1e6, 1, 16) == 512          # clamped below
    assert sizing.segment_size_mb(1e15, 1, 16) == 8192        # clamped above
    # 1M x 250,000 B x 1.5 = 3.75e11 B
    assert sizing.disk_bytes(1e6, 250_000, 1.5) == 3.75e11


def test_worker_arithmetic():
    # 100 photos/s x 500 descriptors = 50,000 rows/s over 10,000 x 0.7 = 7.1 -> 8 indexers
    assert sizing.indexers(100, 500, 10_000, 0.7) == 8
    assert sizing.indexers(10, 500, 10_000, 0.7) == 1    # 5,000 / 7,000
    # (100 ingest + 10 query) photos/s over 100 x 0.7 = 1.57 -> 2 GPUs
    assert sizing.extractors(100, 10, 100, 0.7) == 2
    assert sizing.extractors(10, 10, 100, 0.7) == 1
    # 100 searches/s x 0.04 s = 4 process-seconds/s over 2 x 0.7 = 2.86 -> 3 pods
    assert sizing.verifiers(100, 0.04, 2, 0.7) == 3
    assert sizing.verifiers(10, 0.04, 2, 0.7) == 1
    # 256 MiB + 2 x (1000 x 500,000 + 1000 x 500 x 400) = 268,435,456 + 1.4e9
    assert sizing.redis_bytes(1000, 500_000, 500, 400) == 268_435_456 + 1_400_000_000


def test_plan_of_one_size():
    p = sizing.plan(1e7, sizing.reference(MEASUREMENTS), sizing.Assumptions(rate=100))
    # 1e7 x 400,000 x 1.5 = 6e12 B = 5587.9 GiB; / 54,975,581,388.8 = 109.1 -> 110 nodes
    assert p["descriptors"] == 5e9
    assert p["index_ram_gib"] == pytest.approx(6e12 / GIB)
    assert (p["nodes_per_replica"], p["replicas"], p["query_nodes"]) == (110, 2, 220)
    assert p["ram_per_node_gib"] == pytest.approx(6e12 / 110 / GIB)
    assert p["segment_mb"] == 4096                     # 6e12 / 110 / 16 / MiB = 3251.2
    assert p["index"] == "HNSW"
    assert p["disk_gib"] == pytest.approx(3.75e12 / GIB)
    assert (p["indexers"], p["extractors"], p["verifiers"]) == (8, 2, 1)
    assert p["redis_gib"] == pytest.approx(1_668_435_456 / GIB)
    assert math.isclose(p["redis_gib"], 1.5539, abs_tol=1e-4)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_command_line_prints_the_table_and_its_assumptions(tmp_path):
    path = tmp_path / "scale.json"
    path.write_text(json.dumps(MEASUREMENTS))
    out = run("--json", str(path), "--rate", "100")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "| | 1M photos | 10M photos | 100M photos |" in text
    # 100M: 6e13 / 54,975,581,388.8 = 1091.4 -> 1092 nodes
    assert "| query nodes per replica | 11 | 110 | 1092 |" in text
    assert "| query nodes in all | 22 | 220 | 2184 |" in text
    assert "| segment size, dataCoord.segment.maxSize (MB) | 4096 | 4096 | 4096 |" in text
    assert "| index type | HNSW | HNSW | HNSW |" in text
    assert "| object storage, with headroom (GiB) | 349.2 | 3,492.5 | 34,924.6 |" in text
    assert "| indexer pods | 8 | 8 | 8 |" in text
    assert "| extractor pods (one GPU each) | 2 | 2 | 2 |" in text
    assert "| Redis memory (GiB) | 1.55 | 1.55 | 1.55 |" in text
    assert "### Assumptions" in text and "10,000 photos" in text and "headroom of 1.5" in text
    # 128 GiB nodes: 6e11 / (102.4 GiB) = 5.46 -> 6 per replica at 1M
    bigger = run("--json", str(path), "--node-ram-gib", "128", "--sizes", "1e6")
    assert "| query nodes per replica | 6 |" in bigger.stdout, bigger.stdout


def test_command_line_refuses_a_bad_file(tmp_path):
    out = run("--json", str(tmp_path / "missing.json"))
    assert out.returncode == 2 and "cannot read" in out.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"photos": 1}]))
    out = run("--json", str(bad))
    assert out.returncode == 2 and "KeyError" in out.stderr
