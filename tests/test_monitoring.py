"""The compose file's `monitoring` profile: Prometheus scrapes every DELF service's
/metrics, Grafana provisions that Prometheus as its datasource and the dashboard
deploy/grafana/dashboards/delf.json, whose panels query metrics the services export.

Read statically, like tests/test_deployment.py (no Docker here). That every panel's
queries return data from a real Prometheus scraping a running `delf up` is checked by
scripts/check_dashboard.py (tests/test_check_dashboard.py runs it when Debian's
prometheus is installed).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

sys.path.insert(0, str(Path(__file__).parent))

from deployment_files import (  # noqa: E402 - after the sys.path / environment setup above
    DELF_SERVICES, INFRA, MONITORING, ROOT, bind_mounts, command_argv, container_port, depends_on, environment,
    load_compose, option, published_ports,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "delf.json"
# What the issue asks the operator to see, and a word of each panel's title that says it.
REQUIRED_PANELS = {"search rate": "Search rate", "latency percentiles": "Search latency",
                   "queue depths": "Queue depths", "job progress": "Ingest progress",
                   "failures by reason": "Failures by reason", "worker liveness": "Worker liveness",
                   "descriptors stored": "Stored in the index"}
PROMQL_WORDS = {"sum", "by", "max", "min", "rate", "increase", "histogram_quantile", "le", "without", "on",
                "avg", "count", "irate", "offset", "bool", "and", "or", "unless", "ignoring", "group_left"}


@pytest.fixture(scope="module")
def services() -> dict:
    return load_compose()["services"]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def mounted(service: dict, target: str) -> Path:
    """The repository path bind-mounted on `target` in `service`."""
    for source, where in bind_mounts(service):
        if where == target:
            return (ROOT / source).resolve()
    raise AssertionError(f"nothing is mounted on {target}: {bind_mounts(service)}")


def test_prometheus_and_grafana_start_only_with_the_monitoring_profile(services):
    for name in MONITORING:
        assert name in services, f"docker-compose.yml lacks {name}"
        assert services[name].get("profiles") == ["monitoring"], f"{name}: profiles: [monitoring]"
    for name in INFRA + DELF_SERVICES:
        assert not services[name].get("profiles"), f"{name} must start without a profile"
    assert depends_on(services["grafana"]).get("prometheus") == "service_healthy"


def test_every_bind_mounted_file_exists(services):
    for name, service in services.items():
        for source, target in bind_mounts(service):
            assert (ROOT / source).exists(), f"{name}: mounts {source} on {target}, which is not in the repository"


def test_monitoring_ports_are_on_the_loopback_and_distinct(services):
    ports = {}
    for name in MONITORING:
        entries = published_ports(services[name])
        assert entries, f"{name}: publish its port on 127.0.0.1"
        for entry in entries:
            assert str(entry).startswith("127.0.0.1:"), f"{name}: publish {entry} on 127.0.0.1 only (no auth on it)"
            host = int(str(entry).split(":")[1])
            assert host not in ports, f"{name} and {ports[host]} both publish host port {host}"
            ports[host] = name
    assert set(ports) == {9090, 3000}


def test_prometheus_scrapes_every_delf_service_on_its_metrics_port(services):
    prom = services["prometheus"]
    config_file = option(command_argv(prom), "--config.file")
    scrape = yaml.safe_load(mounted(prom, config_file).read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert "delf" in jobs, "the dashboard's liveness panel reads up{job=\"delf\"}"
    port_of = {name: environment(services[name]).get("DELF_METRICS_PORT") for name in DELF_SERVICES}
    assert set(port_of.values()) != {None} and len(set(port_of.values())) == 1, port_of
    port = int(next(iter(port_of.values())))
    targets = set()
    for sd in jobs["delf"].get("dns_sd_configs", []):
        assert int(sd["port"]) == port, f"scrapes port {sd['port']}; the services serve /metrics on {port}"
        targets |= set(sd["names"])
    for static in jobs["delf"].get("static_configs", []):
        for target in static["targets"]:
            host, _, p = target.partition(":")
            assert int(p) == port, target
            targets.add(host)
    assert targets == set(DELF_SERVICES), f"scrape every DELF service: {sorted(targets)}"
    labels = [r.get("target_label") for r in jobs["delf"].get("relabel_configs", [])]
    assert "service" in labels, "the dashboard groups by a `service` label"
    assert prom.get("healthcheck"), "grafana waits for prometheus to be healthy"


def test_grafana_provisions_prometheus_and_the_dashboard(services, dashboard):
    grafana = services["grafana"]
    sources = yaml.safe_load((mounted(grafana, "/etc/grafana/provisioning/datasources") / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", source["url"])
    assert match and match.group(1) == "prometheus", source["url"]
    assert int(match.group(2)) in {container_port(p) for p in services["prometheus"]["ports"]}
    providers = yaml.safe_load((mounted(grafana, "/etc/grafana/provisioning/dashboards") / "delf.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert mounted(grafana, path) == DASHBOARD.parent
    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
    assert home == f"{path}/{DASHBOARD.name}"
    variable = {v["name"]: v for v in dashboard["templating"]["list"]}["datasource"]
    assert variable["type"] == "datasource" and variable["current"]["value"] == source["uid"]


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def exported_series() -> set[str]:
    """The series names delf_common.metrics defines (counters' _total, histograms' _bucket...)."""
    from prometheus_client.metrics import MetricWrapperBase

    from delf_common import metrics

    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(value._type, [""])
            names |= {value._name + s for s in suffixes}
    return names


def test_the_dashboard_has_the_operators_panels(dashboard):
    titles = [p["title"] for p in dashboard["panels"]]
    missing = {what: title for what, title in REQUIRED_PANELS.items() if title not in titles}
    assert not missing, f"the dashboard lacks panels for {missing}; it has {titles}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in dashboard["panels"]:
        assert panel.get("targets"), f"{panel['title']}: no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_every_query_reads_metrics_the_services_export(dashboard):
    exported = exported_series() | {"up"}
    for title, expr in panel_queries(dashboard):
        # what is left without label matchers, ranges, strings, grouping labels and numbers
        bare = re.sub(r'\{[^}]*\}|\[[^\]]*\]|"[^"]*"|\b(?:by|without)\s*\([^)]*\)|\b\d[\d.]*', " ", expr)
        names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)) - PROMQL_WORDS
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{title}: {expr!r} reads {sorted(unknown)}, which no service exports"


def test_no_metric_label_clashes_with_the_scrape_labels():
    """A label named like one Prometheus gives each target (`service` here, `job`, `instance`)
    would be renamed `exported_...` on scrape, and the dashboard's `by (...)` would group wrong."""
    from prometheus_client.metrics import MetricWrapperBase

    from delf_common import metrics

    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            clash = set(value._labelnames) & {"service", "job", "instance"}
            assert not clash, f"{value._name}: rename its label(s) {sorted(clash)}"


