"""The referral rule as the service applies it: decisions, study clearance, reasons, the spec, header flags."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from bayesnet import ModelSpec, decode_image
from bayesnet.decision import Decision, decide
from bayesnet.errors import SpecError
from bayesnet.imaging import POPULATION_LATERAL, POPULATION_NON_CHEST, POPULATION_PAEDIATRIC, population_flags
from bayesnet.referral import (
    NO_RULE,
    NOT_CLEARED,
    OUT_OF_DISTRIBUTION,
    OUTSIDE_POPULATION,
    POSSIBLE_FINDING,
    UNCERTAIN_FINDING,
    describe,
    finding_labels,
    referral_reasons,
    referred,
    study_cleared,
    study_scores,
)
from bayesnet.spec import ReferralSpec

LABELS = ("No Finding", "Cardiomegaly", "Edema")


def rule(**changes: object) -> ReferralSpec:
    fields: dict[str, object] = {
        "alpha": 0.1,
        "study_alpha": 0.1,
        "delta": 0.1,
        "negative_threshold": (0.5, 0.2, None),
        "positive_threshold": (None, 0.7, 0.6),
        "study_labels": ("Cardiomegaly", "Edema"),
        "study_threshold": 0.3,
        "calibration": {"n_films": 250},
    }
    fields.update(changes)
    return ReferralSpec(**fields)  # type: ignore[arg-type]


def spec_with(referral: ReferralSpec | None) -> ModelSpec:
    return ModelSpec(arch="test_efficientnet", labels=LABELS, referral=referral)


def samples_of(*films: tuple[float, float, float], spread: float = 0.0) -> torch.Tensor:
    """(T=3, B, K) samples around each film's per-label means, +-spread."""
    means = torch.tensor(films, dtype=torch.float32)
    offsets = torch.tensor([-spread, 0.0, spread])[:, None, None]
    return (means[None] + offsets).clamp(0, 1)


def test_each_side_fires_only_below_or_above_its_threshold() -> None:
    spec = spec_with(rule())
    decisions = decide(samples_of((0.9, 0.1, 0.1), (0.9, 0.8, 0.65), (0.2, 0.5, 0.3)), spec)
    n, p, u = Decision.NEGATIVE, Decision.POSITIVE, Decision.UNCERTAIN
    # No Finding: clears below 0.5, never positive. Cardiomegaly: < 0.2 negative, >= 0.7 positive.
    # Edema: never cleared (None), positive from 0.6.
    assert decisions == [[u, n, u], [u, p, p], [n, u, u]]


def test_interval_score_needs_the_whole_mc_interval_on_one_side() -> None:
    film = (0.9, 0.15, 0.1)
    mean_rule = spec_with(rule(score="mean"))
    interval_rule = spec_with(rule(score="interval"))
    assert decide(samples_of(film, spread=0.1), mean_rule)[0][1] == Decision.NEGATIVE
    assert decide(samples_of(film, spread=0.1), interval_rule)[0][1] == Decision.UNCERTAIN  # 95th pct 0.24 >= 0.2
    assert decide(samples_of(film, spread=0.01), interval_rule)[0][1] == Decision.NEGATIVE


def test_overlapping_sides_refer_rather_than_pick_one() -> None:
    spec = spec_with(rule(negative_threshold=(0.5, 0.8, None), positive_threshold=(None, 0.6, 0.6)))
    assert decide(samples_of((0.9, 0.7, 0.1)), spec)[0][1] == Decision.UNCERTAIN


def test_study_score_is_the_noisy_or_of_the_study_findings() -> None:
    spec = spec_with(rule())
    samples = samples_of((0.99, 0.1, 0.2), (0.0, 0.3, 0.3))
    assert study_scores(samples, spec).tolist() == pytest.approx([1 - 0.9 * 0.8, 1 - 0.7 * 0.7])
    assert study_cleared(samples, spec) == [True, False]  # 0.28 < 0.3; 0.51 is not
    assert study_cleared(samples, spec_with(rule(study_threshold=None))) == [False, False]
    assert study_cleared(samples, spec_with(None)) == [False, False]


def test_reasons_and_the_refer_flag() -> None:
    n, p, u = Decision.NEGATIVE, Decision.POSITIVE, Decision.UNCERTAIN
    gates = {"out_of_distribution": False, "outside_population": False}
    cleared = referral_reasons([n, n], cleared=True, has_rule=True, **gates)
    assert (cleared.refer, cleared.reasons) == (False, ())
    assert referral_reasons([n, n], cleared=False, has_rule=True, **gates).reasons == (NOT_CLEARED,)
    both = referral_reasons([p, u], cleared=False, has_rule=True, **gates)
    assert both.refer and both.reasons == (POSSIBLE_FINDING, UNCERTAIN_FINDING)
    flagged = referral_reasons([n, n], cleared=True, has_rule=True, out_of_distribution=True, outside_population=True)
    assert flagged.refer and flagged.reasons == (OUT_OF_DISTRIBUTION, OUTSIDE_POPULATION)
    assert referral_reasons([n], cleared=False, has_rule=False, **gates).reasons == (NO_RULE,)


