"""Anytime-valid confidence sequences (``bayesnet.sequential``): coverage at every moment, the shortcut test, edges."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bayesnet.sequential import MixturePrior, confidence_sequence, exceeds, log_wealth


@pytest.mark.parametrize("prior", [MixturePrior(), MixturePrior(mean=0.1, strength=10.0)])
def test_the_sequence_covers_the_true_rate_at_every_film_at_once_in_all_but_delta_of_runs(prior: MixturePrior) -> None:
    """Time-uniform coverage, the property that lets the bounds be read after every film: over 400 simulated
    watches of 400 films, the true rate leaves the sequence at some film in at most delta of them (plus noise)."""
    rng = np.random.default_rng(7)
    p, delta, runs, films = 0.1, 0.1, 400, 400
    level = math.log(1 / delta)
    left = 0
    for _ in range(runs):
        events = np.cumsum(rng.random(films) < p)
        # p is outside the sequence after film n exactly when M_n(p) >= 1/delta.
        left += any(log_wealth(p, int(k), n, prior) >= level for n, k in enumerate(events, start=1))
    assert left / runs <= delta + 3 * math.sqrt(delta * (1 - delta) / runs)


def test_a_fixed_sample_interval_read_after_every_film_would_not_cover() -> None:
    """Why a sequence: the Wilson 90% interval recomputed after each of 400 films excludes the true rate at some
    film far more often than 10% of the time (the same draws the sequence covers)."""
    rng = np.random.default_rng(7)
    p, z, runs, films = 0.1, 1.645, 400, 400
    left = 0
    for _ in range(runs):
        k = np.cumsum(rng.random(films) < p)
        n = np.arange(1, films + 1)
        centre = (k + z * z / 2) / (n + z * z)
        half = z * np.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
        left += bool(np.any((p < centre - half) | (p > centre + half)))
    assert left / runs > 0.3


def test_the_bounds_are_where_the_evidence_reaches_one_over_delta_and_narrow_with_more_films() -> None:
    prior = MixturePrior(mean=0.1, strength=10.0)
    bounds = confidence_sequence(30, 200, 0.05, prior)
    assert 0 < bounds.lower < 0.15 < bounds.upper < 1 and bounds.estimate == pytest.approx(0.15)
    for edge in (bounds.lower, bounds.upper):
        assert log_wealth(edge, 30, 200, prior) == pytest.approx(math.log(20), abs=1e-6)
    wider, narrower = confidence_sequence(3, 20, 0.05, prior), confidence_sequence(300, 2000, 0.05, prior)
    assert wider.lower < bounds.lower < narrower.lower and narrower.upper < bounds.upper < wider.upper


def test_edges_no_film_no_event_all_events_and_bad_input() -> None:
    assert confidence_sequence(0, 0, 0.05) == confidence_sequence(0, 0, 0.05)
    none = confidence_sequence(0, 0, 0.05)
    assert (none.lower, none.upper, none.estimate) == (0.0, 1.0, None)
    assert confidence_sequence(0, 50, 0.05).lower == 0.0 and confidence_sequence(0, 50, 0.05).upper < 0.2
    assert confidence_sequence(50, 50, 0.05).upper == 1.0 and confidence_sequence(50, 50, 0.05).lower > 0.8
    with pytest.raises(ValueError, match="events <= trials"):
        confidence_sequence(3, 2, 0.05)
    with pytest.raises(ValueError, match="delta"):
        confidence_sequence(1, 2, 1.5)
    with pytest.raises(ValueError, match="mixture prior"):
        MixturePrior(mean=0.0)


def test_exceeds_is_the_lower_bound_passing_the_limit_without_the_search() -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        trials = int(rng.integers(1, 300))
        events = int(rng.integers(0, trials + 1))
        limit = float(rng.uniform(0.01, 0.5))
        prior = MixturePrior(mean=float(rng.uniform(0.05, 0.9)), strength=float(rng.uniform(1, 40)))
        lower = confidence_sequence(events, trials, 0.05, prior).lower
        if abs(lower - limit) > 1e-9:
            assert exceeds(events, trials, limit, 0.05, prior) == (lower > limit)
    assert not exceeds(0, 0, 0.1, 0.05)
