"""Deploy fixtures and readers: the files under deploy/ and the Dockerfile, parsed; the tools
that check them offline (hadolint, kubernetes-validate, check-jsonschema from the dev extra;
Debian's prometheus and promtool, which `make test` installs when it runs as root with apt);
a real server that has seen traffic, and the metric names it exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import MODEL, ROOT, Served, debian_tool, png, scrape, start_server

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cnn-serving.dashboard.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"


# --- tools --------------------------------------------------------------------------------


def venv_tool(name: str) -> str:
    """A console script of the dev extra, next to this interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is missing from {path.parent}: run `make install` (dev extra)")
    return str(path)


def run_tool(*command: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def debian_prometheus(name: str) -> str:
    """`prometheus` or `promtool` from Debian's prometheus package (see `debian_tool`)."""
    return debian_tool(name, "prometheus", "prometheus-tools")


# --- files --------------------------------------------------------------------------------


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


# Built-in kinds only: the server (`kubectl apply -f deploy/k8s/`) and the scoring Job. Objects
# of custom resources (Prometheus Operator, KServe) live in folders of their own.
BUILT_IN_FOLDERS = (K8S, K8S / "jobs")


def k8s_files(*folders: Path) -> list[Path]:
    return sorted(path for folder in folders for path in folder.glob("*.yaml"))


def k8s_objects(*folders: Path) -> dict[str, dict[str, Any]]:
    """Every object in folder/*.yaml (default: the built-in kinds' folders), by `Kind/name`."""
    objects = {}
    for path in k8s_files(*(folders or BUILT_IN_FOLDERS)):
        for doc in yaml_documents(path):
            objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # the rest of the logical line, continuations joined

    @property
    def exec_form(self) -> list[str]:
        """The JSON (exec) form of CMD, ENTRYPOINT, HEALTHCHECK ... CMD."""
        body = self.value.split(" CMD ", 1)[-1] if self.keyword == "HEALTHCHECK" else self.value
        return json.loads(body)


def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[Instruction]]:
    """Instructions per build stage (comments dropped, `\\` continuations joined, global ARG
    defaults substituted into FROM)."""
    text = re.sub(r"^\s*#.*\n", "", path.read_text(encoding="utf-8"), flags=re.M)
    lines = re.sub(r"\\\n", " ", text).splitlines()
    stages: list[list[Instruction]] = []
    args: dict[str, str] = {}
    for line in filter(str.strip, lines):
        keyword, _, value = line.strip().partition(" ")
        value = " ".join(value.split())
        if keyword.upper() == "ARG" and not stages and "=" in value:
            name, _, default = value.partition("=")
            args[name] = default
        if keyword.upper() == "FROM":
            value = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)
            stages.append([])
        if stages:
            stages[-1].append(Instruction(keyword.upper(), value))
    return stages


def stage_env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            env |= dict(item.split("=", 1) for item in instruction.value.split())
    return env


def dockerignore_rules(path: Path = ROOT / ".dockerignore") -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per pattern, with Docker's meaning of `*`, `**` and `?`."""
    rules = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


def docker_context(root: Path = ROOT) -> list[str]:
    """The files `docker build .` would send: the checkout's files (tracked, or untracked and
    not git-ignored) that .dockerignore lets through. The last matching pattern decides, and a
    pattern matching a folder matches everything in it."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    rules = dockerignore_rules(root / ".dockerignore")
    sent = []
    for name in listed:
        prefixes = ["/".join(name.split("/")[: i + 1]) for i in range(name.count("/") + 1)]
        excluded = False
        for negated, regex in rules:
            if any(regex.match(prefix) for prefix in prefixes):
                excluded = not negated
        if not excluded and (root / name).is_file():
            sent.append(name)
    return sent


# --- PromQL in the dashboard and the alert rules -------------------------------------------

PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}
GRAFANA_VARIABLES = {
    "$__rate_interval": "10s",  # Prometheus here scrapes every second
    "$__interval": "10s",
    "$job": "cnn-serving",
    "$model": ".*",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside strings, label
    matchers, grouping clauses and ranges that are not function calls or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])[a-zA-Z_:][\w:]*", text):
        called = text[match.end() :].lstrip().startswith("(")
        if not called and match.group(0).lower() not in PROMQL_WORDS:
            names.add(match.group(0))
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_queries(board: dict[str, Any]) -> dict[str, str]:
    """PromQL by where it stands: every panel target, and each `label_values(EXPR, label)`
    variable's EXPR."""
    queries = {}
    for panel in _panels(board["panels"]):
        for target in panel.get("targets", []):
            queries[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert match, f"variable {variable['name']}: not label_values(EXPR, label)"
            queries[f"variable ${variable['name']}"] = match.group(1)
    return queries


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml_documents(ALERTS)[0]["groups"] for rule in group["rules"]]


def as_promql(query: str) -> str:
    """A dashboard query with Grafana's variables replaced as Prometheus can run it."""
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    assert "$" not in query, f"unknown Grafana variable in {query!r}"
    return query


# --- a real server that has seen traffic ----------------------------------------------------


def send_traffic(served: Served, images: list[bytes], requests: int = 4) -> None:
    """`requests` good Classify calls, and one that fails (NOT_FOUND), so that every request
    metric has a series, an error code among them."""
    from service.client import Client, ClientError

    with Client(served.target) as client:
        for _ in range(requests):
            assert all(p.ok for p in client.classify(images, MODEL))
        with pytest.raises(ClientError):
            client.classify(images[:1], MODEL, version=99)


@pytest.fixture(scope="module")
def busy_server(repository: Path, sample_images) -> Iterator[tuple[Served, list[bytes]]]:
    """A server on the test repository that has answered good and bad requests; and the
    encoded images it was sent."""
    served = start_server(repository)
    images = [png(image) for image in sample_images[0][:4]]
    send_traffic(served, images)
    yield served, images
    assert served.stop() == 0


@pytest.fixture(scope="module")
def exported_names(busy_server) -> set[str]:
    """Every sample name on the busy server's /metrics (`_total`, `_bucket`, ... included)."""
    return {s.name for samples in scrape(busy_server[0]).values() for s in samples}
