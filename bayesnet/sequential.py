"""Anytime-valid confidence sequences for a rate watched one film at a time (a miss rate, a referral rate).

A fixed-sample interval recomputed every day is not valid: looked at often enough, it crosses any line by chance.
A *confidence sequence* covers the true rate at every moment at once: ``P(for all t: lower_t <= p <= upper_t)
>= 1 - delta``, so its bounds may be read after every film and acted on the first time they cross a line.

The construction is the beta-binomial mixture martingale (Robbins 1970; Howard, Ramdas, McAuliffe and Sekhon,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", Annals of Statistics 2021, conjugate mixtures).
For Bernoulli outcomes with mean ``p``, ``k`` events in ``n`` trials,

    M_n(p) = B(a + k, b + n - k) / B(a, b) / (p^k (1 - p)^(n - k))

is the likelihood ratio of a Beta(a, b) mixture of rates against ``p``: a nonnegative martingale with ``M_0 = 1``
when ``p`` is the true rate, so by Ville's inequality ``P(exists n: M_n(p) >= 1/delta) <= delta``. The confidence
sequence is ``{p : M_n(p) < 1/delta}``, an interval because ``log M_n`` is convex in ``p``. The prior only decides
where the sequence is tightest (its mean and strength, :class:`MixturePrior`), never its validity.

Used by ``service.guarantee`` to watch the referral rule's promised miss rates on a site's own films.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Bisection steps for a bound: the interval (0, 1) halved 60 times is below 1e-18.
_STEPS = 60


@dataclass(frozen=True)
class MixturePrior:
    """The Beta(a, b) mixing distribution: ``mean`` where the sequence is tightest, ``strength`` a + b.

    A prior centred on the rate a guarantee promises (its alpha) makes the sequence tightest where the decision is;
    any prior gives valid bounds.
    """

    mean: float = 0.5
    strength: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 < self.mean < 1.0 or self.strength <= 0.0:
            raise ValueError(f"a mixture prior needs 0 < mean < 1 and strength > 0, got {self.mean}, {self.strength}")

    @property
    def a(self) -> float:
        return self.mean * self.strength

    @property
    def b(self) -> float:
        return (1.0 - self.mean) * self.strength


@dataclass(frozen=True)
class RateBounds:
    """A rate's confidence sequence after ``trials`` outcomes, ``events`` of them events."""

    events: int
    trials: int
    lower: float
    upper: float
    delta: float

    @property
    def estimate(self) -> float | None:
        """The observed rate (None before the first outcome)."""
        return self.events / self.trials if self.trials else None


def _log_beta(x: float, y: float) -> float:
    return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)


def log_wealth(p: float, events: int, trials: int, prior: MixturePrior) -> float:
    """``log M_n(p)``: the evidence against the rate being ``p`` after ``events`` in ``trials``."""
    misses, rest = events, trials - events
    mixture = _log_beta(prior.a + misses, prior.b + rest) - _log_beta(prior.a, prior.b)
    at_p = (misses * math.log(p) if misses else 0.0) + (rest * math.log1p(-p) if rest else 0.0)
    return mixture - at_p


def confidence_sequence(events: int, trials: int, delta: float, prior: MixturePrior | None = None) -> RateBounds:
    """The ``1 - delta`` confidence sequence's bounds after ``events`` in ``trials`` (``(0, 1)`` before any)."""
    if not 0 <= events <= trials:
        raise ValueError(f"need 0 <= events <= trials, got {events} of {trials}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    prior = prior or MixturePrior()
    if trials == 0:
        return RateBounds(events, trials, 0.0, 1.0, delta)
    level = math.log(1.0 / delta)
    centre = events / trials

    def outside(p: float) -> bool:
        return log_wealth(p, events, trials, prior) >= level

    # log M is convex in p with its minimum at the observed rate (where M < 1/delta: the mixture cannot beat the
    # best single rate); each bound is where it climbs back to log(1/delta), or the end of (0, 1) if it never does.
    lower = 0.0
    if events > 0 and outside(1e-300):
        low, high = 1e-300, centre
        for _ in range(_STEPS):
            mid = (low + high) / 2
            low, high = (mid, high) if outside(mid) else (low, mid)
        lower = low
    upper = 1.0
    if events < trials and outside(1.0 - 1e-16):
        low, high = centre, 1.0 - 1e-16
        for _ in range(_STEPS):
            mid = (low + high) / 2
            low, high = (low, mid) if outside(mid) else (mid, high)
        upper = high
    return RateBounds(events, trials, lower, upper, delta)


def exceeds(events: int, trials: int, limit: float, delta: float, prior: MixturePrior | None = None) -> bool:
    """Whether the ``1 - delta`` confidence sequence lies wholly above ``limit``: anytime-valid evidence that the rate
    is above it. When the rate is at most ``limit`` this happens, ever, with probability at most ``delta``.

    The same as ``confidence_sequence(...).lower > limit`` without the bisection: the sequence's lower bound passes
    ``limit`` exactly when ``limit`` is below the observed rate and outside the sequence.
    """
    if trials == 0 or events / trials <= limit:
        return False
    return log_wealth(limit, events, trials, prior or MixturePrior()) >= math.log(1.0 / delta)
