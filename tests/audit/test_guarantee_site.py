"""The guarantee operated end to end on a synthetic site (``bench/guarantee_site.py``, one seed): a network trained
and its rule calibrated on synthetic films (``train.fit``, ``python -m train calibrate``); the service in shadow
mode scoring the site's films, verdicts posted, the rule moved to autonomous by a person; the site's disease turns
subtler, and the service suspends clearing within the films the method's theory expects; an unshifted site's
rule is never suspended. bench/guarantee_site.py runs the same over many seeds (docs/guarantee.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bayesnet.checkpoint import load_spec
from bench.guarantee_site import (
    expected_films_to_detection,
    site_films,
    site_service,
)
from service.guarantee.watch import rule_cleared

pytestmark = pytest.mark.slow

SIZE, PREVALENCE, BATCH = 128, 0.1, 10


@pytest.fixture
def site_model(synthetic_site_model: Path) -> Path:
    return synthetic_site_model


def test_a_site_whose_disease_turns_subtler_is_stopped_within_the_films_theory_expects(
    site_model: Path, tmp_path: Path
) -> None:
    rule = load_spec(site_model).referral
    assert rule is not None and rule.expected_study_referral_rate < 0.9, "the rule must clear films to be watched"
    shadow = site_films(150, 1000, image_size=SIZE, prevalence=PREVALENCE)
    shifted = site_films(400, 2000, image_size=SIZE, prevalence=PREVALENCE, contrast=0.45)
    with site_service(site_model, tmp_path / "site", mode="shadow") as site:
        # Shadow: every film referred for that reason alone; what the rule would clear recorded, and checked.
        answers = site.score(shadow, "shadow")
        assert all(a["referral"]["refer"] and a["referral"]["mode"] == "shadow" for a in answers)
        cleared = [a for a in answers if rule_cleared(a["referral"]["refer"], a["referral"]["reasons"])]
        assert cleared and all(a["referral"]["reasons"] == ["shadow_mode"] for a in cleared)
        site.verdicts(shadow, "shadow")
        watch = site.operation()["watch"]
        assert watch["films"] == 150 and watch["broken"] == [] and watch["coverage"] == 1.0
        assert not site.suspended()
        before = {name: list(counts) for name, counts in site.counts.items()}
        site.act(action="set_mode", mode="autonomous", reason="shadow period clean")
        autonomous = site.score(shadow[:20], "autonomous")
        assert any(not a["referral"]["refer"] for a in autonomous), "autonomous mode cleared nothing"
        for counts in site.counts.values():
            counts[:] = [0, 0]

        # The shift: films and their verdicts in batches until the service stops clearing.
        found = site.run_until_suspended(shifted, "shifted", BATCH)
        assert found is not None, "the rule was never suspended on a site where it misses most findings"
        operation = site.operation()
        current = operation["current"]
        assert (current["state"], current["reason"], current["actor"]) == ("suspended", "miss_rate_exceeded", "service")
        assert [c["reason"] for c in operation["history"]][:3] == ["miss_rate_exceeded", "mode_set", "first_start"]
        assert operation["watch"]["broken"], operation["watch"]
        after = site.score(shifted[found:], "after")  # the rest: every film referred now; and the true rates
        assert all(a["referral"]["refer"] and "guarantee_suspended" in a["referral"]["reasons"] for a in after)

    # Within what the method expects from the shift's true miss rates (all the shifted films' counts).
    per_film = {name: (n / len(shifted), k / len(shifted)) for name, (n, k) in site.counts.items()}
    limits = dict.fromkeys(site.counts, rule.alpha) | {"study": rule.study_alpha}
    expected = expected_films_to_detection(before, per_film, limits=limits, delta=rule.delta)
    assert expected is not None, "the shift must break a promise for the test to mean anything"
    assert expected / 3 <= found <= 3 * expected + BATCH, (found, expected)


def test_an_unshifted_site_is_not_stopped(site_model: Path, tmp_path: Path) -> None:
    films = site_films(400, 3000, image_size=SIZE, prevalence=PREVALENCE)
    with site_service(site_model, tmp_path / "control", mode="autonomous") as site:
        assert site.run_until_suspended(films, "control", 50) is None
        watch = site.operation()["watch"]
        assert watch["films"] == 400 and watch["broken"] == [] and watch["cleared"] > 0
        judged = sum(p["judged_films"] for p in watch["findings"].values())
        assert judged == sum(n for name, (n, _) in site.counts.items() if name != "study") > 0
