"""``python -m service.monitor`` on audit databases (SQLite and PostgreSQL): a drift alert on a shifted current
window, none on an unshifted one, and a PNG plot either way."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from service.audit import AuditStore
from service.monitor import EXIT_DRIFT, main, parse_duration
from tests.audit.records import population

NOW = datetime.now(timezone.utc)
DAY_S = 86400.0


def _fill(url: str, *, shifted: bool) -> None:
    store = AuditStore.open(url)
    try:
        reference = population(NOW - timedelta(days=30), 22 * DAY_S, 400, seed=1)
        if shifted:  # scores pushed up and more OOD images: a new scanner, a new ward
            current = population(NOW - timedelta(days=6), 5 * DAY_S, 300, seed=2, a=3.5, b=4.0, ood_share=0.15)
        else:
            current = population(NOW - timedelta(days=6), 5 * DAY_S, 300, seed=2)
        store.insert(reference + current)
    finally:
        store.close()


@pytest.mark.parametrize("shifted", [True, False])
def test_monitor_reports_drift_only_for_a_shifted_window(
    audit_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], shifted: bool
) -> None:
    _fill(audit_url, shifted=shifted)
    plot = tmp_path / "drift.png"
    status = main(["--url", audit_url, "--since", "7d", "--reference", "30d", "--plot", str(plot)])
    report = capsys.readouterr().out
    assert "current last 7d (300 answered)" in report and "(400 answered)" in report
    if shifted:
        assert status == EXIT_DRIFT and "verdict: DRIFT" in report
        assert report.count("DRIFT") >= 4  # every label's scores and the OOD rate
    else:
        assert status == 0 and "verdict: no drift" in report and "DRIFT" not in report
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 100


def test_too_little_data_never_alerts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    store = AuditStore.open(url)
    store.insert(population(NOW - timedelta(days=3), DAY_S, 5, seed=3, a=9, b=1))
    store.close()
    assert main(["--url", url, "--plot", str(tmp_path / "p.png")]) == 0
    assert "not enough data" in capsys.readouterr().out


def test_durations() -> None:
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("2w") == timedelta(days=14)
