"""The service's OpenMP settings (service/process/threads.py): the spin count made before torch loads, never over an
operator's; several Gunicorn workers share the cores instead of each taking them all."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from service.process.threads import SPIN_COUNT, cores_per_worker, limit_openmp_spin

GUNICORN_CONF = Path(__file__).resolve().parents[2] / "docker" / "gunicorn.conf.py"

PROBE = (
    "import os, sys; from service.process.threads import limit_openmp_spin; "
    "made = limit_openmp_spin(); import torch; "
    "print(made, os.environ.get('GOMP_SPINCOUNT'))"
)


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip()


def test_a_fresh_process_gets_the_spin_count_before_torch_loads() -> None:
    assert _run(PROBE) == f"True {SPIN_COUNT}"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"GOMP_SPINCOUNT": "300000"}, "False 300000"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "False None")],
)
def test_an_operators_own_setting_is_kept(env: dict[str, str], expected: str) -> None:
    assert _run(PROBE, **env) == expected


def test_nothing_changes_once_torch_is_loaded() -> None:
    import torch  # noqa: F401  (loaded, as in this test process)

    env: dict[str, str] = {}
    assert limit_openmp_spin(env) is False
    assert env == {}


@pytest.mark.parametrize("entry", ["service.__main__", "service.process.asgi"])
def test_the_entry_points_do_not_load_torch_before_they_set_it(entry: str) -> None:
    """``python -m service`` and Gunicorn's ``service.process.asgi`` call limit_openmp_spin first thing; that only works
    while importing them has not loaded torch yet."""
    assert _run(f"import sys, {entry}; print('torch' in sys.modules)") == "False"


@pytest.mark.parametrize(("workers", "cores", "expected"), [(2, 2, 1), (2, 16, 8), (8, 16, 2), (4, 2, 1), (3, 16, 5)])
def test_several_workers_share_the_cores(workers: int, cores: int, expected: int) -> None:
    assert cores_per_worker(workers, cores=cores) == expected


def test_one_worker_keeps_torchs_default_and_zero_workers_is_an_error() -> None:
    assert cores_per_worker(1, cores=16) is None
    with pytest.raises(ValueError, match="at least 1"):
        cores_per_worker(0, cores=2)


def test_the_share_counts_the_cpus_this_process_may_use() -> None:
    assert cores_per_worker(2) == max(1, len(os.sched_getaffinity(0)) // 2)


@pytest.mark.parametrize(("workers", "shared"), [("1", False), ("2", True), ("2-but-set", False)])
def test_each_gunicorn_worker_builds_its_app_with_its_share(
    monkeypatch: pytest.MonkeyPatch, workers: str, shared: bool
) -> None:
    """docker/gunicorn.conf.py validates its variables and names the worker count in the app factory's call; the
    factory gives each worker's settings its share unless the operator set CXR_TORCH_THREADS. Nothing is
    written to the environment."""
    from service.process import asgi

    count = workers.split("-")[0]
    monkeypatch.setenv("CXR_WORKERS", count)
    monkeypatch.delenv("CXR_TORCH_THREADS", raising=False)
    if workers.endswith("set"):
        monkeypatch.setenv("CXR_TORCH_THREADS", "7")
    before = dict(os.environ)
    config = runpy.run_path(str(GUNICORN_CONF))
    assert config["workers"] == int(count) and dict(os.environ) == before
    assert config["wsgi_app"] == f"service.process.asgi:app_from_env(workers={count})"
    built: list[object] = []
    monkeypatch.setattr("service.api.app.create_app", lambda settings: built.append(settings) or settings)
    asgi.app_from_env(workers=int(count))
    (settings,) = built
    expected = (
        max(1, len(os.sched_getaffinity(0)) // int(count)) if shared else (7 if workers.endswith("set") else None)
    )
    assert settings.torch_threads == expected  # type: ignore[attr-defined]


def test_an_invalid_gunicorn_variable_stops_the_arbiter_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CXR_WORKERS", "0")
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(GUNICORN_CONF))
    assert stopped.value.code == 3
    assert (
        capsys.readouterr().err.strip()
        == "bayesnet-cxr: invalid setting CXR_WORKERS: expected an integer from 1 to 64, got '0'"
    )
