"""Policy checks on rendered Kubernetes objects, shared by the deploy tests.

Each check returns a list of human-readable problems; an empty list means the policy holds.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(
    p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file()
)
GPU_OVERLAYS = [name for name in OVERLAYS if name.startswith("gpu")]
BACKENDS = ("torchserve", "tfserving")
# Management and gRPC ports of the backends: never in a Service, never opened by a policy.
FORBIDDEN_PORTS = {8081, 7070, 7071}
REQUIRED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/version",
)
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

Doc = dict[str, Any]


@cache
def _render_text(path: Path) -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render k8s/ (it is part of the machine image)"
    done = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return done.stdout


def render(overlay: str) -> list[Doc]:
    """The objects `kubectl kustomize k8s/overlays/<overlay>` prints (fresh copies each call)."""
    text = _render_text(K8S / "overlays" / overlay)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def ident(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def workloads(docs: list[Doc]) -> Iterator[Doc]:
    return (d for d in docs if d["kind"] in WORKLOAD_KINDS)


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    found: list[Doc] = spec.get("initContainers", []) + spec["containers"]
    return found


def find(docs: list[Doc], kind: str, name: str) -> Doc | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def prestop_seconds(container: Doc) -> int | None:
    pre = container.get("lifecycle", {}).get("preStop")
    if not pre:
        return None
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    command = " ".join(pre.get("exec", {}).get("command", []))
    match = re.search(r"\bsleep\s+(\d+)", command)
    return int(match.group(1)) if match else 0


def container_problems(docs: list[Doc]) -> list[str]:
    """Resources, probes, drain and a locked-down securityContext on every container."""
    problems = []
    for doc in workloads(docs):
        spec = pod_spec(doc)
        pod_sc = spec.get("securityContext", {})
        grace = spec.get("terminationGracePeriodSeconds", 30)
        for c in containers(doc):
            where = f"{ident(doc)} container {c['name']}"
            resources = c.get("resources", {})
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in resources.get(kind, {}):
                        problems.append(f"{where}: no {kind}.{res}")
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    problems.append(f"{where}: no {probe}")
            pause = prestop_seconds(c)
            if not pause:
                problems.append(f"{where}: no preStop pause")
            elif grace <= pause:
                problems.append(f"{where}: grace period {grace}s does not outlast preStop {pause}s")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities.drop lacks ALL")
            if sc.get("capabilities", {}).get("add"):
                problems.append(f"{where}: adds capabilities")
            if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
                problems.append(f"{where}: runAsNonRoot is not true")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                problems.append(f"{where}: runs as uid 0")
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem is writable")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
    return problems


def image_problems(docs: list[Doc]) -> list[str]:
    """Every image names a tag (or digest), never `latest`."""
    problems = []
    for doc in workloads(docs):
        for c in containers(doc):
            image = c["image"]
            if "@sha256:" in image:
                continue
            name, _, tag = image.rpartition(":")
            if not name or "/" in tag or tag in ("", "latest"):
                problems.append(f"{ident(doc)} container {c['name']}: image {image} is not pinned")
    return problems


def _http_path(probe: Doc | None) -> str | None:
    path: str | None = (probe or {}).get("httpGet", {}).get("path")
    return path


def probe_problems(docs: list[Doc]) -> list[str]:
    """Each server's probes ask the question that server answers."""
    problems = []
    for doc in workloads(docs):
        for c in containers(doc):
            where = f"{ident(doc)} container {c['name']}"
            ready, live = c.get("readinessProbe"), c.get("livenessProbe")
            if c["name"] == "gateway":
                if _http_path(ready) != "/v2/health/ready":
                    problems.append(f"{where}: readiness is not GET /v2/health/ready")
                if _http_path(live) != "/v2/health/live":
                    problems.append(f"{where}: liveness is not GET /v2/health/live")
            elif c["name"] == "torchserve":
                for name, probe in (("readiness", ready), ("liveness", live)):
                    if _http_path(probe) != "/ping":
                        problems.append(f"{where}: {name} is not GET /ping")
            elif c["name"] == "tfserving":
                command = " ".join((ready or {}).get("exec", {}).get("command", []))
                if "/v1/models/digits" not in command or "AVAILABLE" not in command:
                    problems.append(f"{where}: readiness does not require model status AVAILABLE")
                if _http_path(live) != "/v1/models/digits":
                    problems.append(f"{where}: liveness is not GET /v1/models/digits")
    return problems


