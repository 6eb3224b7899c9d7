"""Does every panel of the Grafana dashboard show data? Checked against a real Prometheus.

Starts `delf up` (python -m delf_tools.launcher: embedded Redis unless --redis-url, its own
data dir, gRPC and metrics ports, DELF_MAX_QUEUE=2 so that an ingest stream meets
backpressure), starts Prometheus (Debian's `prometheus` binary, a config of its own
scraping each service's /metrics every second, its data under the data dir), then runs a
workload in two rounds a few seconds apart: an ingest job of scikit-image's sample photos
with one undecodable photo in it, a search with each photo, one search with bytes that
are no photo; then GetStats. Then it runs each panel's PromQL from
deploy/grafana/dashboards/delf.json through Prometheus' HTTP API (/api/v1/query, Grafana's
$__rate_interval and $__range replaced) and reports, per query, the series that came back
and their largest value. A query with no finite value is "empty".

    .venv/bin/python scripts/check_dashboard.py [--json out.json] [--keep]

Exit status: 0 when every query returned data, 1 when one came back empty, 2 when the
system or Prometheus could not be started. Everything it started is stopped at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "delf.json"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
SCRAPE_S = 1
RATE_INTERVAL = "2m"  # Grafana's $__rate_interval, here
RANGE = "30m"         # Grafana's $__range (the dashboard's time range), here
SERVICE_OF = {"extract": "extractor", "index": "indexer", "verify": "verifier", "gateway": "gateway"}


class CheckError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--prometheus", default="/usr/bin/prometheus", help="the Prometheus binary")
    parser.add_argument("--data-dir", type=Path, help="folder for delf up's and Prometheus' data "
                        "(default: a new temporary folder, removed unless --keep)")
    parser.add_argument("--redis-url", default="", help="Redis for delf up (default: its embedded one)")
    parser.add_argument("--grpc-port", type=int, default=0, help="gateway port (default: a free one)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="first /metrics port, one per service counting up (default: a free range)")
    parser.add_argument("--prometheus-port", type=int, default=0, help="(default: a free one)")
    parser.add_argument("--rounds", type=int, default=2, help="workload rounds (rates need two)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the data dir (logs, Prometheus' data)")
    return parser.parse_args(argv)


def panel_queries(dashboard: dict) -> list[dict]:
    """Each query of each panel: {panel, ref, expr, legend}, rows' nested panels included."""
    out = []
    for panel in dashboard.get("panels", []):
        for inner in [panel] + list(panel.get("panels", [])):
            for target in inner.get("targets", []):
                if target.get("expr"):
                    out.append({"panel": inner["title"], "ref": target.get("refId", ""), "expr": target["expr"],
                                "legend": target.get("legendFormat", "")})
    return out


