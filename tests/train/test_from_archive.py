"""The retrospective audit (``python -m train audit``, ``train/from_archive.py``): an archive run's table against the
radiologists' labels. On a synthetic site (``synthetic_site_model``): the site's disease turns subtler than the
films the rule was calibrated on, ``python -m service.archive`` scores its films, and the audit, recounted here from
the table and the labels independently, shows the rule clearing abnormal films far beyond its promise, and what a
refit on these films would choose (the same rule ``calibrate --from-archive`` writes). Then the labels' formats:
a CheXpert CSV by path, the service's outcomes files (CSV, NDJSON, FHIR, HL7 v2) by request id, SOP or study UID.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import beta
from sklearn.metrics import roc_auc_score

from bayesnet.checkpoint import load_spec
from bayesnet.labels import CHEXPERT_LABELS
from bench.guarantee_site import site_films
from service.archive import DistInfo, build_parser, run
from service.archive.table import write_parquet
from tests.outcomes.test_parsing import observation, oru, radiologist_report, snomed_value
from train.__main__ import main as train_main
from train.from_archive import AuditInputError, exact_upper, films_from_archive, read_site_labels
from train.synthetic import PLANTED_FINDINGS

SIZE = 128


def _write_site(films: list[Any], folder: Path) -> Path:
    """The films as PNGs and a CheXpert-layout CSV of their truth and population (paths relative to the CSV folder's
    parent)."""
    images = folder / "images"
    images.mkdir(parents=True)
    csv_path = folder / "labels.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Path", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *PLANTED_FINDINGS])
        for i, film in enumerate(films):
            (images / f"film{i:04d}.png").write_bytes(film.png)
            anything = any(film.present.values())
            # The site's export says each film is an adult's PA film (the intended population), as a client declares.
            row = [f"{folder.name}/images/film{i:04d}.png", "54", "Frontal", "PA", "" if anything else "1.0"]
            writer.writerow(row + ["1.0" if film.present[label] else "0.0" for label in PLANTED_FINDINGS])
    return csv_path


def test_the_audit_of_a_site_whose_disease_turned_subtler(synthetic_site_model: Path, tmp_path: Path) -> None:
    model = synthetic_site_model
    rule = load_spec(model).referral
    assert rule is not None and rule.study_alpha == 0.1
    films = site_films(400, 4000, image_size=SIZE, prevalence=0.1, contrast=0.45)
    labels = _write_site(films, tmp_path / "site")
    results = tmp_path / "results.jsonl"
    argv = ["--input", str(labels), "--out", str(results), "--model", str(model), "--cams", "none"]
    run(build_parser().parse_args(argv), DistInfo(0, 1, 0))
    table = pq.read_table(results.with_suffix(".parquet")).to_pylist()
    assert len(table) == 400 and all(r["ok"] for r in table)

    out = tmp_path / "audit"
    table_path = results.with_suffix(".parquet")
    code = train_main(
        ["audit", "--results", str(table_path), "--labels", str(labels), "--checkpoint", str(model), "--out", str(out)]
    )
    assert code == 0
    result = json.loads((out / "audit.json").read_text())

    # Recounted from the table and the films' truth, not from the audit's code.
    by_path = {r["path"]: r for r in table}
    truth = {f"site/images/film{i:04d}.png": film.present for i, film in enumerate(films)}
    assert result["matching"]["films_with_verdicts"] == 400 and result["matching"]["verdict_keys_unmatched"] == 0
    for label in PLANTED_FINDINGS:
        y = [truth[p][label] for p in by_path]
        scores = [by_path[p][label]["conf"] for p in by_path]
        row = result["findings"][label]
        assert row["positives"] == sum(y) and row["n"] == 400
        assert row["auroc"] == pytest.approx(roc_auc_score(y, scores))
        low, high = row["auroc_ci95"]
        assert low <= row["auroc"] <= high and (high - low > 0.01 or row["auroc"] > 0.99)
        missed = sum(1 for p in by_path if truth[p][label] and by_path[p][label]["decision"] == "negative")
        assert row["positives_cleared"]["count"] == missed
    abnormal = {p for p in by_path if any(truth[p].values())}
    cleared = {p for p, r in by_path.items() if not r["refer"]}
    films_part = result["films"]
    assert films_part["abnormal"] == len(abnormal) and films_part["normal"] == 400 - len(abnormal)
    assert films_part["cleared"] == len(cleared) > 0
    among = films_part["abnormal_among_cleared"]
    assert (among["count"], among["of"]) == (len(cleared & abnormal), len(cleared))
    assert among["upper"] == pytest.approx(beta.ppf(0.95, among["count"] + 1, among["of"] - among["count"]))
    # The point of the audit: the rule promised at most 10% of abnormal films cleared; on this site it clears far
    # more, and the exact bound says so from these films alone.
    missed_films = films_part["abnormal_cleared"]
    assert missed_films["rate"] > 0.3 and missed_films["count"] == len(cleared & abnormal)
    assert beta.ppf(0.05, missed_films["count"], missed_films["of"] - missed_films["count"] + 1) > rule.study_alpha

    # What calibrate would fit here: a stricter rule, the same one calibrate --from-archive writes.
    fit = result["fit"]
    assert "refused" not in fit, fit.get("refused")
    assert fit["report"]["study"]["abnormal_cleared_rate"] < missed_films["rate"]
    assert fit["study_threshold"] < rule.study_threshold
    refit = tmp_path / "refit"
    refit_argv = ["--from-archive", str(table_path), "--labels", str(labels), "--out", str(refit)]
    code = train_main(["calibrate", "--checkpoint", str(model), *refit_argv])
    assert code == 0
    written = load_spec(refit)
    assert written.version == "0.1.0+cal.site" and written.referral is not None
    assert written.referral.study_threshold == fit["study_threshold"]
    for label, row in fit["rule"].items():
        assert written.referral.negative_threshold[written.label_index(label)] == row["clear_below"]

    report = (out / "report.md").read_text()
    assert "## Against the radiologists' labels" in report and "![auroc.png](auroc.png)" in report
    assert f"{among['count']}/{among['of']}" in report and "What `python -m train calibrate` would fit" in report
    assert (out / "auroc.png").stat().st_size > 1000 and (out / "scores.png").exists()


# --- the labels' formats, on a small table --------------------------------------------------------------------

STUDY = "1.2.826.0.1.3680043.8.498.1"


def _line(key: str, request_id: str, conf: float, refer: bool, sha: str = "a" * 64) -> dict[str, Any]:
    finding = {"conf": conf, "std": 0.01, "interval": [conf - 0.02, conf + 0.02], "decision": "negative"}
    return {
        "path": key,
        "ok": True,
        "result": {
            "request_id": request_id,
            "model": {"name": "m", "version": "1", "sha256": sha},
            "mc_samples": 20,
            "referral": {"refer": refer, "reasons": [] if not refer else ["possible_finding"]},
            "uncertain": False,
            "predictions": {"Pleural Effusion": finding, "Cardiomegaly": dict(finding, conf=1 - conf)},
        },
    }


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """Five PACS films: study 1 holds one film, study 2 two (a study verdict is ambiguous there)."""
    lines = [
        _line(f"{STUDY}.1/{STUDY}.1.1/{STUDY}.1.1.1", "req-a", 0.9, True),
        _line(f"{STUDY}.2/{STUDY}.2.1/{STUDY}.2.1.1", "req-b", 0.1, False),
        _line(f"{STUDY}.2/{STUDY}.2.1/{STUDY}.2.1.2", "req-c", 0.2, False),
        _line(f"{STUDY}.3/{STUDY}.3.1/{STUDY}.3.1.1", "req-d", 0.7, True),
        {"path": f"{STUDY}.4/{STUDY}.4.1/{STUDY}.4.1.1", "ok": False, "error": {"type": "fetch", "detail": "404"}},
    ]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return write_parquet(results)[0]


def test_outcomes_csv_and_ndjson_match_by_sop_uid_and_request_id(table: Path, tmp_path: Path) -> None:
    labels = tmp_path / "outcomes.csv"
    labels.write_text(
        "sop_instance_uid,request_id,finding,verdict\n"
        f"{STUDY}.1.1.1,,Pleural Effusion,present\n"
        f",req-b,pleural effusion,absent\n"
        f",req-b,Cardiomegaly,present\n"
        f"{STUDY}.9.1.1,,Pleural Effusion,present\n"  # a film the run does not hold
    )
    films = films_from_archive(table, read_site_labels(labels))
    assert sorted(films.keys) == [f"{STUDY}.1/{STUDY}.1.1/{STUDY}.1.1.1", f"{STUDY}.2/{STUDY}.2.1/{STUDY}.2.1.1"]
    assert films.matching == {
        "films_scored": 4,
        "films_failed": 1,
        "films_with_verdicts": 2,
        "verdict_keys": 3,
        "verdict_keys_unmatched": 1,
        "study_verdicts_ambiguous": 0,
    }
    effusion, cardio = CHEXPERT_LABELS.index("Pleural Effusion"), CHEXPERT_LABELS.index("Cardiomegaly")
    order = np.argsort(films.keys)
    assert films.targets[order, effusion].tolist() == [1.0, 0.0]
    assert np.isnan(films.targets[order[0], cardio]) and films.targets[order[1], cardio] == 1.0
    assert films.refer[order].tolist() == [True, False]

    ndjson = tmp_path / "outcomes.ndjson"
    ndjson.write_text(json.dumps({"request_id": "req-d", "finding": "Pleural Effusion", "verdict": "yes"}) + "\n")
    assert films_from_archive(table, read_site_labels(ndjson)).keys == [f"{STUDY}.3/{STUDY}.3.1/{STUDY}.3.1.1"]


def test_fhir_and_hl7_by_study_uid_and_an_ambiguous_study_is_left_out(table: Path, tmp_path: Path) -> None:
    effusion = [{"system": "http://snomed.info/sct", "code": "60046008", "display": "Pleural effusion"}]
    study = {"resourceType": "ImagingStudy", "id": "s", "status": "available", "subject": {"display": "x"}}
    reports = []
    for uid in (f"{STUDY}.3", f"{STUDY}.2"):
        contained = dict(study, identifier=[{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}])
        obs = observation("e", effusion, **snomed_value(False))
        reports.append(radiologist_report(report_id=f"r{uid[-1]}", study=contained, observations=[obs]))
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in reports]}
    fhir = tmp_path / "reports.json"
    fhir.write_text(json.dumps(bundle))
    films = films_from_archive(table, read_site_labels(fhir))
    assert films.keys == [f"{STUDY}.3/{STUDY}.3.1/{STUDY}.3.1.1"]
    assert films.matching["study_verdicts_ambiguous"] == 1  # study 2 holds two films: the verdict names neither
    assert films.matching["verdict_keys_unmatched"] == 0

    hl7 = tmp_path / "results.hl7"
    hl7.write_bytes(
        oru(
            "m1", [("CWE", "PLEFF^Pleural Effusion^99RAD", "52101004^Present^SCT", "F")], study_uid=f"{STUDY}.1"
        ).encode()
    )
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps({"mappings": [{"system": "99RAD", "code": "PLEFF", "label": "Pleural Effusion"}]}))
    films = films_from_archive(table, read_site_labels(hl7, codes))
    assert films.keys == [f"{STUDY}.1/{STUDY}.1.1/{STUDY}.1.1.1"]
    assert films.targets[0, CHEXPERT_LABELS.index("Pleural Effusion")] == 1.0


def test_what_the_audit_refuses(table: Path, tmp_path: Path) -> None:
    nobody = tmp_path / "nobody.csv"
    nobody.write_text("request_id,finding,verdict\nreq-z,Edema,absent\n")
    with pytest.raises(AuditInputError, match="no scored film"):
        films_from_archive(table, read_site_labels(nobody))
    broken = tmp_path / "broken.csv"
    broken.write_text("request_id,finding,verdict\nreq-a,Edema,maybe\n")
    with pytest.raises(AuditInputError, match="gave no verdict"):
        read_site_labels(broken)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        json.dumps(_line("a.png", "r1", 0.5, True))
        + "\n"
        + json.dumps(_line("b.png", "r2", 0.5, True, "b" * 64))
        + "\n"
    )
    with pytest.raises(AuditInputError, match="several models"):
        films_from_archive(write_parquet(mixed)[0], read_site_labels(nobody))
    assert train_main(["audit", "--results", str(table), "--labels", str(nobody), "--out", str(tmp_path / "o")]) == 2
    assert train_main(["calibrate", "--checkpoint", str(tmp_path), "--from-archive", str(table)]) == 2  # no labels
    refit = ["calibrate", "--checkpoint", str(tmp_path), "--from-archive", str(table), "--labels", str(nobody)]
    assert train_main(refit) == 2  # no film in common


def test_the_exact_bound() -> None:
    assert exact_upper(0, 0) is None and exact_upper(5, 5) == 1.0
    assert exact_upper(0, 59) == pytest.approx(1 - 0.05 ** (1 / 59))  # the rule of three's exact form
    assert exact_upper(3, 100) > 0.03