def gpu_requests(docs: list[Doc]) -> dict[str, int]:
    """nvidia.com/gpu limit of each workload's containers, by workload name."""
    found = {}
    for doc in workloads(docs):
        total = sum(
            int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            for c in containers(doc)
        )
        found[doc["metadata"]["name"]] = total
    return found


def _service_ports(service: Doc) -> set[int]:
    ports = set()
    for port in service["spec"].get("ports", []):
        ports.add(int(port["port"]))
        if isinstance(port.get("targetPort"), int):
            ports.add(port["targetPort"])
    return ports


def _container_port(workload: Doc, target: int | str) -> int | None:
    for c in containers(workload):
        for port in c.get("ports", []):
            if target in (port["containerPort"], port.get("name")):
                return int(port["containerPort"])
    return None


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(doc: Doc) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"].get("labels", {})
    return labels


def service_problems(docs: list[Doc]) -> list[str]:
    """Services select a workload, reach named container ports, never management or gRPC."""
    problems = []
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"].get("selector", {})
        targets = [w for w in workloads(docs) if _selects(selector, pod_labels(w))]
        if not targets:
            problems.append(f"{ident(svc)} selects no workload")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            resolved = [_container_port(w, target) for w in targets]
            if None in resolved:
                problems.append(f"{ident(svc)} port {port['port']}: no container port {target}")
            if FORBIDDEN_PORTS & ({int(port["port"])} | {p for p in resolved if p}):
                problems.append(f"{ident(svc)} exposes management/gRPC port {port['port']}")
    return problems


def allowed_ingress(docs: list[Doc], workload: Doc) -> list[tuple[int, list[Doc]]] | None:
    """(port, peers) pairs the NetworkPolicies allow into a workload's pods; None: no policy."""
    labels = pod_labels(workload)
    policies = [
        p
        for p in docs
        if p["kind"] == "NetworkPolicy"
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)
    ]
    if not policies:
        return None
    allowed = []
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from", [])
            for port in rule.get("ports", [{"port": 0}]):  # 0: every port
                target = port["port"]
                number = target if isinstance(target, int) else _container_port(workload, target)
                allowed.append((int(number or 0), peers))
    return allowed


def network_problems(docs: list[Doc]) -> list[str]:
    """Backends: deny by default, inference ports from the gateway only, metrics from Prometheus."""
    problems = []
    gateway = find(docs, "Deployment", "gateway")
    assert gateway is not None, "no gateway Deployment rendered"
    gateway_labels = pod_labels(gateway)
    inference = {"torchserve": {8080}, "tfserving": {8500, 8501}}
    metrics = {"torchserve": {8082}, "tfserving": {8501}}
    for name in BACKENDS:
        workload = find(docs, "Deployment", name)
        assert workload is not None, f"no {name} Deployment rendered"
        allowed = allowed_ingress(docs, workload)
        if allowed is None:
            problems.append(f"{name}: no NetworkPolicy selects its pods")
            continue
        for port, peers in allowed:
            if port == 0 or not peers:
                problems.append(f"{name}: a policy allows port {port or 'any'} from anywhere")
                continue
            if port in FORBIDDEN_PORTS:
                problems.append(f"{name}: a policy opens management/gRPC port {port}")
            for peer in peers:
                pod_sel = peer.get("podSelector", {}).get("matchLabels", {})
                from_gateway = "namespaceSelector" not in peer and _selects(pod_sel, gateway_labels)
                from_prometheus = pod_sel.get("app.kubernetes.io/name") == "prometheus"
                if "ipBlock" in peer or not (from_gateway or from_prometheus):
                    problems.append(f"{name}: port {port} open to {peer}")
                elif from_gateway and port not in inference[name]:
                    problems.append(f"{name}: gateway allowed to non-inference port {port}")
                elif from_prometheus and port not in metrics[name]:
                    problems.append(f"{name}: Prometheus allowed to non-metrics port {port}")
        for port in inference[name]:
            if not any(
                p == port
                and any(
                    _selects(peer.get("podSelector", {}).get("matchLabels", {}), gateway_labels)
                    for peer in peers
                )
                for p, peers in allowed
            ):
                problems.append(f"{name}: the gateway cannot reach inference port {port}")
    return problems