def test_traces_are_off_by_default_and_configured_alike_everywhere(services):
    endpoints = {name: environment(services[name]).get("OTEL_EXPORTER_OTLP_ENDPOINT") for name in DELF_SERVICES}
    assert set(endpoints.values()) == {""}, \
        f"every DELF service should get the same OTEL_EXPORTER_OTLP_ENDPOINT, empty (off) by default: {endpoints}"


def test_failures_are_counted_by_reason():
    """What the "Failures by reason" panel reads: a rejected task by its error code, a
    task that raised by the exception's type (Celery's task_postrun, as a worker sees it)."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from delf_common import metrics

    task = SimpleNamespace(name="delf.test.failing")

    def count(reason: str) -> float:
        return REGISTRY.get_sample_value("delf_worker_failures_total",
                                         {"task": task.name, "reason": reason}) or 0.0

    before = {r: count(r) for r in ("INVALID_ARGUMENT", "ValueError")}
    metrics._task_postrun(task_id="t1", task=task, state="SUCCESS",
                          retval={"ok": False, "error": {"code": "INVALID_ARGUMENT", "message": "not a photo"}})
    metrics._task_postrun(task_id="t2", task=task, state="FAILURE", retval=ValueError("boom"))
    metrics._task_postrun(task_id="t3", task=task, state="SUCCESS", retval={"ok": True})
    assert count("INVALID_ARGUMENT") == before["INVALID_ARGUMENT"] + 1
    assert count("ValueError") == before["ValueError"] + 1
