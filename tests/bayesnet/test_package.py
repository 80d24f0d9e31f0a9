"""The package surface: every public name resolves; the core pulls in no service or training stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bayesnet

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_public_name_resolves() -> None:
    for name in bayesnet.__all__:
        assert getattr(bayesnet, name) is not None, name
    assert set(bayesnet.__all__) <= set(dir(bayesnet))


def test_core_never_imports_service_train_or_web_stacks() -> None:
    code = (
        "import sys, bayesnet; [getattr(bayesnet, n) for n in bayesnet.__all__]; "
        "bad = [m for m in ('fastapi', 'pydantic_settings', 'datasets', 'service', 'train') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
