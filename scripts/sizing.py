#!/usr/bin/env python
"""A sizing table for 1M, 10M and 100M photos from a scale benchmark's JSON.

    python scripts/sizing.py --json scale.json [--rate 20] [--node-ram-gib 64] [--qps 10]

`scale.json` is what `scripts/bench_scale.py --json PATH` writes: a list with one object
per measured size (photos, descriptors, backend "lite" or "server", ram_bytes_per_photo,
disk_bytes_per_photo, fill_rows_per_s, search_*_s, map, ...; optionally `index`). The
Milvus figures scale the bytes per photo of the largest *server* measurement linearly;
the worker counts follow from the rates given. Every other number is an assumption,
printed under the table (and changeable with an option). docs/SCALING.md explains the
table; BENCHMARKS.md holds the measurements.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

GIB = 1024 ** 3
MIB = 1024 ** 2
REDIS_BASE_BYTES = 256 * MIB  # Redis itself, results, job records (assumption)
REDIS_FORK_FACTOR = 2.0       # an AOF rewrite forks: copy-on-write can double the memory
SEGMENT_MB_RANGE = (512, 8192)


@dataclasses.dataclass(frozen=True)
class Assumptions:
    rate: float = 10.0                 # photos/s to ingest
    qps: float = 10.0                  # searches/s
    node_ram_gib: float = 64.0         # RAM of one Milvus query node
    usable_ram: float = 0.8            # share of it for loaded segments (OS, Milvus itself)
    headroom: float = 1.5              # above the measured bytes: growth, compaction, loading
    replicas: int = 2                  # in-memory replicas: one node lost keeps serving
    segments_per_node: int = 16        # sealed segments each query node holds
    gpu_photos_per_s: float = 100.0    # extraction rate of one extractor (one GPU)
    verify_s: float = 0.04             # RANSAC seconds per search (BENCHMARKS.md, p95 at 1M)
    verifier_processes: int = 2        # RANSAC processes per verifier pod
    utilisation: float = 0.7           # target busy share of every worker
    max_queue: int = 1000              # DELF_MAX_QUEUE: tasks a queue holds before refusals
    photo_bytes: int = 500_000         # a queued photo (extract task)
    descriptor_bytes: int = 400        # a queued descriptor with its location (index task)


# --------------------------------------------------------------------------- arithmetic

def reference(measurements: list[dict]) -> dict:
    """The measurement to scale from: the largest server one, else the largest of any."""
    if not measurements:
        raise ValueError("the benchmark JSON holds no measurement")
    servers = [m for m in measurements if m.get("backend") == "server"]
    return max(servers or measurements, key=lambda m: (m["descriptors"], m["photos"]))


def descriptors_per_photo(m: dict) -> float:
    return m["descriptors"] / m["photos"]


def index_ram_bytes(photos: float, ram_per_photo: float, headroom: float) -> float:
    return photos * ram_per_photo * headroom


def query_nodes(ram_bytes: float, node_ram_gib: float, usable: float) -> int:
    """Query nodes one replica of the collection needs."""
    return max(1, math.ceil(ram_bytes / (node_ram_gib * GIB * usable)))


def segment_size_mb(ram_bytes: float, nodes: int, segments_per_node: int) -> int:
    """dataCoord.segment.maxSize: a power of two giving each node about segments_per_node."""
    wanted = ram_bytes / nodes / segments_per_node / MIB
    size = 2 ** math.ceil(math.log2(max(wanted, 1)))
    return int(min(max(size, SEGMENT_MB_RANGE[0]), SEGMENT_MB_RANGE[1]))


def disk_bytes(photos: float, disk_per_photo: float, headroom: float) -> float:
    return photos * disk_per_photo * headroom


def indexers(rate: float, per_photo: float, fill_rows_per_s: float, utilisation: float) -> int:
    """Indexer pods to insert `rate` photos/s, each as fast as the benchmark's filler."""
    return max(1, math.ceil(rate * per_photo / (fill_rows_per_s * utilisation)))


def extractors(rate: float, qps: float, gpu_photos_per_s: float, utilisation: float) -> int:
    """GPU extractor pods: ingested photos plus one query photo per search."""
    return max(1, math.ceil((rate + qps) / (gpu_photos_per_s * utilisation)))


def verifiers(qps: float, verify_s: float, processes: int, utilisation: float) -> int:
    return max(1, math.ceil(qps * verify_s / (processes * utilisation)))


def redis_bytes(max_queue: int, photo_bytes: float, per_photo: float, descriptor_bytes: float) -> float:
    """A full extract queue (photos) and a full index queue (features), doubled for the AOF fork."""
    queued = max_queue * photo_bytes + max_queue * per_photo * descriptor_bytes
    return REDIS_BASE_BYTES + REDIS_FORK_FACTOR * queued


def plan(photos: float, m: dict, a: Assumptions) -> dict:
    """Every figure of one column of the table."""
    per_photo = descriptors_per_photo(m)
    ram = index_ram_bytes(photos, m["ram_bytes_per_photo"], a.headroom)
    nodes = query_nodes(ram, a.node_ram_gib, a.usable_ram)
    return {
        "photos": photos,
        "descriptors": photos * per_photo,
        "index_ram_gib": ram / GIB,
        "nodes_per_replica": nodes,
        "replicas": a.replicas,
        "query_nodes": nodes * a.replicas,
        "ram_per_node_gib": ram / nodes / GIB,
        "segment_mb": segment_size_mb(ram, nodes, a.segments_per_node),
        "index": m.get("index") or "as measured (not recorded in the JSON)",
        "disk_gib": disk_bytes(photos, m["disk_bytes_per_photo"], a.headroom) / GIB,
        "indexers": indexers(a.rate, per_photo, m["fill_rows_per_s"], a.utilisation),
        "extractors": extractors(a.rate, a.qps, a.gpu_photos_per_s, a.utilisation),
        "verifiers": verifiers(a.qps, a.verify_s, a.verifier_processes, a.utilisation),
        "redis_gib": redis_bytes(a.max_queue, a.photo_bytes, per_photo, a.descriptor_bytes) / GIB,
    }