def as_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for here."""
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace("${__rate_interval}", RATE_INTERVAL)
            .replace("$__range", RANGE).replace("${__range}", RANGE).replace("$__interval", "15s"))


# --------------------------------------------------------------------------- processes


class System:
    """`delf up` in its own process group, and Prometheus scraping it."""

    def __init__(self, args: argparse.Namespace, data_dir: Path):
        self.args, self.data_dir = args, data_dir
        self.grpc_addr = f"127.0.0.1:{args.grpc_port or free_port()}"
        self.metrics_base = args.metrics_port or free_port_range(8)
        self.prom_addr = f"127.0.0.1:{args.prometheus_port or free_port()}"
        self.launcher: subprocess.Popen | None = None
        self.prometheus: subprocess.Popen | None = None

    def start_delf(self, timeout: float = 600) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DELF_", "OTEL_"))}
        env.update(PYTHONUNBUFFERED="1", DELF_DEVICE="cpu", DELF_METRICS_PORT=str(self.metrics_base),
                   DELF_QUEUE_PREFIX=f"dashcheck-{uuid.uuid4().hex[:8]}", DELF_COLLECTION="dashcheck",
                   DELF_MAX_QUEUE="2", DELF_HEARTBEAT_S="1", DELF_HEALTH_INTERVAL_S="0.5")
        if self.args.redis_url:
            env["DELF_REDIS_URL"] = self.args.redis_url
        ready = self.data_dir / "ready.json"
        ready.unlink(missing_ok=True)
        with open(self.data_dir / "launcher.out", "wb") as out:
            self.launcher = subprocess.Popen(
                [sys.executable, "-m", "delf_tools.launcher", "--data-dir", str(self.data_dir / "delf"),
                 "--grpc-addr", self.grpc_addr, "--redis-port", "0", "--ready-file", str(ready), "--log-dir"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.launcher.poll() is not None or time.monotonic() > deadline:
                raise CheckError("delf up did not start:\n" + tail(self.data_dir / "launcher.out"))
            time.sleep(0.5)
        return json.loads(ready.read_text())

    def targets(self, ready: dict) -> list[tuple[str, str, int]]:
        """(child name, service, metrics port): the launcher gives its services ports counting
        up from DELF_METRICS_PORT in the order it started them (the ready file's order); the
        web service (started last) serves no /metrics of its own."""
        names = [n for n in ready["children"] if n != "redis" and n.split("-")[0] in SERVICE_OF]
        return [(n, SERVICE_OF[n.split("-")[0]], self.metrics_base + i) for i, n in enumerate(names)]

    def start_prometheus(self, targets: list[tuple[str, str, int]], timeout: float = 180) -> None:
        prom_dir = self.data_dir / "prometheus"
        prom_dir.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
                  "scrape_configs": [{"job_name": "delf", "static_configs": [
                      {"targets": [f"127.0.0.1:{port}"], "labels": {"service": service, "process": name}}
                      for name, service, port in targets]}]}
        (prom_dir / "prometheus.yml").write_text(json.dumps(config, indent=1))  # JSON is YAML
        with open(prom_dir / "prometheus.log", "wb") as log:
            self.prometheus = subprocess.Popen(
                [self.args.prometheus, f"--config.file={prom_dir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={prom_dir / 'data'}", f"--web.listen-address={self.prom_addr}",
                 "--log.level=warn"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline, up = time.monotonic() + timeout, None
        while True:
            if self.prometheus.poll() is not None:
                raise CheckError("Prometheus exited:\n" + tail(prom_dir / "prometheus.log"))
            if time.monotonic() > deadline:
                seen = "it never answered" if up is None else (
                    f"{len(up)} of {len(targets)} targets up (missing: "
                    f"{sorted({n for n, _, _ in targets} - {u['metric'].get('process') for u in up})})")
                raise CheckError(f"Prometheus not ready after {timeout:.0f} s: {seen}\n"
                                 + tail(prom_dir / "prometheus.log"))
            try:
                up = self.query('up{job="delf"} == 1')
                if len(up) == len(targets):
                    return
            except OSError:
                pass
            time.sleep(0.5)

    def query(self, expr: str) -> list[dict]:
        url = f"http://{self.prom_addr}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=30) as reply:
            body = json.load(reply)
        if body.get("status") != "success":
            raise CheckError(f"{expr}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def stop(self) -> None:
        for proc, sig in ((self.prometheus, signal.SIGTERM), (self.launcher, signal.SIGINT)):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(sig)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def free_port_range(n: int) -> int:
    """The first of `n` consecutive free ports."""
    for _ in range(50):
        base = free_port()
        if base + n < 65536 and all(_free(base + i) for i in range(1, n)):
            return base
    raise CheckError(f"no {n} consecutive free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} is missing)"


# --------------------------------------------------------------------------- workload


def sample_jpegs() -> dict[str, bytes]:
    from PIL import Image
    from skimage import data

    out = {}
    for name in PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
        out[name] = buf.getvalue()
    return out


def undecodable(photo: bytes) -> bytes:
    """A JPEG whose header passes the gateway's checks and whose pixels cannot be decoded."""
    return photo[:400] + bytes(range(256)) * 8


def workload(grpc_addr: str, photos: dict[str, bytes], round_no: int) -> dict:
    """One round: an ingest job (the photos and one undecodable one), a search with each
    photo, one with bytes that are no photo, GetStats. Returns what happened."""
    import grpc

    from delf_common.client import DelfClient
    from delf_common.proto.delf.v1 import delf_pb2

    done: dict = {"round": round_no}
    with DelfClient(grpc_addr, timeout=300) as client:
        items = [delf_pb2.IngestItem(image_id=f"r{round_no}-{name}", image=data) for name, data in photos.items()]
        items.append(delf_pb2.IngestItem(image_id=f"r{round_no}-broken", image=undecodable(photos[PHOTOS[0]])))
        job = client.wait_job(client.start_ingest_job(items).job_id)
        done["ingest"] = {"done": job.done, "failed": job.failed}
        found = 0
        for name, data in photos.items():
            reply = client.search(data, top_k=3)
            found += bool(reply.matches) and reply.matches[0].image_id.endswith(name)
        done["searches_found"] = found
        try:
            client.search(b"this is not a photo" * 10, top_k=3)
        except grpc.RpcError as exc:
            done["bad_search"] = exc.code().name
        stats = client.stats()
        done["stats"] = {"images": stats.images, "descriptors": stats.descriptors}
    return done


# --------------------------------------------------------------------------- report


def evaluate(system: System, queries: list[dict]) -> list[dict]:
    rows = []
    for q in queries:
        row = dict(q, promql=as_promql(q["expr"]))
        try:
            result = system.query(row["promql"])
        except Exception as exc:  # noqa: BLE001 - a bad query is reported as such
            row.update(status="error", series=0, max=None, error=str(exc)[:300])
            rows.append(row)
            continue
        values = [float(r["value"][1]) for r in result]
        finite = [v for v in values if math.isfinite(v)]
        row.update(series=len(finite), max=max(finite) if finite else None,
                   status="ok" if finite else "empty",
                   labels=[r["metric"] for r in result][:12])
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    width = max(len(r["panel"]) for r in rows)
    print(f"{'panel':<{width}}  ref  {'series':>6}  {'max':>10}  status")
    for r in rows:
        value = "-" if r["max"] is None else f"{r['max']:.4g}"
        print(f"{r['panel']:<{width}}  {r['ref']:<3}  {r['series']:>6}  {value:>10}  {r['status']}")
    empty = [r for r in rows if r["status"] != "ok"]
    panels = len({r["panel"] for r in rows})
    print(f"{len(rows) - len(empty)} of {len(rows)} queries ({panels} panels) returned data"
          + (f"; empty: {', '.join(sorted({r['panel'] + ' ' + r['ref'] for r in empty}))}" if empty else ""))


def run(args: argparse.Namespace, data_dir: Path) -> int:
    queries = panel_queries(json.loads(args.dashboard.read_text()))
    system = System(args, data_dir)
    began = time.monotonic()
    try:
        ready = system.start_delf()
        targets = system.targets(ready)
        system.start_prometheus(targets)
        print(f"delf up ready, Prometheus scraping {len(targets)} services "
              f"({', '.join(f'{n} :{p}' for n, _, p in targets)})", flush=True)
        photos = sample_jpegs()
        rounds = []
        for i in range(1, args.rounds + 1):
            rounds.append(workload(system.grpc_addr, photos, i))
            print(f"round {i}: {rounds[-1]}", flush=True)
            time.sleep(3 * SCRAPE_S)
        time.sleep(3 * SCRAPE_S)  # the last samples scraped
        rows = evaluate(system, queries)
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        system.stop()
    print_table(rows)
    if args.json:
        board = args.dashboard.resolve()
        board = board.relative_to(ROOT) if board.is_relative_to(ROOT) else board
        args.json.write_text(json.dumps({"dashboard": str(board), "rounds": rounds,
                                         "rate_interval": RATE_INTERVAL, "range": RANGE,
                                         "seconds": round(time.monotonic() - began, 1), "queries": rows}, indent=1))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.prometheus).is_file():
        print(f"error: no Prometheus at {args.prometheus} (apt-get install prometheus)", file=sys.stderr)
        return 2
    if args.data_dir:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        return run(args, args.data_dir)
    # Not TemporaryDirectory(delete=...): that argument is Python 3.12's, the project's is 3.11.
    tmp = Path(tempfile.mkdtemp(prefix="delf-dashcheck-"))
    try:
        if args.keep:
            print(f"data dir: {tmp}")
        return run(args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
