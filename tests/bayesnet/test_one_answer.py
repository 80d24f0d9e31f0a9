"""One film, one answer, at the library level: per-image MC seeds, the deciding rule with its reasons, the population.

The masks of an image depend on its seed alone (not on its neighbours in the batch), the seed on its model input and
the weights alone; each finding's decision is reproducible from the thresholds :func:`finding_rules` reports; a film
is verified as adult frontal only when something says so.
"""

from __future__ import annotations

import pytest
import torch

from bayesnet import BayesianEfficientNet, ImageFacts, ModelSpec, PerImageMasks, input_seed
from bayesnet.decision import Decision, Reason, decide, decide_with_reasons, finding_rules
from bayesnet.mc import mc_from_trunk, summarise
from bayesnet.population import Declared, assess
from bayesnet.referral import (
    NO_RULE,
    OUT_OF_DISTRIBUTION,
    OUTSIDE_POPULATION,
    POPULATION_UNVERIFIED,
    POSSIBLE_FINDING,
    UNCERTAIN_FINDING,
    referral_reasons,
)
from bayesnet.spec import ReferralSpec


def test_an_image_gets_the_same_masks_whatever_shares_its_batch(tiny_model: BayesianEfficientNet) -> None:
    torch.manual_seed(1)
    images = torch.rand(4, tiny_model.spec.in_chans, 64, 64)
    seeds = [input_seed(image, "w" * 64) for image in images]
    with torch.inference_mode():
        z = tiny_model.forward_trunk(images)
        alone = [mc_from_trunk(tiny_model, z[i : i + 1], 7, masks=PerImageMasks([seeds[i]], 7)) for i in range(4)]
        together = mc_from_trunk(tiny_model, z, 7, masks=PerImageMasks(seeds, 7), return_samples=True)
        reordered = mc_from_trunk(
            tiny_model, z[[2, 0, 3, 1]], 7, masks=PerImageMasks([seeds[i] for i in (2, 0, 3, 1)], 7)
        )
    for i in range(4):
        torch.testing.assert_close(together.mean[i], alone[i].mean[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(reordered.mean, together.mean[[2, 0, 3, 1]], rtol=0, atol=1e-6)
    assert together.samples is not None and together.samples[:, 0].std(dim=0).max() > 0  # really stochastic


def test_the_seed_depends_on_the_input_and_the_weights_alone() -> None:
    image = torch.rand(1, 32, 32)
    assert input_seed(image, "a" * 64) == input_seed(image.clone(), "a" * 64) == input_seed(image.numpy(), "a" * 64)
    assert input_seed(image, "a" * 64) != input_seed(image, "b" * 64)
    nudged = image.clone()
    nudged[0, 0, 0] += 1e-6
    assert input_seed(nudged, "a" * 64) != input_seed(image, "a" * 64)
    assert 0 <= input_seed(image, "a" * 64) < 2**63


def test_masks_refuse_a_batch_of_another_size() -> None:
    with pytest.raises(ValueError, match="rows"):
        PerImageMasks([1, 2], 3).sample(torch.ones(5, 8), 0.5)


def test_monte_carlo_standard_error_is_the_sample_sd_over_root_t() -> None:
    probs = torch.tensor([[[0.2]], [[0.4]], [[0.9]], [[0.5]]])  # (T=4, B=1, K=1)
    se = summarise(probs).standard_error
    assert se.item() == pytest.approx(probs.squeeze().std(correction=1).item() / 2.0, rel=1e-6)
    assert torch.isnan(summarise(probs[:1]).standard_error).all()


def _spec_with(negative: list[float | None], positive: list[float | None], score: str = "mean") -> ModelSpec:
    rule = ReferralSpec(
        alpha=0.1,
        study_alpha=0.1,
        delta=0.1,
        negative_threshold=tuple(negative),
        positive_threshold=tuple(positive),
        study_labels=("A", "B", "C"),
        study_threshold=0.5,
        score=score,  # type: ignore[arg-type]
    )
    return ModelSpec(arch="test_efficientnet", image_size=64, labels=("A", "B", "C"), referral=rule)


def _recomputed(samples: torch.Tensor, spec: ModelSpec) -> list[list[Decision]]:
    """The decisions a client computes from the thresholds the response carries (finding_rules), by hand."""
    out = []
    mean = samples.mean(dim=0)
    lower, upper = torch.quantile(samples, torch.tensor([0.05, 0.95]), dim=0)
    for b in range(samples.shape[1]):
        row = []
        for k, rule in enumerate(finding_rules(spec)):
            low_score, high_score = (
                (float(mean[b, k]),) * 2 if rule.decided_on == "conf" else (float(upper[b, k]), float(lower[b, k]))
            )
            cleared = rule.clear_below is not None and low_score < rule.clear_below
            positive = rule.positive_at is not None and high_score >= rule.positive_at
            row.append(
                Decision.NEGATIVE
                if cleared and not positive
                else Decision.POSITIVE
                if positive and not cleared
                else Decision.UNCERTAIN
            )
        out.append(row)
    return out


@pytest.mark.parametrize("score", ["mean", "interval"])
def test_every_decision_follows_from_the_thresholds_reported(score: str) -> None:
    spec = _spec_with([0.2, None, 0.6], [0.7, 0.5, 0.4], score)
    generator = torch.Generator().manual_seed(0)
    films = torch.rand(1, 300, 3, generator=generator)  # each film's own level, samples spread around it
    samples = (films + 0.05 * torch.randn(20, 300, 3, generator=generator)).clamp(0.0, 1.0)
    assert decide(samples, spec) == _recomputed(samples, spec)
    reasons = {reason for row in decide_with_reasons(samples, spec) for _, reason in row}
    assert reasons == {
        Reason.CLEARED,
        Reason.ABOVE_POSITIVE_THRESHOLD,
        Reason.BETWEEN_THRESHOLDS,
        Reason.CANNOT_BE_CLEARED,
        Reason.BOTH_THRESHOLDS_MET,  # C: clear below 0.6 and positive at 0.4 overlap
    }
    for row in decide_with_reasons(samples, spec):
        decision, reason = row[1]  # B can never be cleared
        assert reason in (Reason.CANNOT_BE_CLEARED, Reason.ABOVE_POSITIVE_THRESHOLD)
        assert (decision == Decision.POSITIVE) == (reason == Reason.ABOVE_POSITIVE_THRESHOLD)


def test_without_a_rule_the_point_threshold_decides_on_both_sides_and_disagreement_is_named() -> None:
    spec = ModelSpec(arch="test_efficientnet", image_size=64, labels=("A",), trained_labels=("A",), threshold=(0.5,))
    assert finding_rules(spec)[0].clear_below == finding_rules(spec)[0].positive_at == 0.5
    split = torch.tensor([0.2, 0.8] * 10).reshape(20, 1, 1)
    assert decide_with_reasons(split, spec) == [[(Decision.UNCERTAIN, Reason.NO_RULE_MC_DISAGREEMENT)]]
    assert decide_with_reasons(torch.full((20, 1, 1), 0.1), spec) == [[(Decision.NEGATIVE, Reason.CLEARED)]]


def _facts(**kwargs: object) -> ImageFacts:
    values: dict[str, object] = {
        "format": "png",
        "width": 512,
        "height": 512,
        "bit_depth": 8,
        "photometric": "L",
        "warnings": (),
    }
    values.update(kwargs)
    return ImageFacts(**values)  # type: ignore[arg-type]


def test_a_png_is_verified_only_by_a_declared_adult_frontal_view() -> None:
    assert assess(_facts()) == assess(_facts(), Declared())
    nothing = assess(_facts())
    assert not nothing.verified and nothing.flags == () and nothing.missing == ("age", "view")
    assert assess(_facts(), Declared(age_years=40)).missing == ("view",)
    adult_pa = assess(_facts(), Declared(age_years=40, view="pa"))
    assert adult_pa.verified and adult_pa.flags == () and adult_pa.missing == ()
    assert assess(_facts(), Declared(age_years=5, view="PA")).flags == ("paediatric",)
    assert assess(_facts(), Declared(age_years=17.9, view="AP")).flags == ("paediatric",)
    assert assess(_facts(), Declared(age_years=0.5)).flags == ("paediatric",)
    assert assess(_facts(), Declared(age_years=18, view="LATERAL")).flags == ("lateral_or_oblique_view",)
    assert assess(_facts(), Declared(view="DECUBITUS")).flags == ("lateral_or_oblique_view",)
    with pytest.raises(ValueError, match="patient_age"):
        Declared(age_years=-1)
    with pytest.raises(ValueError, match="view"):
        Declared(view="sideways")


def test_a_dicom_header_verifies_and_a_declaration_cannot_hide_what_it_says() -> None:
    header_adult_pa = _facts(format="dicom", population_verified=("age", "view"))
    assert assess(header_adult_pa).verified
    assert assess(header_adult_pa, Declared(age_years=6)).flags == ("paediatric",)  # either source can flag
    child = _facts(format="dicom", population_flags=("paediatric",), population_verified=("view",))
    assert assess(child, Declared(age_years=40)).flags == ("paediatric",) and not assess(child).verified
    silent = _facts(format="dicom")
    assert assess(silent).missing == ("age", "view")
    assert assess(silent, Declared(age_years=50, view="AP")).verified  # declared values fill a silent header


def test_a_flagged_film_gets_no_finding_based_reason_and_an_unverified_one_is_never_cleared() -> None:
    decisions = [Decision.POSITIVE, Decision.UNCERTAIN]
    for gate in (
        {"out_of_distribution": True, "outside_population": False},
        {
            "out_of_distribution": False,
            "outside_population": True,
        },
    ):
        flagged = referral_reasons(decisions, cleared=False, has_rule=True, **gate)
        assert flagged.refer
        assert POSSIBLE_FINDING not in flagged.reasons and UNCERTAIN_FINDING not in flagged.reasons
        assert set(flagged.reasons) & {OUT_OF_DISTRIBUTION, OUTSIDE_POPULATION}
    negatives = [Decision.NEGATIVE, Decision.NEGATIVE]
    common = {"has_rule": True, "out_of_distribution": False, "outside_population": False}
    assert not referral_reasons(negatives, cleared=True, population_verified=True, **common).refer
    unverified = referral_reasons(negatives, cleared=True, population_verified=False, **common)
    assert unverified.refer and unverified.reasons == (POPULATION_UNVERIFIED,)
    no_rule = referral_reasons(
        negatives,
        cleared=False,
        has_rule=False,
        out_of_distribution=False,
        outside_population=False,
        population_verified=False,
    )
    assert no_rule.reasons[:2] == (NO_RULE, POPULATION_UNVERIFIED)