# --------------------------------------------------------------------------- output

ROWS = [
    ("descriptors", "descriptors", "{:,.0f}"),
    ("index_ram_gib", "Milvus index RAM, with headroom (GiB)", "{:,.1f}"),
    ("nodes_per_replica", "query nodes per replica", "{}"),
    ("replicas", "replicas", "{}"),
    ("query_nodes", "query nodes in all", "{}"),
    ("ram_per_node_gib", "index RAM per query node (GiB)", "{:,.1f}"),
    ("segment_mb", "segment size, dataCoord.segment.maxSize (MB)", "{}"),
    ("index", "index type", "{}"),
    ("disk_gib", "object storage, with headroom (GiB)", "{:,.1f}"),
    ("indexers", "indexer pods", "{}"),
    ("extractors", "extractor pods (one GPU each)", "{}"),
    ("verifiers", "verifier pods", "{}"),
    ("redis_gib", "Redis memory (GiB)", "{:,.2f}"),
]


def photos_label(photos: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if photos >= scale:
            return f"{photos / scale:g}{unit} photos"
    return f"{photos:g} photos"


def table(plans: list[dict]) -> str:
    lines = ["| | " + " | ".join(photos_label(p["photos"]) for p in plans) + " |",
             "|---|" + "---|" * len(plans)]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(p[key]) for p in plans) + " |")
    return "\n".join(lines)


def assumptions_text(m: dict, a: Assumptions, node_ram_limit: float) -> str:
    server = m.get("backend") == "server"
    lines = [
        f"Scaled from the {'largest server' if server else 'largest (NO server: Milvus Lite)'} measurement: "
        f"{m['photos']:,} photos, {m['descriptors']:,} descriptors ({descriptors_per_photo(m):,.0f} per photo), "
        f"index {m.get('index', 'not recorded')}, {m['ram_bytes_per_photo']:,.0f} B RAM and "
        f"{m['disk_bytes_per_photo']:,.0f} B disk per photo, fill {m['fill_rows_per_s']:,.0f} rows/s, "
        f"search by bytes median {m.get('search_bytes_median_s', float('nan')):.3f} s, mAP {m.get('map', float('nan')):.3f}.",
        "Search latency at the larger sizes is not extrapolated: measure it (docs/SCALING.md).",
        f"RAM and disk grow linearly with photos, times a headroom of {a.headroom:g}.",
        f"Query nodes of {a.node_ram_gib:g} GiB, {a.usable_ram:.0%} of it for segments "
        f"({node_ram_limit:,.1f} GiB); {a.replicas} in-memory replica(s); about "
        f"{a.segments_per_node} segments per node, sizes {SEGMENT_MB_RANGE[0]}-{SEGMENT_MB_RANGE[1]} MB.",
        f"Ingest {a.rate:g} photos/s; each indexer inserts as fast as the benchmark's filler; "
        f"workers {a.utilisation:.0%} busy.",
        f"{a.qps:g} searches/s; an extractor (one GPU) extracts {a.gpu_photos_per_s:g} photos/s "
        f"(assumed: BENCHMARKS.md measured CPUs only); RANSAC {a.verify_s:g} s per search, "
        f"{a.verifier_processes} processes per verifier pod.",
        f"Redis: {a.max_queue} queued photos of {a.photo_bytes:,} B and {a.max_queue} queued feature sets "
        f"of {a.descriptor_bytes} B per descriptor (DELF_MAX_QUEUE), x{REDIS_FORK_FACTOR:g} for the AOF "
        f"rewrite, plus {REDIS_BASE_BYTES // MIB} MiB.",
    ]
    return "\n".join(f"- {line}" for line in lines)


def report(measurements: list[dict], a: Assumptions, sizes: list[float]) -> str:
    m = reference(measurements)
    plans = [plan(photos, m, a) for photos in sizes]
    return (f"## Sizing\n\n{table(plans)}\n\n### Assumptions\n\n"
            f"{assumptions_text(m, a, a.node_ram_gib * a.usable_ram)}\n")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Assumptions]:
    d = Assumptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, type=Path, help="the JSON of scripts/bench_scale.py --json")
    p.add_argument("--sizes", default="1e6,1e7,1e8", help="photo counts, comma-separated")
    p.add_argument("--rate", type=float, default=d.rate, help="photos/s to ingest")
    p.add_argument("--qps", type=float, default=d.qps, help="searches/s")
    p.add_argument("--node-ram-gib", type=float, default=d.node_ram_gib, help="RAM of one query node")
    p.add_argument("--headroom", type=float, default=d.headroom)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--gpu-photos-per-s", type=float, default=d.gpu_photos_per_s)
    p.add_argument("--verify-s", type=float, default=d.verify_s)
    p.add_argument("--photo-bytes", type=int, default=d.photo_bytes)
    args = p.parse_args(argv)
    a = dataclasses.replace(d, rate=args.rate, qps=args.qps, node_ram_gib=args.node_ram_gib,
                            headroom=args.headroom, replicas=args.replicas,
                            gpu_photos_per_s=args.gpu_photos_per_s, verify_s=args.verify_s,
                            photo_bytes=args.photo_bytes)
    return args, a


def main(argv: list[str] | None = None) -> int:
    args, a = parse_args(argv)
    try:
        measurements = json.loads(args.json.read_text())
        sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
        text = report(measurements, a, sizes)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"sizing: cannot read {args.json}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
