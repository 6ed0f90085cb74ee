"""Kubernetes manifests and the compose file, checked offline: kubernetes-validate --strict on
every built-in kind, the compose-spec schema, and what no schema knows: that they agree with
the server's CLI, its defaults, the image and each other."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.__main__ import build_parser, serve_config
from service.server import LIVENESS
from tests.conftest import ROOT
from tests.deploy.conftest import (
    ALERTS,
    BUILT_IN_FOLDERS,
    DEPLOY,
    K8S,
    PROMETHEUS_CONFIG,
    dockerfile_stages,
    k8s_files,
    k8s_objects,
    run_tool,
    stage_env,
    venv_tool,
    yaml_documents,
)

BUILT_IN = {"v1", "apps/v1", "batch/v1", "autoscaling/v2", "policy/v1"}
CRD_FOLDERS = {
    "monitoring": {"monitoring.coreos.com/v1"},
    "kserve": {"serving.kserve.io/v1alpha1", "serving.kserve.io/v1beta1"},
}
GPU = "nvidia.com/gpu"
COMPOSE = DEPLOY / "compose" / "compose.yaml"


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    return k8s_objects()


def serve_env_names() -> set[str]:
    """The CNN_SERVING_* variables `python -m service serve --help` documents."""
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(re.findall(r"\[env (CNN_SERVING_\w+)\]", " ".join(result.stdout.split())))


def parse_with_env(args: list[str], env: dict[str, str], monkeypatch) -> Any:
    """`python -m service ARGS` as the CLI parses it with these environment variables."""
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return build_parser().parse_args(args)


def container(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]["template"]["spec"] if "template" in obj["spec"] else obj["spec"]
    assert len(spec["containers"]) == 1
    return spec["containers"][0]


def image_uid() -> int:
    user = next(i for i in dockerfile_stages()[-1] if i.keyword == "USER")
    return int(user.value.split(":")[0])


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_builtin_manifests_pass_kubernetes_validate_strict(version: str):
    files = k8s_files(*BUILT_IN_FOLDERS)
    result = run_tool(venv_tool("kubernetes-validate"), "--strict", "-k", version, *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN" not in result.stdout + result.stderr  # a kind it has no schema for
    passed = re.findall(r"INFO (\S+) passed for resource", result.stdout)
    assert {ROOT / p for p in passed} == set(files)


def test_crd_objects_live_in_their_own_files(k8s):
    assert {doc["apiVersion"] for doc in k8s.values()} <= BUILT_IN
    crds: dict[str, dict[str, Any]] = {}
    for folder, groups in CRD_FOLDERS.items():
        objects = k8s_objects(K8S / folder)
        assert {doc["apiVersion"] for doc in objects.values()} <= groups
        crds |= objects
    kinds = {key.split("/")[0] for key in [*k8s, *crds]}
    assert kinds >= {
        *("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"),
        *("ConfigMap", "Job", "ServiceMonitor", "ServingRuntime", "InferenceService"),
    }


def test_deployment_serves_on_a_gpu_node_with_the_servers_ports_and_probes(k8s, monkeypatch):
    deployment = k8s["Deployment/cnn-serving"]
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    assert main["resources"]["limits"][GPU] == 1
    assert {"cpu", "memory"} <= main["resources"]["requests"].keys()
    assert pod["nodeSelector"] == {f"{GPU}.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]

    env = configmap_env(k8s, main)
    args = parse_with_env(main["args"], env, monkeypatch)
    config = serve_config(args)
    assert config.device == "cuda"
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {
        "http": config.http_port, "grpc": config.grpc_port, "metrics": config.metrics_port
    }  # fmt: skip
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[kind]["grpc"]["port"] == config.grpc_port, kind
    # readiness asks the whole server (a ready model needed); the others only that it answers
    assert main["readinessProbe"]["grpc"].get("service", "") == ""
    for kind in ("startupProbe", "livenessProbe"):
        assert main[kind]["grpc"]["service"] == LIVENESS, kind

    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    models = mounts[str(config.repository)]
    assert models["readOnly"] and "persistentVolumeClaim" in volumes[models["name"]]
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert f"PersistentVolumeClaim/{claim}" in k8s


def configmap_env(k8s, main: dict[str, Any]) -> dict[str, str]:
    (source,) = main["envFrom"]
    return k8s[f"ConfigMap/{source['configMapRef']['name']}"]["data"]


def test_pods_run_as_the_images_non_root_user(k8s):
    for key in ("Deployment/cnn-serving", "Job/cnn-serving-score"):
        pod = k8s[key]["spec"]["template"]["spec"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] == image_uid(), key
        main = container(k8s[key])["securityContext"]
        assert main["allowPrivilegeEscalation"] is False and main["capabilities"]["drop"] == ["ALL"]
        assert pod["automountServiceAccountToken"] is False


def test_pod_is_killed_only_after_its_drain(k8s, monkeypatch):
    deployment = k8s["Deployment/cnn-serving"]
    main = container(deployment)
    drain_s = serve_config(
        parse_with_env(main["args"], configmap_env(k8s, main), monkeypatch)
    ).drain_timeout_s
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + drain_s


def test_configmap_sets_only_real_server_options(k8s, monkeypatch):
    data = k8s["ConfigMap/cnn-serving-config"]["data"]
    assert set(data) <= serve_env_names()
    config = serve_config(
        parse_with_env(["serve"], data | {"CNN_SERVING_REPOSITORY": "/m"}, monkeypatch)
    )
    assert config.max_batch_size == int(data["CNN_SERVING_MAX_BATCH_SIZE"])


def test_service_autoscaler_budget_and_monitor_select_the_server(k8s):
    pod_labels = k8s["Deployment/cnn-serving"]["spec"]["template"]["metadata"]["labels"]
    job_labels = k8s["Job/cnn-serving-score"]["spec"]["template"]["metadata"]["labels"]
    service = k8s["Service/cnn-serving"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert not selector.items() <= job_labels.items()  # scoring pods take no traffic
    main = container(k8s["Deployment/cnn-serving"])
    container_ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert {p["targetPort"]: p["port"] for p in service["spec"]["ports"]} == container_ports

    hpa = k8s["HorizontalPodAutoscaler/cnn-serving"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "cnn-serving",
    }
    assert "replicas" not in k8s["Deployment/cnn-serving"]["spec"]  # the HPA owns the count
    pdb = k8s["PodDisruptionBudget/cnn-serving"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["minAvailable"] < hpa["minReplicas"] <= hpa["maxReplicas"]  # drains can proceed

    (monitor,) = k8s_objects(K8S / "monitoring").values()
    monitored = monitor["spec"]["selector"]["matchLabels"]
    assert monitored.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # The Operator names the job after the Service: the name the alert rules and compose use.
    assert {service["metadata"]["name"]} == alert_jobs() == scrape_jobs()


def alert_jobs() -> set[str]:
    return set(re.findall(r'job="([^"]+)"', ALERTS.read_text(encoding="utf-8")))


def scrape_jobs() -> set[str]:
    jobs = yaml_documents(PROMETHEUS_CONFIG)[0]["scrape_configs"]
    return {job["job_name"] for job in jobs if job["job_name"] != "prometheus"}


def test_score_job_reads_a_volume_and_scores_through_the_service(k8s, monkeypatch):
    job = k8s["Job/cnn-serving-score"]
    main = container(job)
    args = main["args"]
    assert args[0] == "score" and GPU not in main["resources"].get("limits", {})
    service = k8s["Service/cnn-serving"]
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert args[args.index("--server") + 1] == f"{service['metadata']['name']}:{grpc_port}"
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert mounts[args[1]]["readOnly"]  # the input folder is never written
    out = Path(args[args.index("--out") + 1])
    assert str(out.parent) in mounts and not mounts[str(out.parent)].get("readOnly")
    volumes = job["spec"]["template"]["spec"]["volumes"]
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    }
    assert {f"PersistentVolumeClaim/{c}" for c in claims} <= k8s.keys()
    score_help = [sys.executable, "-m", "service", "score", "--help"]
    if subprocess.run(score_help, cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("no `python -m service score` in this checkout yet to parse the Job's args")
    parse_with_env(args, stage_env(dockerfile_stages()[-1]), monkeypatch)


def test_kserve_runtime_serves_v2_grpc_with_our_image(k8s, monkeypatch):
    crds = k8s_objects(K8S / "kserve")
    runtime = crds["ServingRuntime/cnn-serving"]["spec"]
    (main,) = runtime["containers"]
    assert main["image"] == container(k8s["Deployment/cnn-serving"])["image"]
    assert "grpc-v2" in runtime["protocolVersions"]
    env = {e["name"]: e["value"] for e in main["env"]}
    config = serve_config(parse_with_env(main["args"], env, monkeypatch))
    assert str(config.repository) == "/mnt/models"  # where KServe puts storageUri
    assert config.device == "cuda" and main["resources"]["limits"][GPU] == 1
    (port,) = main["ports"]
    assert (port["name"], port["containerPort"]) == ("h2c", config.grpc_port)
    assert main["securityContext"]["runAsUser"] == image_uid()

    service = crds["InferenceService/fashion"]["spec"]["predictor"]
    model = service["model"]
    assert model["runtime"] == "cnn-serving" and model["protocolVersion"] == "grpc-v2"
    assert model["modelFormat"] in [
        {k: f[k] for k in ("name", "version")} for f in runtime["supportedModelFormats"]
    ]
    assert model["resources"]["limits"][GPU] == 1


def test_compose_file_follows_the_compose_spec():
    result = run_tool(
        venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_wires_the_gpu_server_prometheus_and_grafana(monkeypatch):
    compose = yaml_documents(COMPOSE)[0]["services"]
    here = COMPOSE.parent
    server = compose["cnn-serving"]
    assert (here / server["build"]["context"]).resolve() == ROOT
    assert (here / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    env = {k: re.sub(r"\$\{\w+:-(.*)\}", r"\1", v) for k, v in server["environment"].items()}
    command = next(i for i in dockerfile_stages()[-1] if i.keyword == "CMD").exec_form
    config = serve_config(
        parse_with_env(command, stage_env(dockerfile_stages()[-1]) | env, monkeypatch)
    )
    assert config.device == "cuda"
    (models,) = server["volumes"]
    assert models["target"] == str(config.repository) and models["read_only"]
    ports = (config.http_port, config.grpc_port, config.metrics_port)
    assert {f"{p}:{p}" for p in ports} <= set(server["ports"])
    assert int(server["stop_grace_period"].rstrip("s")) > config.drain_timeout_s

    prometheus = compose["prometheus"]
    mounts = {v["target"]: here / v["source"] for v in prometheus["volumes"] if isinstance(v, dict)}
    assert mounts["/etc/prometheus"].resolve() == PROMETHEUS_CONFIG.parent
    job = yaml_documents(PROMETHEUS_CONFIG)[0]["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == [f"cnn-serving:{config.metrics_port}"]

    grafana = compose["grafana"]
    mounts = {
        v["target"]: (here / v["source"]).resolve()
        for v in grafana["volumes"]
        if isinstance(v, dict)
    }
    provisioning = mounts["/etc/grafana/provisioning"]
    (provider,) = yaml_documents(provisioning / "dashboards" / "cnn-serving.yml")[0]["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / "cnn-serving.dashboard.json").is_file()
    (source,) = yaml_documents(provisioning / "datasources" / "prometheus.yml")[0]["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose
