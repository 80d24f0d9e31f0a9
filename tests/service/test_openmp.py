"""The service's OpenMP settings (service/openmp.py): the spin count made before torch loads, never over an
operator's; several Gunicorn workers share the cores instead of each taking them all."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from service.openmp import SPIN_COUNT, limit_openmp_spin, share_cores

GUNICORN_CONF = Path(__file__).resolve().parents[2] / "docker" / "gunicorn.conf.py"

PROBE = (
    "import os, sys; from service.openmp import limit_openmp_spin; "
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


@pytest.mark.parametrize("entry", ["service.__main__", "service.asgi"])
def test_the_entry_points_do_not_load_torch_before_they_set_it(entry: str) -> None:
    """``python -m service`` and Gunicorn's ``service.asgi`` call limit_openmp_spin first thing; that only works
    while importing them has not loaded torch yet."""
    assert _run(f"import sys, {entry}; print('torch' in sys.modules)") == "False"


@pytest.mark.parametrize(
    ("workers", "cores", "expected"), [(2, 2, "1"), (2, 16, "8"), (8, 16, "2"), (4, 2, "1"), (3, 16, "5")]
)
def test_several_workers_share_the_cores(workers: int, cores: int, expected: str) -> None:
    env: dict[str, str] = {}
    assert share_cores(workers, env, cores=cores) == int(expected)
    assert env == {"CXR_TORCH_THREADS": expected}


def test_one_worker_or_an_operators_thread_count_is_left_alone() -> None:
    env: dict[str, str] = {}
    assert share_cores(1, env, cores=16) is None
    assert env == {}
    env = {"CXR_TORCH_THREADS": "6"}
    assert share_cores(4, env, cores=16) is None
    assert env == {"CXR_TORCH_THREADS": "6"}
    with pytest.raises(ValueError, match="at least 1"):
        share_cores(0, {}, cores=2)


def test_share_cores_counts_the_cpus_this_process_may_use() -> None:
    env: dict[str, str] = {}
    share_cores(2, env)
    assert env["CXR_TORCH_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))


@pytest.mark.parametrize(("workers", "set_by_conf"), [("1", False), ("2", True)])
def test_the_gunicorn_config_applies_it(monkeypatch: pytest.MonkeyPatch, workers: str, set_by_conf: bool) -> None:
    """docker/gunicorn.conf.py runs in the master before it forks: the workers inherit what it sets."""
    # A copy of the environment stands in for it (what the config sets must not reach the other tests).
    environ = {k: v for k, v in os.environ.items() if k != "CXR_TORCH_THREADS"} | {"CXR_WORKERS": workers}
    monkeypatch.setattr(os, "environ", environ)
    config = runpy.run_path(str(GUNICORN_CONF))
    assert config["workers"] == int(workers)
    expected = str(max(1, len(os.sched_getaffinity(0)) // int(workers))) if set_by_conf else None
    assert environ.get("CXR_TORCH_THREADS") == expected
