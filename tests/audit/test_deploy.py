"""Deployment of the audit trail: every Kubernetes entry point takes the database URL from a Secret (required)
and the admin keys from another; compose runs PostgreSQL beside the app and points the app at it."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.settings import variable_names
from tests.deploy.test_k8s import (  # noqa: F401  (fixtures, shared)
    SettingsFrom,
    config_data,
    container,
    render,
    rendered,
    settings_from,
)

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.yaml"


def test_k8s_takes_the_audit_database_url_and_admin_keys_from_secrets(
    rendered: list[dict[str, object]],  # noqa: F811
    settings_from: SettingsFrom,  # noqa: F811
) -> None:
    env = {item["name"]: item for item in container(rendered)["env"]}
    assert env["CXR_AUDIT_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "cxr-audit-db", "key": "url", "optional": False}
    }
    assert env["CXR_ADMIN_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "cxr-admin-api-keys"
    settings = settings_from(
        {
            **config_data(rendered),
            "CXR_AUDIT_URL": "postgresql+psycopg://cxr:pw@db:5432/cxr_audit",
            "CXR_ADMIN_API_KEYS": '["admin-k8s"]',
        }
    )
    assert settings.audit.policy == "fail-closed"
    assert settings.audit.retention_days is not None and settings.audit.retention_days >= 183


def test_compose_runs_postgresql_for_the_audit_trail() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    app, db = compose["services"]["app"], compose["services"]["db"]
    assert app["environment"]["CXR_AUDIT_URL"].startswith("postgresql+psycopg://cxr:")
    assert app["environment"]["CXR_AUDIT_URL"].endswith("@db:5432/" + db["environment"]["POSTGRES_DB"])
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in db["volumes"])
    assert "CXR_AUDIT_URL" in variable_names()
