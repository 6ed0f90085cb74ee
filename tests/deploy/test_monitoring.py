"""Monitoring, checked against the real thing: promtool on deploy/prometheus, the dashboard's
and the alert rules' metric names against a real server's /metrics, the health checks of the
image and the manifests against its health service, and a real Prometheus scraping it."""

from __future__ import annotations

import functools
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from service.client import Client
from tests.conftest import ROOT, Served, scrape
from tests.deploy.conftest import (
    ALERTS,
    PROMETHEUS_CONFIG,
    alert_rules,
    as_promql,
    dashboard,
    dashboard_queries,
    debian_prometheus,
    dockerfile_stages,
    k8s_objects,
    metric_names,
    run_tool,
    send_traffic,
)

T = TypeVar("T")
GENERATED_BY_PROMETHEUS = {"up"}
HISTOGRAM = "cnn_serving_request_duration_seconds"


# --- static checks ----------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_the_rules():
    promtool = debian_prometheus("promtool")
    for command in (("check", "config", PROMETHEUS_CONFIG), ("check", "rules", ALERTS)):
        result = run_tool(promtool, *command)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests():
    result = run_tool(
        debian_prometheus("promtool"), "test", "rules", ALERTS.with_suffix(".test.yml")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le, model) (rate(a_bucket{job=~"$job"}[$__rate_interval]))', {"a_bucket"}),
        ('up{job="x"} == 1 unless on (job, instance) (b == 1)', {"up", "b"}),
        ("histogram_quantile(0.99, sum(rate(c_bucket[5m])) by (le)) > 0.25", {"c_bucket"}),
        ('d_total{code=~"A|B"} / e_total offset 5m', {"d_total", "e_total"}),
        ('label_replace(f, "dst", "$1", "src", "(.*)") * on (x) group_left g', {"f", "g"}),
        ("count by (device) (h_info == 1) or vector(0)", {"h_info"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]):
    assert metric_names(expr) == names


def test_dashboard_shows_what_an_operator_needs():
    board = dashboard()
    queries = list(dashboard_queries(board).values())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in panels)
    wanted = [
        r"sum by \(model, code\) \(rate\(cnn_serving_requests_total\{",
        r"sum by \(model, code\) \(rate\(cnn_serving_images_total\{",
        r'sum by \(code\) \(rate\(cnn_serving_requests_total\{[^}]*code!="OK"',
        r"cnn_serving_batch_size_bucket",
        r"cnn_serving_queue_depth",
        r"cnn_serving_model_ready",
        r"cnn_serving_execution_provider_info",
    ]
    for histogram in ("request", "queue", "inference"):
        for q in ("0.5", "0.95", "0.99"):
            wanted.append(
                rf"histogram_quantile\({q}, sum by \(le, model\) "
                rf"\(rate\(cnn_serving_{histogram}_duration_seconds_bucket\{{"
            )
    missing = [w for w in wanted if not any(re.search(w, q) for q in queries)]
    assert not missing, f"no dashboard query matches {missing}"


# --- against a real server -------------------------------------------------------------------


def test_every_dashboard_and_alert_metric_is_exported(exported_names: set[str]):
    used = {
        name: where
        for where, expr in dashboard_queries(dashboard()).items()
        for name in metric_names(expr)
    }
    for rule in alert_rules():
        used |= {name: f"alert {rule['alert']}" for name in metric_names(rule["expr"])}
    unknown = {name: where for name, where in used.items() if name not in exported_names}
    assert set(unknown) <= GENERATED_BY_PROMETHEUS, f"not exported by the server: {unknown}"
    assert len(used) >= 10  # the names really were found


def test_health_checks_ask_what_the_server_answers(busy_server):
    served: Served = busy_server[0]
    probes = []
    for obj in k8s_objects().values():
        for pod in [obj["spec"]["template"]["spec"]] if obj["kind"] == "Deployment" else []:
            for container in pod["containers"]:
                probes += [container[k]["grpc"] for k in container if k.endswith("Probe")]
    assert len(probes) == 3
    with Client(served.target) as client:
        for probe in probes:
            assert client.health(probe.get("service", "")) == "SERVING"

    # The image's HEALTHCHECK command, run as is against this server's port.
    check = next(i for i in dockerfile_stages()[-1] if i.keyword == "HEALTHCHECK").exec_form
    assert check[0] == "python"
    command = [sys.executable, *(re.sub(r":\d+$", f":{served.port}", a) for a in check[1:])]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr


# --- a real Prometheus --------------------------------------------------------------------------


@dataclass
class Prometheus:
    process: subprocess.Popen
    url: str
    log: Path

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path} {params}: {exc.read().decode()}") from exc
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.api("/api/v1/query", query=promql)["result"]

    def number(self, promql: str) -> float | None:
        """The value of a one-element result, None while there is none."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None


def poll(what: str, check: Callable[[], T], timeout_s: float = 60) -> T:
    """check() until it returns something truthy (no fixed sleeps: a short poll interval)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_config(metrics_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its job pointed at the test server, scraping and
    evaluating the alert rules every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "cnn-serving")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    config["scrape_configs"] = [job]
    return config


