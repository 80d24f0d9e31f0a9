"""The systemd unit of the EC2 path (docker/cxr.service), checked by systemd's own analyser.

systemd cannot run units on these machines (no init), but ``systemd-analyze`` can still parse a unit,
verify its directives and score its sandboxing offline. Skipped where systemd is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "docker" / "cxr.service"
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def analyze(*args: str) -> str:
    assert ANALYZE is not None
    done = subprocess.run([ANALYZE, *args, str(UNIT)], capture_output=True, text=True, timeout=60, check=False)
    return done.stdout + done.stderr


def test_unit_verifies_apart_from_the_install_path() -> None:
    # The only complaint allowed is that the venv under /opt does not exist on this machine.
    problems = [
        line
        for line in analyze("verify").splitlines()
        if line.strip() and "/opt/bayesnet-cxr/.venv/bin/gunicorn is not executable" not in line
    ]
    assert problems == []


def test_unit_is_sandboxed() -> None:
    report = analyze("security", "--offline=yes")
    match = re.search(r"Overall exposure level for cxr\.service: ([0-9.]+)", report)
    assert match, report[-2000:]
    # systemd scores 0 (locked down) to 10 (unprotected); a plain unit with only User= scores 9.2.
    assert float(match.group(1)) <= 2.5, report[-2000:]
