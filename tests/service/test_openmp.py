"""The service's OpenMP spin setting (service/openmp.py): made before torch loads, never over an operator's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.openmp import SPIN_COUNT, limit_openmp_spin

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
