"""Settings from the environment: list settings as JSON or comma-separated values, and a malformed setting
reported in one line (the variable, what it was given, never a secret's value, the expected form) with exit
status 3, by ``python -m service`` and by Gunicorn's worker (``service.process.asgi:app_from_env``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_origin

import pytest

from service.process import EXIT_STARTUP_FAILED
from service.settings import InvalidSettingsError, Settings, env_name, load_settings
from service.settings.reference import setting_fields
from tests.conftest import REPO_ROOT
from tests.service.live import free_port

SECRET = "s3cret-key-value"


def _environment(tmp_path: Path, **variables: str) -> dict[str, str]:
    """This process's environment without any CXR_ setting, plus ``variables``."""
    env = {name: value for name, value in os.environ.items() if not name.upper().startswith("CXR_")}
    env.update(HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"), **variables)
    return env


def _list_fields() -> list[str]:
    return [name for name, info in setting_fields().items() if get_origin(info.annotation) is list]


def _value(settings: Settings, path: str) -> object:
    """``settings.audit.url`` for ``audit.url``."""
    value: object = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("value", ["a,b", '["a","b"]', " a , b ", '[ "a", "b" ]'])
def test_list_settings_take_json_or_comma_separated_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CXR_API_KEYS", value)
    monkeypatch.setenv("CXR_CORS_ORIGINS", value)
    settings = Settings()
    assert [key.get_secret_value() for key in settings.api_keys] == ["a", "b"]
    assert settings.cors_origins == ["a", "b"]


@pytest.mark.parametrize("name", _list_fields())
def test_every_list_setting_takes_comma_separated_values(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(env_name(name), "ORTHANC,PACS2")
    values = _value(Settings(), name)
    assert isinstance(values, list)
    assert [getattr(value, "get_secret_value", lambda v=value: v)() for value in values] == ["ORTHANC", "PACS2"]


def test_an_empty_list_variable_is_an_empty_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_ADMIN_API_KEYS", "")
    assert Settings().admin_api_keys == []


def test_a_single_plain_key_is_one_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's case: CXR_ADMIN_API_KEYS=some-key crashed start-up with a pydantic traceback."""
    monkeypatch.setenv("CXR_ADMIN_API_KEYS", "some-key")
    assert [key.get_secret_value() for key in Settings().admin_api_keys] == ["some-key"]


BAD_SETTINGS = [
    ({"CXR_MC_SAMPLES": "0"}, "invalid setting CXR_MC_SAMPLES: expected an integer from 1 to 100, got '0'"),
    ({"CXR_PORT": "http"}, "invalid setting CXR_PORT: expected an integer from 1 to 65535, got 'http'"),
    ({"CXR_AUTOCAST": "fp8"}, "invalid setting CXR_AUTOCAST: expected one of auto, off, fp16, bf16, got 'fp8'"),
    ({"CXR_LOG_JSON": "maybe"}, "invalid setting CXR_LOG_JSON: expected true or false, got 'maybe'"),
    ({"CXR_MAX_QUEUE": "-1"}, "invalid setting CXR_MAX_QUEUE: expected an integer of at least 1, got '-1'"),
    ({"CXR_REQUEST_TIMEOUT_S": "0"}, "invalid setting CXR_REQUEST_TIMEOUT_S: expected a number greater than 0"),
    (
        {"CXR_API_KEYS": f"{SECRET}, "},
        "invalid setting CXR_API_KEYS: key [1] is empty or has surrounding whitespace, "
        f"got a value of {len(SECRET) + 2} characters",
    ),
    (
        {"CXR_ADMIN_API_KEYS": f'["{SECRET} "]'},
        "invalid setting CXR_ADMIN_API_KEYS: key [0] is empty or has surrounding whitespace, "
        f"got a value of {len(SECRET) + 5} characters",
    ),
    (
        {"CXR_ADMIN_API_KEYS": f'["{SECRET}"'},
        "invalid setting CXR_ADMIN_API_KEYS: expected a JSON list or comma-separated values; it is not valid JSON",
    ),
    ({"CXR_API_KEYS": SECRET, "CXR_ADMIN_API_KEYS": SECRET}, "CXR_ADMIN_API_KEYS and CXR_API_KEYS must not share"),
    ({"CXR_DIMSE_ALLOWED_AE": "PACS,BAD\\AE"}, "invalid setting CXR_DIMSE_ALLOWED_AE: expected DICOM AE titles"),
]


@pytest.mark.parametrize(("variables", "message"), BAD_SETTINGS)
def test_an_invalid_setting_is_one_line(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InvalidSettingsError) as caught:
        load_settings()
    line = str(caught.value)
    assert message in line and "\n" not in line and SECRET not in line


def test_every_invalid_setting_is_named_and_a_flag_by_its_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_MAX_BATCH_IMAGES", "1000")
    with pytest.raises(InvalidSettingsError) as caught:
        load_settings({"port": 0}, flags={"port": "--port"})
    assert str(caught.value) == (
        "invalid setting --port: expected an integer from 1 to 65535, got 0; "
        "invalid setting CXR_MAX_BATCH_IMAGES: expected an integer from 1 to 256, got '1000'"
    )


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(("variables", "message"), BAD_SETTINGS[:1] + BAD_SETTINGS[6:8])
def test_python_m_service_prints_one_line_and_exits_3(tmp_path: Path, variables: dict[str, str], message: str) -> None:
    run = _run([sys.executable, "-m", "service"], _environment(tmp_path, **variables))
    assert run.returncode == EXIT_STARTUP_FAILED, run.stderr
    assert run.stderr.startswith("bayesnet-cxr: invalid setting") and message in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr and SECRET not in run.stderr
    assert run.stdout == ""


def test_a_bad_flag_is_reported_by_its_name(tmp_path: Path) -> None:
    run = _run([sys.executable, "-m", "service", "--port", "70000"], _environment(tmp_path))
    assert run.returncode == EXIT_STARTUP_FAILED
    assert run.stderr == "bayesnet-cxr: invalid setting --port: expected an integer from 1 to 65535, got 70000\n"


def test_gunicorn_stops_with_the_one_line_and_no_traceback(tmp_path: Path) -> None:
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
    if gunicorn is None:
        pytest.skip("gunicorn is not installed")
    variables = {"CXR_ADMIN_API_KEYS": f'["{SECRET} "]', "CXR_BIND": f"127.0.0.1:{free_port()}"}
    run = _run([gunicorn, "-c", str(REPO_ROOT / "docker" / "gunicorn.conf.py")], _environment(tmp_path, **variables))
    output = run.stdout + run.stderr
    assert run.returncode == EXIT_STARTUP_FAILED, output  # the arbiter: "Worker failed to boot."
    lines = [line for line in output.splitlines() if line.startswith("bayesnet-cxr:")]
    assert lines == [
        "bayesnet-cxr: invalid setting CXR_ADMIN_API_KEYS: key [0] is empty or has surrounding whitespace, "
        f"got a value of {len(SECRET) + 5} characters"
    ], output
    assert "Traceback" not in output and SECRET not in output


def test_a_groups_settings_keep_their_variable_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``settings.audit.url`` is read from CXR_AUDIT_URL, as it was before the settings were grouped."""
    monkeypatch.setenv("CXR_AUDIT_URL", "sqlite:///x.sqlite3")
    monkeypatch.setenv("CXR_AUDIT_SPOOL_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_DICOMWEB_FORWARD_URL", "http://pacs/dicom-web")
    monkeypatch.setenv("CXR_DIMSE_PORT", "11112")
    monkeypatch.setenv("CXR_DIMSE_ALLOWED_AE", "ORTHANC, PACS2")
    settings = load_settings()
    assert settings.audit.url == "sqlite:///x.sqlite3" and settings.audit.spool_path == tmp_path
    assert settings.dicomweb.forward_url == "http://pacs/dicom-web"
    assert settings.dimse.port == 11112 and settings.dimse.allowed_ae == ["ORTHANC", "PACS2"]
    assert Settings(audit={"policy": "buffer"}).audit.url == "sqlite:///x.sqlite3"  # code and environment merge


def test_a_bad_group_variable_is_named_in_the_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DIMSE_PORT", "70000")
    with pytest.raises(InvalidSettingsError) as raised:
        load_settings()
    assert str(raised.value) == "invalid setting CXR_DIMSE_PORT: expected an integer from 1 to 65535, got '70000'"


def test_an_unknown_variable_with_a_groups_prefix_is_ignored_like_any_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker/compose.yaml's CXR_AUDIT_DB_PASSWORD (the database's password, for the compose file) is no setting:
    as with any CXR_ variable that names none, the service ignores it. In code, a group refuses unknown names."""
    monkeypatch.setenv("CXR_AUDIT_DB_PASSWORD", "pw")
    monkeypatch.setenv("CXR_NOT_A_SETTING", "1")
    assert load_settings().audit.policy == "fail-closed"
    with pytest.raises(InvalidSettingsError, match=r"audit\.db_password"):
        load_settings({"audit": {"db_password": "pw"}})