def ready(server: Prometheus) -> bool:
    try:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def started(server: Prometheus) -> bool:
    return server.process.poll() is not None or ready(server)


def start_prometheus(binary: str, config: Path, root: Path) -> Prometheus:
    """The real Prometheus on a free loopback port (it cannot take port 0: a port that was
    taken in between is retried), once `/-/ready` answers 200."""
    for attempt in range(3):
        log = root / f"prometheus-{attempt}.log"
        address = f"127.0.0.1:{free_port()}"
        with log.open("w") as err:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--web.listen-address={address}",
                    f"--storage.tsdb.path={root / f'data-{attempt}'}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        server = Prometheus(process, f"http://{address}", log)
        poll("Prometheus /-/ready or its exit", functools.partial(started, server))
        if process.poll() is None:
            return server
        if "address already in use" not in log.read_text():
            raise AssertionError(f"prometheus exited {process.returncode}:\n{log.read_text()}")
    raise AssertionError("no free loopback port for prometheus in 3 tries")


@pytest.fixture(scope="module")
def prometheus(busy_server, tmp_path_factory) -> Iterator[Prometheus]:
    """A real Prometheus scraping the busy server, once its target is up."""
    binary = debian_prometheus("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(busy_server[0].metrics_port)))
    server = start_prometheus(binary, config, root)
    try:

        def target_up() -> bool:
            targets = server.api("/api/v1/targets")["activeTargets"]
            return [t["health"] for t in targets] == ["up"]

        poll("the server's target to be up", target_up)
        yield server
    finally:
        server.process.terminate()
        server.process.wait(30)


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over cumulative (upper bound, count) pairs."""
    buckets = sorted(buckets)
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower  # the highest finite bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    raise AssertionError("unreachable: the +Inf bucket holds every observation")


def test_prometheus_reads_the_request_latency_quantiles(prometheus: Prometheus, busy_server):
    served, images = busy_server
    selector = f'{HISTOGRAM}_bucket{{job="cnn-serving"}}'

    def seen(count: float) -> Callable[[], bool]:
        return lambda: prometheus.number(f"sum({HISTOGRAM}_count)") == count

    def counted() -> float:
        return sum(s.value for s in scrape(served)[HISTOGRAM] if s.name == f"{HISTOGRAM}_count")

    poll("Prometheus to scrape the requests so far", seen(counted()))
    send_traffic(served, images)  # an increase that rate() can see
    p99 = poll(
        "a finite p99 over the last 30 s",
        lambda: finite(
            prometheus.number(f"histogram_quantile(0.99, sum by (le) (rate({selector}[30s])))")
        ),
    )
    assert p99 is not None and 0 < p99 <= 10.0  # within the histogram's finite buckets (seconds)

    # Over the raw counters, Prometheus must agree with the server's own /metrics exactly.
    poll("Prometheus to scrape the last requests", seen(counted()))
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in scrape(served)[HISTOGRAM]
        if s.name == f"{HISTOGRAM}_bucket"
    ]
    summed: dict[float, float] = {}
    for bound, count in buckets:
        summed[bound] = summed.get(bound, 0.0) + count
    for q in (0.5, 0.95, 0.99):
        got = prometheus.number(f"histogram_quantile({q}, sum by (le) ({selector}))")
        assert got == pytest.approx(histogram_quantile(q, list(summed.items())), rel=1e-9)


def test_every_dashboard_query_returns_data_in_prometheus(prometheus: Prometheus):
    queries = {where: as_promql(q) for where, q in dashboard_queries(dashboard()).items()}

    def empty() -> list[str]:
        return [f"{where}: {q}" for where, q in queries.items() if not prometheus.query(q)]

    missing: list[str] = []

    def all_answered() -> bool:
        missing[:] = empty()
        return not missing

    try:
        poll("every dashboard query to return data", all_answered)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still empty: {missing}") from None


def test_alert_rules_evaluate_and_the_cpu_fallback_fires(prometheus: Prometheus):
    def evaluated() -> list[dict[str, Any]]:
        groups = prometheus.api("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = all(not r["lastEvaluation"].startswith("0001-") for r in rules)
        return rules if rules and done else []

    rules = poll("every alert rule to be evaluated", evaluated)
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []

    def active() -> set[str]:
        return {a["labels"]["alertname"] for a in prometheus.api("/api/v1/alerts")["alerts"]}

    # This server runs on the CPU provider: the alert that says the GPU is not used fires.
    poll("CnnServingCpuFallback to be pending", lambda: "CnnServingCpuFallback" in active())
    quiet = {
        "CnnServingDown",
        "CnnServingHighErrorRate",
        "CnnServingModelNotReady",
        "CnnServingNoModelReady",
        "CnnServingQueueBacklog",
    }
    assert not active() & quiet
