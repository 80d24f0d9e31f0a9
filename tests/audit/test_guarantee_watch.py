"""The guarantee watched from the trail (``service.guarantee.watch``), on SQLite and PostgreSQL: verdicts stored
through ``store_outcomes`` like the route stores them, the miss rates, coverage and referral rate counted right, and
the promise called broken only when the verdicts show it."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bayesnet.spec import ReferralSpec
from service.audit import AuditStore
from service.audit.outcomes import store_outcomes
from service.guarantee.watch import rule_cleared, watch, watch_paths
from service.outcomes.parsing import FilmKey, OutcomeRow
from tests.audit.records import LABELS, MODEL, record

NOW = datetime.now(timezone.utc)
RULE = ReferralSpec(
    alpha=0.1,
    study_alpha=0.1,
    delta=0.1,
    negative_threshold=(0.3,) * len(LABELS),
    positive_threshold=(None,) * len(LABELS),
    study_labels=("Effusion", "Pneumothorax"),
    study_threshold=0.3,
    expected_study_referral_rate=0.6,
)


def _site(store: AuditStore, films: int, missed: int, *, cleared_judged: int) -> None:
    """``films`` films with Effusion present by the verdicts; the rule reported ``missed`` of them negative (and
    cleared those films); plus ``cleared_judged`` cleared normal films with an Effusion-absent verdict."""
    records, rows = [], []
    for i in range(films):
        miss = i < missed
        confs = {label: 0.1 for label in LABELS} | {"Effusion": 0.1 if miss else 0.8}
        records.append(record(NOW - timedelta(minutes=i), confs=confs, refer=not miss, request_id=f"abn-{i}"))
        rows.append(OutcomeRow(i + 1, FilmKey("request_id", f"abn-{i}"), {"Effusion": True}, None, None))
    for j in range(cleared_judged):
        confs = dict.fromkeys(LABELS, 0.1)
        records.append(record(NOW - timedelta(minutes=j), confs=confs, refer=False, request_id=f"nor-{j}"))
        rows.append(OutcomeRow(films + j + 1, FilmKey("request_id", f"nor-{j}"), {"Effusion": False}, None, None))
    records.append(record(NOW, confs=dict.fromkeys(LABELS, 0.1), refer=False, request_id="unjudged"))
    other = record(NOW, refer=False, request_id="other-model")
    records.append(other.model_copy(update={"model": other.model.model_copy(update={"sha256": "ef" * 32})}))
    store.insert(records)
    receipt = store_outcomes(store, rows, [], source="csv", submitted_by=None, received_at=NOW)
    assert receipt.stored and receipt.verdicts == films + cleared_judged


@pytest.mark.parametrize(("missed", "broken"), [(4, False), (45, True)])
def test_the_miss_rate_among_films_with_the_finding_is_bounded_and_called_broken_only_on_evidence(
    audit_url: str, missed: int, broken: bool
) -> None:
    store = AuditStore.open(audit_url)
    try:
        _site(store, films=100, missed=missed, cleared_judged=30)
        report = watch(store, RULE, LABELS, model_sha256=MODEL["sha256"])
    finally:
        store.close()
    effusion = report.findings["Effusion"].miss_rate
    assert (effusion.bounds.events, effusion.bounds.trials) == (missed, 100)
    assert effusion.bounds.lower <= missed / 100 <= effusion.bounds.upper
    assert effusion.exceeded is broken and (effusion.bounds.lower > 0.1) is broken
    assert report.findings["Cardiomegaly"].miss_rate.bounds.trials == 0  # no verdict: nothing known, (0, 1)
    # Study level: every judged abnormal film has Effusion; those the rule missed were cleared as normal.
    assert report.study is not None and (report.study.bounds.events, report.study.bounds.trials) == (missed, 100)
    assert report.exceeded == (["Effusion", "study"] if broken else [])
    # Coverage: the cleared films (the misses, the judged normals, one unjudged film), of which all but one judged.
    assert (report.cleared, report.cleared_with_verdict) == (missed + 31, missed + 30)
    assert report.films == 100 + 30 + 1  # the other model's film is not this model's watch
    assert report.referred == 100 - missed and report.referral_rate == pytest.approx((100 - missed) / 131)
    effusion_cleared = report.findings["Effusion"]
    assert (effusion_cleared.cleared_with_verdict, effusion_cleared.present_among_cleared) == (missed + 30, missed)


def test_a_film_referred_only_by_the_operating_state_counts_as_cleared_by_the_rule() -> None:
    assert rule_cleared(False, [])
    assert rule_cleared(True, ["shadow_mode"]) and rule_cleared(True, ["guarantee_suspended"])
    assert not rule_cleared(True, ["shadow_mode", "possible_finding"]) and not rule_cleared(True, [])
    assert not rule_cleared(None, [])


def test_the_monitor_command_prints_the_watch_plots_it_and_exits_3_when_a_promise_is_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m service.monitor --guarantee models/demo``: the shipped demo model's rule, watched on a trail
    whose verdicts show Atelectasis missed in 40 of 60 films that have it."""
    from bayesnet.checkpoint import load_spec, read_checkpoint_document
    from service.monitor import main

    demo = Path(__file__).resolve().parents[2] / "models" / "demo"
    spec = load_spec(demo)
    assert spec.referral is not None and "Atelectasis" in spec.trained_labels
    sha256 = str(read_checkpoint_document(demo)["weights_sha256"])
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    store = AuditStore.open(url)
    try:
        records, rows = [], []
        for i in range(60):
            film = record(NOW - timedelta(hours=1), confs={"Atelectasis": 0.1 if i < 40 else 0.9}, request_id=f"f{i}")
            records.append(film.model_copy(update={"model": film.model.model_copy(update={"sha256": sha256})}))
            rows.append(OutcomeRow(i + 1, FilmKey("request_id", f"f{i}"), {"Atelectasis": True}, None, None))
        store.insert(records)
        assert store_outcomes(store, rows, [], source="csv", submitted_by=None, received_at=NOW).stored
    finally:
        store.close()
    plot = tmp_path / "watch.png"
    assert main(["--guarantee", str(demo), "--url", url, "--plot", str(plot), "--since", "7d"]) == 3
    out = capsys.readouterr().out
    assert "Atelectasis reported negative" in out and "40 / 60" in out and "BROKEN: Atelectasis" in out
    assert plot.stat().st_size > 1000

    # The plot's history: each promise's sequence as the verdicts arrived, ending where the watch is now.
    store = AuditStore.open(url)
    try:
        now = watch(store, spec.referral, spec.trained_labels, model_sha256=sha256)
        paths = watch_paths(store, spec.referral, spec.trained_labels, model_sha256=sha256, points=25)
    finally:
        store.close()
    path, bounds = paths["Atelectasis"], now.findings["Atelectasis"].miss_rate.bounds
    assert (path.trials[-1], path.misses[-1]) == (60, 40) and len(path.trials) == 25
    assert (path.lower[-1], path.upper[-1]) == (bounds.lower, bounds.upper)
    assert all(m == t for t, m in zip(path.trials, path.misses, strict=True) if t <= 40)  # the first 40: misses
    assert all(not p.trials for name, p in paths.items() if name not in ("Atelectasis", "study"))
    if os.environ.get("WATCH_PLOT"):
        shutil.copy(plot, os.environ["WATCH_PLOT"])


