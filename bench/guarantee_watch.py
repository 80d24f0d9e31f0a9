"""Watching the referral rule's miss rate on a site's films: how fast a broken guarantee is caught, how often a
sound one is falsely stopped. A synthetic site, many seeds, one run.

The rule's clearing threshold is fitted the way ``python -m train calibrate`` fits it
(``train.conformal.fit_negative_threshold``: Learn-then-Test, miss rate at most ``alpha`` with confidence
``1 - delta``) on synthetic calibration scores: negative films' scores ~ Beta(2, 5), positive films' ~ Beta(5, 2).
Then films arrive at a site, every film gets the radiologist's verdict, and each positive film is one Bernoulli
outcome for the watch: 1 if the rule cleared it (a miss). ``bayesnet.sequential.exceeds`` raises the alarm the
first time the confidence sequence lies wholly above ``alpha``.

* **Unshifted site**: the same score distributions. The rule's true miss rate is at most alpha (with probability
  1 - delta over the calibration draw), so an alarm is a false alarm; measured over ``--seeds`` sites of
  ``--films`` films each. Theory: at most ``--watch-delta`` when the true rate is at most alpha.
* **Shifted site**: positive films' scores ~ Beta(5 - shift, 2 + shift): harder cases (a new scanner, a sicker or
  earlier-stage population). The true miss rate is computed exactly; the films to detection are counted. Theory
  for the mixture martingale: about log(1/delta) / KL(p || alpha) positive films, plus a term that grows like
  log of that (Howard et al. 2021), divided by the prevalence for all films.
* A **prevalence shift** alone leaves the miss rate among positives (what the guarantee is about) unchanged, so it
  is not a reason to stop; it changes the referral rate, watched separately.

    python bench/guarantee_watch.py [--seeds 400] [--films 20000] [--alpha 0.1] [--delta 0.1] [--watch-delta 0.05]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.special import gammaln

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bayesnet.sequential import MixturePrior
from train.conformal import fit_negative_threshold


def first_alarm(misses: np.ndarray, limit: float, delta: float, prior: MixturePrior) -> int | None:
    """1-based index of the first positive film after which the sequence lies above ``limit``; None if never.
    Vectorised ``bayesnet.sequential.exceeds`` over the whole stream."""
    k = np.cumsum(misses, dtype=np.float64)
    n = np.arange(1, len(misses) + 1, dtype=np.float64)
    log_m = (
        gammaln(prior.a + k)
        + gammaln(prior.b + n - k)
        - gammaln(prior.a + prior.b + n)
        - (gammaln(prior.a) + gammaln(prior.b) - gammaln(prior.a + prior.b))
        - k * math.log(limit)
        - (n - k) * math.log1p(-limit)
    )
    hit = np.flatnonzero((log_m >= math.log(1.0 / delta)) & (k / n > limit))
    return int(hit[0]) + 1 if hit.size else None


def kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=400)
    parser.add_argument("--films", type=int, default=20000, help="films per unshifted site")
    parser.add_argument("--calibration", type=int, default=2000, help="calibration films")
    parser.add_argument("--prevalence", type=float, default=0.3)
    parser.add_argument("--alpha", type=float, default=0.1, help="the promised miss rate")
    parser.add_argument("--delta", type=float, default=0.1, help="the calibration's confidence parameter")
    parser.add_argument("--watch-delta", type=float, default=0.05, help="the watch's false-alarm budget")
    args = parser.parse_args()
    rng = np.random.default_rng(20261207)
    prior = MixturePrior(mean=args.alpha, strength=10.0)
    print(f"alpha {args.alpha}, calibration delta {args.delta}, watch delta {args.watch_delta}, prior {prior}")

    # The rule, fitted once per seed on its own calibration films (the calibration draw is part of the risk).
    thresholds = []
    for _ in range(args.seeds):
        y = rng.random(args.calibration) < args.prevalence
        scores = np.where(y, rng.beta(5, 2, args.calibration), rng.beta(2, 5, args.calibration))
        thresholds.append(fit_negative_threshold(scores, y, alpha=args.alpha, delta=args.delta) or 0.0)
    lam = np.array(thresholds)
    true_miss = stats.beta(5, 2).cdf(lam)
    print(
        f"fitted clear-below threshold: median {np.median(lam):.3f}; true miss rate median {np.median(true_miss):.3f}, "
        f"max {true_miss.max():.3f}, above alpha in {np.mean(true_miss > args.alpha):.1%} of seeds "
        f"(the calibration's own delta allows {args.delta:.0%})"
    )

    alarms = 0
    alarms_sound = 0
    for seed in range(args.seeds):
        positives = rng.random(args.films) < args.prevalence
        pos_scores = rng.beta(5, 2, int(positives.sum()))
        hit = first_alarm((pos_scores < lam[seed]).astype(np.int8), args.alpha, args.watch_delta, prior)
        alarms += hit is not None
        alarms_sound += hit is not None and true_miss[seed] <= args.alpha
    sound = int(np.sum(true_miss <= args.alpha))
    print(
        f"unshifted site, {args.films} films x {args.seeds} seeds: stopped in {alarms} ({alarms / args.seeds:.1%}); "
        f"among the {sound} seeds whose rule truly meets alpha: {alarms_sound} ({alarms_sound / max(sound, 1):.1%}, "
        f"theory <= {args.watch_delta:.0%})"
    )

    print("shifted site (positive films' scores ~ Beta(5 - s, 2 + s)):")
    print("  shift  true miss (median)  positives to stop: median  p90   theory    films to stop (median)  never")
    for shift in (0.5, 1.0, 1.5, 2.0):
        times, misses = [], []
        for seed in range(args.seeds):
            p_true = float(stats.beta(5 - shift, 2 + shift).cdf(lam[seed]))
            misses.append(p_true)
            stream = (rng.beta(5 - shift, 2 + shift, 20000) < lam[seed]).astype(np.int8)
            times.append(first_alarm(stream, args.alpha, args.watch_delta, prior))
        found = [t for t in times if t is not None]
        p_med = float(np.median(misses))
        theory = math.log(1 / args.watch_delta) / kl(p_med, args.alpha) if p_med > args.alpha else float("inf")
        median = float(np.median(found)) if found else float("nan")
        p90 = float(np.percentile(found, 90)) if found else float("nan")
        print(
            f"  {shift:5.1f}  {p_med:18.3f}  {median:25.0f}  {p90:5.0f}  {theory:7.0f}    "
            f"{median / args.prevalence:22.0f}  {len(times) - len(found):5d}"
        )


if __name__ == "__main__":
    main()
