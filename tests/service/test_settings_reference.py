"""docs/settings.md is generated from the ``Settings`` model, so no setting goes undocumented: the page must be
the generator's current output, every setting must say what it does, and no description may carry a measured
figure (those live in docs/benchmarks.md, where they are dated and sourced)."""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import GunicornSettings, env_name
from service.settings.reference import REFERENCE_PATH, REGENERATE_COMMAND, main, setting_fields, settings_reference
from tests.conftest import REPO_ROOT

#: Benchmark results, not reasons: "1.3x", "2.0 x", "88 images/s", "4.6 ms per", "9 core-ms", "2x faster".
MEASURED_FIGURE = re.compile(r"\d(\.\d+)?\s?x\b|images/s|ms per|core-ms|x faster", re.IGNORECASE)


def test_docs_settings_md_is_the_generated_reference() -> None:
    expected = settings_reference()
    current = REFERENCE_PATH.read_text(encoding="utf-8") if REFERENCE_PATH.is_file() else ""
    if current != expected:
        diff = "".join(
            list(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    expected.splitlines(keepends=True),
                    "docs/settings.md",
                    "generated",
                )
            )[:40]
        )
        pytest.fail(f"docs/settings.md is out of date with service/settings.py; run: {REGENERATE_COMMAND}\n{diff}")


#: Every setting by its path (``port``, ``audit.url``: a group's field) and Gunicorn's (``gunicorn:bind``).
FIELDS = {**setting_fields(), **{f"gunicorn:{name}": info for name, info in GunicornSettings.model_fields.items()}}


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_every_setting_is_described_on_the_page(field: str) -> None:
    description = (FIELDS[field].description or "").strip()
    assert description, f"setting {field} has no description: say what it does and why (service/settings/)"
    assert not MEASURED_FIGURE.search(description), (
        f"setting {field}'s description quotes a measured figure; move it to docs/benchmarks.md and refer to it"
    )
    row = f"| `{env_name(field.removeprefix('gunicorn:'))}` |"
    assert row in settings_reference()


def test_gunicorns_own_variables_are_named_on_the_page() -> None:
    """docker/gunicorn.conf.py reads CXR_ variables that are no field of Settings: the page names them too."""
    config = (REPO_ROOT / "docker" / "gunicorn.conf.py").read_text(encoding="utf-8")
    page = settings_reference()
    missing = sorted(name for name in set(re.findall(r"CXR_[A-Z0-9_]+", config)) if f"`{name}`" not in page)
    assert not missing, f"docker/gunicorn.conf.py reads {missing}, which docs/settings.md does not name"


def test_check_fails_on_a_stale_page_and_names_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "settings.md"
    assert main(["--output", str(page)]) == 0
    assert main(["--check", str(page)]) == 0

    page.write_text(page.read_text(encoding="utf-8").replace("CXR_MC_SAMPLES", "CXR_MC_SAMPLE"), encoding="utf-8")
    assert main(["--check", str(page)]) == 1
    assert main(["--check", str(tmp_path / "absent.md")]) == 1
    assert capsys.readouterr().err.count(REGENERATE_COMMAND) == 2


def test_python_m_service_settings_checks_the_committed_page() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "service.settings", "--check", "docs/settings.md"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
