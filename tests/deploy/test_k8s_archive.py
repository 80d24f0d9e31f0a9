"""The archive-job component (issue #31): an Indexed Job of ``python -m service.archive --dicomweb`` shards, the
volume they share and the merge Job, rendered with the GPU overlay by the real ``kubectl kustomize`` and checked
against the Kubernetes schemas, the command's own argument parser and the service's settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.archive import build_parser
from tests.deploy.test_k8s import (
    K8S_DIR,
    KUBERNETES_VERSIONS,
    Manifest,
    SettingsFrom,
    config_data,
    kubectl_kustomize,
    only,
    settings_from,  # noqa: F401 (the fixture)
)

ARCHIVE_COMPONENT = K8S_DIR / "components" / "archive-job"


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    """The GPU overlay with the archive-job component, as its kustomization says to use it."""
    directory = tmp_path_factory.mktemp("gpu-archive")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S_DIR / "overlays" / "gpu", directory)],
        "components": [os.path.relpath(ARCHIVE_COMPONENT, directory)],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    return kubectl_kustomize(directory)


def _container(job: Manifest) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _argv(container: dict[str, Any]) -> list[str]:
    """The container's arguments as the kubelet expands them: $(NAME) from the container's own env values."""
    values = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    argv = []
    for arg in container["args"]:
        for name, value in values.items():
            arg = arg.replace(f"$({name})", value)
        assert "$(" not in arg, f"{arg}: not set in the container's env"
        argv.append(arg)
    return argv


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_component_renders_to_valid_objects(objects: list[Manifest], version: str) -> None:
    for doc in objects:
        kubernetes_validate.validate(doc, version, strict=True)
    assert {(d["kind"], d["metadata"]["name"]) for d in objects} >= {
        ("Job", "cxr-archive"),
        ("Job", "cxr-archive-merge"),
        ("PersistentVolumeClaim", "cxr-archive-results"),
    }


def test_each_index_is_one_shard_of_as_many_as_the_job_has_and_retries_alone(
    objects: list[Manifest],
    settings_from: SettingsFrom,  # noqa: F811 (the fixture imported above)
) -> None:
    job = only(objects, "Job", "cxr-archive")
    spec = job["spec"]
    container = _container(job)
    assert container["command"] == ["python", "-m", "service.archive"]
    args = build_parser().parse_args(_argv(container))
    assert spec["completionMode"] == "Indexed" and args.shards == spec["completions"] == spec["parallelism"]
    assert args.shard_index is None  # taken from JOB_COMPLETION_INDEX, which Kubernetes sets
    assert args.dicomweb.startswith("https://") and args.out == Path("/results/results.jsonl")
    assert spec["backoffLimitPerIndex"] >= 1 and spec["template"]["spec"]["restartPolicy"] == "Never"
    # The settings the pod reads: the shared ConfigMap and the PACS limits, all real settings that parse.
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e and e["name"].startswith("CXR_")}
    settings = settings_from({**config_data(objects), **env})
    assert settings.pacs.concurrency * spec["parallelism"] <= 64
    token = next(e for e in container["env"] if e["name"] == "CXR_PACS_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "cxr-pacs"  # a Secret, never an argument


def test_the_shards_and_the_merge_share_the_volume_and_the_merge_waits(objects: list[Manifest]) -> None:
    job, merge = only(objects, "Job", "cxr-archive"), only(objects, "Job", "cxr-archive-merge")
    assert merge["spec"]["suspend"] is True
    merge_args = build_parser().parse_args(_argv(_container(merge)))
    assert merge_args.merge and merge_args.out == build_parser().parse_args(_argv(_container(job))).out
    for each in (job, merge):
        pod = each["spec"]["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        mounts = {m["name"]: m["mountPath"] for m in _container(each)["volumeMounts"]}
        assert claims == {"results": "cxr-archive-results"} and mounts["results"] == "/results"
        security = _container(each)["securityContext"]
        assert (
            security["readOnlyRootFilesystem"]
            and security["runAsNonRoot"]
            and security["capabilities"]["drop"] == ["ALL"]
        )
    claim = only(objects, "PersistentVolumeClaim", "cxr-archive-results")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every shard's pod mounts it at once