def test_no_finding_gives_no_reason_and_calibration_counts_referrals_as_the_service_makes_them() -> None:
    """ "No Finding" is positive on a normal film and uncertain on a doubtful one: neither refers a film the study
    rule clears. ``referred`` (calibration's expected rates) agrees with ``referral_reasons`` (the service)."""
    spec = spec_with(rule(negative_threshold=(0.5, 0.2, 0.2), positive_threshold=(0.8, 0.7, 0.6)))
    assert finding_labels(spec) == ("Cardiomegaly", "Edema")
    films = [
        (0.95, 0.05, 0.05),  # normal: "No Finding" positive, the findings negative
        (0.9, 0.8, 0.05),  # Cardiomegaly positive
        (0.6, 0.1, 0.3),  # Edema uncertain
        (0.05, 0.05, 0.15),  # everything negative
        (0.6, 0.1, 0.1),  # only "No Finding" uncertain
    ]
    probs = samples_of(*films)
    decided, cleared = decide(probs, spec), study_cleared(probs, spec)
    assert decided[0][0] is Decision.POSITIVE and decided[4][0] is Decision.UNCERTAIN
    served = [
        referral_reasons(
            [row[spec.label_index(label)] for label in finding_labels(spec)],
            cleared=film_cleared,
            has_rule=True,
            out_of_distribution=False,
            outside_population=False,
        )
        for row, film_cleared in zip(decided, cleared, strict=True)
    ]
    assert [r.refer for r in served] == [False, True, True, False, False]
    assert served[1].reasons == (POSSIBLE_FINDING,) and served[2].reasons == (UNCERTAIN_FINDING,)
    negative = [[d is Decision.NEGATIVE for d in row] for row in decided]
    assert referred(negative, cleared, spec).tolist() == [r.refer for r in served]


def test_spec_round_trips_and_checks_the_rule() -> None:
    spec = spec_with(rule(alpha_positive=0.05, calibration={"n_films": 250, "prevalence": {"Edema": 0.2}}))
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.referral is not None and again.referral.calibration["n_films"] == 250
    with pytest.raises(SpecError, match="has 2 values for 3 labels"):
        spec_with(rule(negative_threshold=(0.5, 0.2)))
    with pytest.raises(SpecError, match="not trained"):
        ModelSpec(arch="test_efficientnet", labels=LABELS, trained_labels=("Cardiomegaly",), referral=rule())
    with pytest.raises(SpecError, match=r"alpha must be in \(0, 1\)"):
        rule(alpha=1.0)
    with pytest.raises(SpecError, match="unknown fields"):
        ReferralSpec.from_dict({**rule().to_dict(), "beta": 1})


def test_plain_words_state_the_levels_and_the_cost() -> None:
    text = describe(rule(expected_study_referral_rate=0.7, expected_normal_clearance_rate=0.25))
    assert "at most 10% are reported negative" in text and "90% confidence" in text
    assert "250 calibration films" in text and "referred 70%" in text and "cleared 25% of normal films" in text
    assert "every film is referred" in describe(rule(study_threshold=None))


@pytest.mark.parametrize(
    ("body_part", "view", "age", "expected"),
    [
        ("CHEST", "PA", "045Y", ()),
        (None, None, None, ()),
        ("CHEST", "AP", "006Y", (POPULATION_PAEDIATRIC,)),
        ("CHEST", "PA", "011M", (POPULATION_PAEDIATRIC,)),
        ("CHEST", "PA", "018Y", ()),
        ("CHEST", "LL", "040Y", (POPULATION_LATERAL,)),
        ("THORAX", "LATERAL", None, (POPULATION_LATERAL,)),
        ("EXTREMITY", "AP", "030Y", (POPULATION_NON_CHEST,)),
        ("SKULL", "LAT", "003Y", (POPULATION_PAEDIATRIC, POPULATION_LATERAL, POPULATION_NON_CHEST)),
        ("CHEST", "PA", "garbage", ()),
    ],
)
def test_population_flags_from_header_values(
    body_part: str | None, view: str | None, age: str | None, expected: tuple[str, ...]
) -> None:
    assert population_flags(body_part=body_part, view_position=view, age=age) == expected


def test_a_child_dicom_is_flagged_and_its_age_is_not_kept() -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.PatientAge = "007Y"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    image = decode_image(buffer.getvalue())
    assert image.population_flags == (POPULATION_PAEDIATRIC,)
    assert "007Y" not in repr(vars(image)) and "007" not in " ".join(image.warnings)
    adult = decode_image(Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes())
    assert adult.population_flags == ()