@pytest.mark.parametrize("shifted", [True, False])
def test_the_input_drift_check_suspends_the_rule_on_an_alert_only(tmp_path: Path, shifted: bool) -> None:
    """The monitor's drift comparison, run by the guarantee monitor on its own trail: a shifted week (scores pushed
    up, more OOD images) against the month before suspends the rule (``drift_alert``); an unshifted one does not."""
    from service.guarantee.live import GuaranteeMonitor
    from service.runtime.operating import OperatingSwitch
    from service.settings import GuaranteeSettings
    from tests.audit.records import population

    day = 86400.0
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    store = AuditStore.open(url)
    try:
        store.insert(population(NOW - timedelta(days=30), 22 * day, 400, seed=1))
        if shifted:
            store.insert(population(NOW - timedelta(days=6), 5 * day, 300, seed=2, a=3.5, b=4.0, ood_share=0.15))
        else:
            store.insert(population(NOW - timedelta(days=6), 5 * day, 300, seed=2))
        switch = OperatingSwitch()
        monitor = GuaranteeMonitor(
            store, RULE, LABELS, model_sha256=MODEL["sha256"], switch=switch, settings=GuaranteeSettings()
        )
        monitor.load_state()
        monitor.refresh()
        assert switch.get().suspended is shifted
        assert monitor.current is not None
        if shifted:
            assert monitor.current.reason == "drift_alert" and "Effusion" in monitor.current.detail
        monitor.refresh()  # the next refresh within the hour does not run the check again
        assert monitor.drift_checked_at is not None
    finally:
        store.close()
