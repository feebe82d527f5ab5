"""Offline checks of k8s/: every overlay renders, validates against the Kubernetes 1.30 and 1.32
schemas (strict), and follows the deployment policies a reviewer would otherwise check by eye."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from typing import Any

import kubernetes_validate
import pytest
import yaml

from duoserve.config import parse_config
from tests.deploy.deploy_checks import (
    BACKENDS,
    COREDNS_TTL_S,
    DEFAULT_RESOLVE_INTERVAL_S,
    GPU_OVERLAYS,
    K8S,
    OVERLAYS,
    ROOT,
    autoscaler_metric_problems,
    container_problems,
    containers,
    cpu_cores,
    disruption_problems,
    find,
    gpu_requests,
    ident,
    image_problems,
    label_problems,
    load_yaml,
    network_problems,
    pod_labels,
    pod_spec,
    prestop_seconds,
    probe_problems,
    render,
    service_problems,
    torchserve_stop_timeout_s,
    workloads,
)

KUBERNETES_VERSIONS = ("1.30.0", "1.32.0")
# Custom resources: kubernetes-validate bundles only the built-in API. Their structure is
# checked by the targeted tests below instead.
CRDS_WITHOUT_SCHEMA = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "Prometheus Operator CRD",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "Prometheus Operator CRD",
    ("keda.sh/v1alpha1", "ScaledObject"): "KEDA CRD",
}


def test_the_expected_overlays_exist() -> None:
    assert {"cpu", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay: str, version: str) -> None:
    problems = []
    for doc in render(overlay):
        if (doc["apiVersion"], doc["kind"]) in CRDS_WITHOUT_SCHEMA:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{ident(doc)}: {error.message} at {list(error.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{ident(doc)}: {doc['apiVersion']} is not served by {version}")
    assert problems == []


def test_strict_validation_rejects_a_misspelt_field() -> None:
    # Proves the validator is live: a typo that kubectl would silently drop must fail here.
    deployment = copy.deepcopy(find(render("cpu"), "Deployment", "gateway"))
    assert deployment is not None
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_have_resources_probes_drain_and_security_context(overlay: str) -> None:
    assert container_problems(render(overlay)) == []


def test_policy_check_catches_a_bare_container() -> None:
    docs = render("cpu")
    gateway = find(docs, "Deployment", "gateway")
    assert gateway is not None
    bare = gateway["spec"]["template"]["spec"]["containers"][0]
    for key in ("readinessProbe", "securityContext", "resources", "lifecycle"):
        bare.pop(key)
    problems = container_problems(docs)
    assert any("no readinessProbe" in p for p in problems)
    assert any("no limits.memory" in p for p in problems)
    assert any("capabilities.drop" in p for p in problems)
    assert any("preStop" in p for p in problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_match_each_server(overlay: str) -> None:
    assert probe_problems(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay: str) -> None:
    docs = render(overlay)
    assert image_problems(docs) == []
    broken = copy.deepcopy(docs)
    next(workloads(broken))["spec"]["template"]["spec"]["containers"][0]["image"] = "x/y:latest"
    assert image_problems(broken) != []


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlay_puts_gpus_on_both_backends_only(overlay: str) -> None:
    docs = render(overlay)
    assert gpu_requests(docs) == {"gateway": 0, "torchserve": 1, "tfserving": 1}
    for name in BACKENDS:
        workload = find(docs, "Deployment", name)
        assert workload is not None
        spec = pod_spec(workload)
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert containers(workload)[0]["image"].endswith("-gpu")
    gateway = find(docs, "Deployment", "gateway")
    assert gateway is not None and "nodeSelector" not in pod_spec(gateway)


def test_cpu_overlay_requests_no_gpu_and_uses_cpu_images() -> None:
    docs = render("cpu")
    assert set(gpu_requests(docs).values()) == {0}
    for name in BACKENDS:
        workload = find(docs, "Deployment", name)
        assert workload is not None and containers(workload)[0]["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_reach_real_ports_and_never_management_or_grpc(overlay: str) -> None:
    docs = render(overlay)
    assert service_problems(docs) == []
    torchserve = find(docs, "Service", "torchserve")
    assert torchserve is not None
    torchserve["spec"]["ports"].append({"name": "mgmt", "port": 8081, "targetPort": 8081})
    assert any("8081" in p for p in service_problems(docs))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_only_gateway_and_prometheus(overlay: str) -> None:
    docs = render(overlay)
    assert network_problems(docs) == []
    # An allow-all rule on a backend must be reported.
    policy = find(docs, "NetworkPolicy", "torchserve-from-gateway")
    assert policy is not None
    policy["spec"]["ingress"].append({"ports": [{"port": 8081}]})
    assert network_problems(docs) != []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_carries_the_app_labels(overlay: str) -> None:
    assert label_problems(render(overlay)) == []


def test_kustomizations_use_labels_not_commonlabels() -> None:
    for path in K8S.rglob("kustomization.yaml"):
        assert "commonLabels" not in load_yaml(path), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_models_configmap_passes_the_gateway_config_check(overlay: str) -> None:
    docs = render(overlay)
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "models.yaml" in d.get("data", {})]
    assert len(maps) == 1
    configmap = maps[0]
    # A fixed name: an edit of models.yaml updates the ConfigMap in place and reaches running
    # gateways as a reload, not a rollout.
    assert configmap["metadata"]["name"] == "duoserve-models"
    import yaml

    config = parse_config(yaml.safe_load(configmap["data"]["models.yaml"]), "ConfigMap")
    gateway = find(docs, "Deployment", "gateway")
    assert gateway is not None
    mounted = [v for v in pod_spec(gateway)["volumes"] if "configMap" in v]
    assert [v["configMap"]["name"] for v in mounted] == [configmap["metadata"]["name"]]
    # Mounted as a folder: a subPath mount would never see the kubelet's update.
    (container,) = [c for c in pod_spec(gateway)["containers"] if c["name"] == "gateway"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == mounted[0]["name"])
    assert "subPath" not in mount
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["DUOSERVE_CONFIG"] == f"{mount['mountPath']}/models.yaml"
    # Every backend address names a Service and a port it serves.
    service_ports = {
        d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]}
        for d in docs
        if d["kind"] == "Service"
    }
    for name, backend in config.backends.items():
        for address in filter(
            None, (getattr(backend, "url", None), getattr(backend, "grpc", None))
        ):
            host, port = re.sub(r"^https?://", "", address).split(":")
            assert int(port) in service_ports.get(host, set()), f"{name}: {address}"
        # TorchServe runs with token auth off in the cluster (see k8s/README.md).
        assert getattr(backend, "token_file", None) is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_keys_come_from_a_secret_that_is_not_committed(overlay: str) -> None:
    docs = render(overlay)
    assert [d for d in docs if d["kind"] == "Secret"] == []
    gateway = find(docs, "Deployment", "gateway")
    assert gateway is not None
    secrets = [v["secret"]["secretName"] for v in pod_spec(gateway)["volumes"] if "secret" in v]
    assert secrets == ["duoserve-api-keys"]
    env = {e["name"]: e.get("value") for e in containers(gateway)[0]["env"]}
    assert env["DUOSERVE_API_KEYS_FILE"].startswith("/var/run/secrets/duoserve/api-keys/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_and_budgets_target_real_workloads(overlay: str) -> None:
    docs = render(overlay)
    names = {d["metadata"]["name"] for d in workloads(docs)}
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    for doc in hpas + scaled:
        assert doc["spec"]["scaleTargetRef"]["name"] in names, ident(doc)
    targets = [d["spec"]["scaleTargetRef"]["name"] for d in hpas + scaled]
    assert len(targets) == len(set(targets)), "two autoscalers on one workload"
    for name in targets:
        workload = find(docs, "Deployment", name)
        assert workload is not None and "replicas" not in workload["spec"], name
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(
            all(pod_labels(w).get(k) == v for k, v in selector.items()) for w in workloads(docs)
        ), ident(pdb)
    assert {p["metadata"]["name"] for p in docs if p["kind"] == "PodDisruptionBudget"} == names
    gateway_hpa = find(docs, "HorizontalPodAutoscaler", "gateway")
    assert gateway_hpa is not None
    kinds = {m["type"] for m in gateway_hpa["spec"]["metrics"]}
    # In flight per pod where prometheus-adapter serves it, CPU everywhere.
    assert kinds == ({"Resource", "Pods"} if ADAPTER_METRICS[overlay] else {"Resource"})


def _adapter_metric_names() -> set[str]:
    values = load_yaml(K8S / "overlays" / "gpu" / "prometheus-adapter-values.yaml")
    rules = values["rules"]
    return {r["name"]["as"] for r in rules.get("custom", []) + rules.get("external", [])}


# The custom/external metrics each overlay's prerequisites serve (k8s/README.md): `gpu` asks
# for prometheus-adapter with prometheus-adapter-values.yaml; `cpu` for nothing beyond
# metrics-server; `gpu-keda` for KEDA, which serves only its own ScaledObjects' HPAs.
ADAPTER_METRICS = {"cpu": set(), "gpu": _adapter_metric_names(), "gpu-keda": set()}


def test_every_overlay_says_which_adapter_it_installs() -> None:
    assert set(OVERLAYS) == set(ADAPTER_METRICS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpas_read_no_metric_that_no_installed_adapter_serves(overlay: str) -> None:
    docs = render(overlay)
    assert autoscaler_metric_problems(docs, ADAPTER_METRICS[overlay]) == []
    # The base gateway HPA once read a Pods metric in every overlay.
    hpa = find(docs, "HorizontalPodAutoscaler", "gateway")
    assert hpa is not None
    hpa["spec"]["metrics"].append(
        {"type": "Pods", "pods": {"metric": {"name": "made_up"}, "target": {}}}
    )
    assert autoscaler_metric_problems(docs, ADAPTER_METRICS[overlay]) != []


def test_keda_scales_down_as_slowly_as_the_hpas_it_replaces() -> None:
    # cooldownPeriod only delays scaling to zero; between replicas KEDA's HPA scales down with
    # its own behaviour, 300 s by default unless the ScaledObject sets it.
    hpas = {
        d["metadata"]["name"]: d for d in render("gpu") if d["kind"] == "HorizontalPodAutoscaler"
    }
    scaled = [d for d in render("gpu-keda") if d["kind"] == "ScaledObject"]
    assert {d["metadata"]["name"] for d in scaled} == {"torchserve", "tfserving"}
    for so in scaled:
        spec = so["spec"]
        hpa = hpas[spec["scaleTargetRef"]["name"]]["spec"]
        assert spec["minReplicaCount"] == hpa["minReplicas"] >= 1
        assert spec["maxReplicaCount"] == hpa["maxReplicas"]
        assert "cooldownPeriod" not in spec, "it does nothing unless minReplicaCount is 0"
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior == hpa["behavior"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_drain_or_a_rollout_never_takes_a_guarded_deployment_down(overlay: str) -> None:
    docs = render(overlay)
    assert disruption_problems(docs) == []
    for name in ("torchserve", "tfserving"):
        broken = copy.deepcopy(docs)
        workload = find(broken, "Deployment", name)
        assert workload is not None
        for doc in broken:
            if doc["kind"] == "HorizontalPodAutoscaler" and doc["metadata"]["name"] == name:
                doc["spec"]["minReplicas"] = 1
            if doc["kind"] == "ScaledObject" and doc["metadata"]["name"] == name:
                doc["spec"]["minReplicaCount"] = 1
        workload["spec"]["replicas"] = 1
        assert any("a drain would evict the last one" in p for p in disruption_problems(broken))


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_backends_roll_without_a_surge_pod(overlay: str) -> None:
    docs = render(overlay)
    for name in BACKENDS:
        workload = find(docs, "Deployment", name)
        assert workload is not None
        assert workload["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
        workload["spec"]["strategy"]["rollingUpdate"]["maxSurge"] = 1
    assert any("leaves its new pod Pending" in p for p in disruption_problems(docs))


def _torchserve_models() -> dict[str, Any]:
    text = (ROOT / "services/torchserve/config.properties").read_text()
    line = re.search(r"^models=(.*)$", text, re.M)
    assert line is not None
    models: dict[str, Any] = json.loads(line.group(1))
    return models


def test_torchserve_starts_the_workers_its_config_names() -> None:
    # TorchServe starts minWorkers and, with the management API closed, never more.
    for model, versions in _torchserve_models().items():
        for version, config in versions.items():
            assert config["minWorkers"] == config["maxWorkers"], f"{model} {version}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_torchserve_workers_and_stop_fit_each_pod(overlay: str) -> None:
    workload = find(render(overlay), "Deployment", "torchserve")
    assert workload is not None
    (container,) = containers(workload)
    cores = cpu_cores(container["resources"]["limits"]["cpu"])
    workers = sum(
        c["maxWorkers"] for versions in _torchserve_models().values() for c in versions.values()
    )
    assert workers <= cores, f"{workers} workers under a {cores}-CPU limit"
    # preStop pause, then the entrypoint's bounded stop, inside the grace period.
    grace = pod_spec(workload)["terminationGracePeriodSeconds"]
    assert grace >= prestop_seconds(container) + torchserve_stop_timeout_s() + 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tfserving_sizes_its_threads_from_its_cpu_limit(overlay: str) -> None:
    workload = find(render(overlay), "Deployment", "tfserving")
    assert workload is not None
    (container,) = containers(workload)
    env = {e["name"]: e for e in container.get("env", [])}
    source = env["CPU_LIMIT"]["valueFrom"]["resourceFieldRef"]
    assert source["resource"] == "limits.cpu" and source.get("containerName") == "tfserving"
    assert str(source.get("divisor", "1")) == "1"
    args = container["args"]
    for flag in ("tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism"):
        assert f"--{flag}=$(CPU_LIMIT)" in args
    batching = (ROOT / "services/tfserving/batching.config").read_text()
    threads = re.search(r"num_batch_threads \{ value: (\d+) \}", batching)
    assert threads is not None
    assert int(threads.group(1)) <= cpu_cores(container["resources"]["limits"]["cpu"])


def test_grafana_sidecar_puts_the_dashboards_in_their_folder() -> None:
    values = load_yaml(K8S / "components/monitoring/kube-prometheus-stack-values.yaml")
    sidecar = values["grafana"]["sidecar"]["dashboards"]
    dashboards = load_yaml(K8S / "components/monitoring/grafana-dashboards.yaml")
    labels, annotations = dashboards["metadata"]["labels"], dashboards["metadata"]["annotations"]
    assert labels[sidecar["label"]] == sidecar["labelValue"]
    assert sidecar["searchNamespace"] == "ALL"
    # kube-prometheus-stack sets no folderAnnotation: without it the annotation is ignored.
    assert sidecar["folderAnnotation"] in annotations
    assert sidecar["provider"]["foldersFromFilesStructure"] is True


def _gateway_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (configmap,) = [
        d for d in docs if d["kind"] == "ConfigMap" and "models.yaml" in d.get("data", {})
    ]
    config: dict[str, Any] = yaml.safe_load(configmap["data"]["models.yaml"])
    return config


def _called_services(config: dict[str, Any]) -> dict[str, list[tuple[str, int, float]]]:
    """Service name -> (backend, port, resolve interval) for every address the gateway calls."""
    called: dict[str, list[tuple[str, int, float]]] = {}
    for name, backend in config["backends"].items():
        interval = float(backend.get("resolve_interval_s", DEFAULT_RESOLVE_INTERVAL_S))
        for address in filter(None, (backend.get("url"), backend.get("grpc"))):
            host, port = re.sub(r"^https?://", "", address).split(":")
            called.setdefault(host, []).append((name, int(port), interval))
    return called


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_services_the_gateway_calls_are_headless(overlay: str) -> None:
    # The gateway balances per request over what DNS returns; a ClusterIP would hand it one
    # virtual address that kube-proxy balances per connection.
    docs = render(overlay)
    called = _called_services(_gateway_config(docs))
    assert set(called) == {"torchserve", "tfserving"}
    for host, uses in called.items():
        service = find(docs, "Service", host)
        assert service is not None, host
        assert service["spec"].get("clusterIP") == "None", f"{host} is not headless"
        # Only Ready pods in the answer: a starting or terminating backend gets no requests.
        assert service["spec"].get("publishNotReadyAddresses", False) is False
        ports = {p["port"] for p in service["spec"]["ports"]}
        assert {port for _, port, _ in uses} <= ports
    # The ports the base always exposed, unchanged.
    for host, expected in (("torchserve", {8080, 8082}), ("tfserving", {8500, 8501})):
        service = find(docs, "Service", host)
        assert service is not None and {p["port"] for p in service["spec"]["ports"]} == expected
    # The gateway itself stays behind a ClusterIP (clients do not balance themselves).
    gateway = find(docs, "Service", "gateway")
    assert gateway is not None and "clusterIP" not in gateway["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_backend_serves_until_every_gateway_has_stopped_resolving_it(overlay: str) -> None:
    # A terminating pod leaves the DNS answer at once, but a gateway may use its last answer
    # for resolve_interval_s, and that answer may be CoreDNS's cached one (TTL).
    docs = render(overlay)
    for host, uses in _called_services(_gateway_config(docs)).items():
        workload = find(docs, "Deployment", host)
        assert workload is not None
        (container,) = containers(workload)
        needed = max(interval for _, _, interval in uses) + COREDNS_TTL_S
        assert prestop_seconds(container) >= needed, host


@pytest.mark.parametrize("overlay", ["gpu"])
def test_backends_scale_on_a_per_framework_signal_the_adapter_serves(overlay: str) -> None:
    docs = render(overlay)
    served = _adapter_metric_names()
    frameworks = {}
    for doc in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        for metric in doc["spec"]["metrics"]:
            if metric["type"] == "Pods":
                assert metric["pods"]["metric"]["name"] in served
            if metric["type"] == "External":
                ext = metric["external"]["metric"]
                assert ext["name"] in served
                frameworks[doc["metadata"]["name"]] = ext["selector"]["matchLabels"]["framework"]
    assert frameworks == {"torchserve": "pytorch", "tfserving": "tensorflow"}


def test_keda_overlay_replaces_the_backend_hpas() -> None:
    docs = render("gpu-keda")
    assert find(docs, "HorizontalPodAutoscaler", "torchserve") is None
    assert find(docs, "HorizontalPodAutoscaler", "tfserving") is None
    assert find(docs, "HorizontalPodAutoscaler", "gateway") is not None
    queries = {
        d["spec"]["scaleTargetRef"]["name"]: d["spec"]["triggers"][0]["metadata"]["query"]
        for d in docs
        if d["kind"] == "ScaledObject"
    }
    assert 'framework="pytorch"' in queries["torchserve"]
    assert 'framework="tensorflow"' in queries["tfserving"]


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_service_monitors_scrape_named_ports_with_the_compose_job_names(overlay: str) -> None:
    docs = render(overlay)
    jobs = {}
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        endpoint = monitor["spec"]["endpoints"][0]
        job = next(r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "job")
        jobs[monitor["metadata"]["name"]] = job
        if "namespaceSelector" in monitor["spec"]:
            continue  # the GPU Operator's exporter, outside this namespace
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s
            for s in docs
            if s["kind"] == "Service"
            and all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())
        ]
        assert services, ident(monitor)
        assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
    compose_jobs = {
        c["job_name"]
        for c in load_yaml(ROOT / "deploy/prometheus/prometheus.yml")["scrape_configs"]
    }
    assert set(jobs.values()) == compose_jobs


def test_monitoring_copies_are_current() -> None:
    script = K8S / "components" / "monitoring" / "generate.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_monitoring_component_carries_rules_and_dashboards(overlay: str) -> None:
    docs = render(overlay)
    rule = find(docs, "PrometheusRule", "duoserve")
    assert rule is not None
    source_groups = [
        g["name"]
        for path in sorted((ROOT / "deploy/prometheus/rules").glob("*.yml"))
        for g in load_yaml(path)["groups"]
    ]
    assert [g["name"] for g in rule["spec"]["groups"]] == source_groups
    assert all("expr" in r for g in rule["spec"]["groups"] for r in g["rules"])
    dashboards = find(docs, "ConfigMap", "duoserve-grafana-dashboards")
    assert dashboards is not None
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = {p.name for p in (ROOT / "deploy/grafana/dashboards").glob("*.json")}
    assert set(dashboards["data"]) == expected