def label_problems(docs: list[Doc]) -> list[str]:
    """The app.kubernetes.io labels on every object and every pod template."""
    problems = []
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        missing = [k for k in REQUIRED_LABELS if k not in labels]
        if missing:
            problems.append(f"{ident(doc)}: missing labels {missing}")
        if doc["kind"] in WORKLOAD_KINDS:
            missing = [k for k in REQUIRED_LABELS if k not in pod_labels(doc)]
            if missing:
                problems.append(f"{ident(doc)} pod template: missing labels {missing}")
    return problems


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_module(path: Path) -> Any:
    """A Python file of the repository that is not in a package (an entrypoint, a script)."""
    spec = importlib.util.spec_from_file_location(f"duoserve_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchserve_stop_timeout_s() -> float:
    """Seconds the TorchServe image's entrypoint gives TorchServe after SIGTERM."""
    entrypoint = load_module(ROOT / "services/torchserve/entrypoint.py")
    return float(entrypoint.STOP_TIMEOUT_S)


# Seconds CoreDNS lets a client cache an answer about a Service (the kubernetes plugin's `ttl`
# default), and the gateway's default re-resolution interval (models.yaml resolve_interval_s).
COREDNS_TTL_S = 5
DEFAULT_RESOLVE_INTERVAL_S = 5


def cpu_cores(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("2", "500m", 1.5) in cores."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def autoscaled_minimum(docs: list[Doc], workload: Doc) -> int:
    """The fewest replicas a workload runs: its autoscaler's minimum, else spec.replicas."""
    name = workload["metadata"]["name"]
    defaults = {
        "HorizontalPodAutoscaler": ("minReplicas", 1),
        "ScaledObject": ("minReplicaCount", 0),
    }
    for doc in docs:
        if doc["kind"] in defaults and doc["spec"]["scaleTargetRef"]["name"] == name:
            key, default = defaults[doc["kind"]]
            return int(doc["spec"].get(key, default))
    return int(workload["spec"].get("replicas", 1))


def _count(value: int | str, total: int, round_up: bool) -> int:
    """A count or percentage of `total`, rounded the way Kubernetes rounds that field."""
    if isinstance(value, int):
        return value
    share = float(value.rstrip("%")) * total / 100
    return int(-(-share // 1)) if round_up else int(share)


def disruption_problems(docs: list[Doc]) -> list[str]:
    """Every Deployment a PDB guards keeps a pod through a drain and through a rollout, and a
    GPU Deployment rolls without a surge pod that a full GPU pool could not place."""
    problems = []
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        for workload in workloads(docs):
            if not _selects(selector, pod_labels(workload)):
                continue
            where = f"{ident(workload)} (guarded by {ident(pdb)})"
            least = autoscaled_minimum(docs, workload)
            if least < 2:
                problems.append(f"{where}: {least} replica(s); a drain would evict the last one")
            spec = pdb["spec"]
            if "maxUnavailable" in spec:
                evictable = _count(spec["maxUnavailable"], least, round_up=True)
            else:
                evictable = least - _count(spec["minAvailable"], least, round_up=True)
            if least - evictable < 1:
                problems.append(f"{where}: the PDB lets a drain evict all {least} pods")
            rolling = workload["spec"].get("strategy", {}).get("rollingUpdate", {})
            surge = _count(rolling.get("maxSurge", "25%"), least, round_up=True)
            down = _count(rolling.get("maxUnavailable", "25%"), least, round_up=False)
            if workload["spec"].get("strategy", {}).get("type") == "Recreate":
                problems.append(f"{where}: Recreate stops every pod at once")
            elif least - down < 1:
                problems.append(f"{where}: a rollout may take all {least} pods down at once")
            if gpu_requests([workload])[workload["metadata"]["name"]] and (surge or not down):
                problems.append(
                    f"{where}: on a full GPU pool a rollout with maxSurge {surge} and "
                    f"maxUnavailable {down} leaves its new pod Pending"
                )
    return problems


def autoscaler_metric_problems(docs: list[Doc], served: set[str]) -> list[str]:
    """HPAs read Pods/Object/External metrics only if an adapter the overlay installs serves
    them: with one metric unavailable an HPA can scale up but never down
    (kubernetes/kubernetes#99514)."""
    problems = []
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        for metric in hpa["spec"].get("metrics", []):
            kind = metric["type"]
            if kind == "Resource":
                continue  # metrics-server
            name = metric[kind[0].lower() + kind[1:]]["metric"]["name"]
            if name not in served:
                problems.append(f"{ident(hpa)}: {kind} metric {name} that no adapter serves")
    return problems
