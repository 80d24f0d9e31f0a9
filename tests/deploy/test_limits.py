"""One source of truth: the limits in docker/ agree with the service's settings."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import yaml

from service.api.app import MULTIPART_SLACK_BYTES
from service.settings import DEFAULT_MAX_UPLOAD_BYTES, Settings, variable_names

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def test_compose_body_limits_match_the_app() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    app_env = compose["services"]["app"]["environment"]
    nginx_env = compose["services"]["nginx"]["environment"]
    assert int(app_env["CXR_MAX_UPLOAD_BYTES"]) == DEFAULT_MAX_UPLOAD_BYTES
    assert int(nginx_env["CXR_BODY_LIMIT"]) == DEFAULT_MAX_UPLOAD_BYTES + MULTIPART_SLACK_BYTES
    files = Settings().max_files_per_request
    assert int(nginx_env["CXR_BATCH_BODY_LIMIT"]) == DEFAULT_MAX_UPLOAD_BYTES * files + MULTIPART_SLACK_BYTES
    assert set(app_env) <= variable_names()


def test_nginx_template_uses_the_placeholders_tests_and_compose_fill() -> None:
    template = (DOCKER / "nginx" / "cxr.conf.template").read_text()
    placeholders = set(re.findall(r"\$\{(CXR_[A-Z_]+)\}", template))
    assert placeholders == {
        "CXR_NGINX_PORT",
        "CXR_UPSTREAM",
        "CXR_STATIC_ROOT",
        "CXR_BODY_LIMIT",
        "CXR_BATCH_BODY_LIMIT",
    }
    assert "client_max_body_size ${CXR_BODY_LIMIT};" in template


def test_shutdown_grace_covers_the_longest_request() -> None:
    config = runpy.run_path(str(DOCKER / "gunicorn.conf.py"))
    request_timeout_s = Settings().request_timeout_s
    assert config["graceful_timeout"] > request_timeout_s
    assert config["worker_class"] == "service.process.gunicorn_worker.DrainingUvicornWorker"
    unit = (DOCKER / "cxr.service").read_text()
    stop_s = int(re.search(r"TimeoutStopSec=(\d+)", unit).group(1))  # type: ignore[union-attr]
    assert stop_s > config["graceful_timeout"]
