"""The guarantee operated end to end on a synthetic site (``train/synthetic.py``), through the real service.

What a site does (docs/guarantee.md), with films and radiologists simulated and everything else real:

1. **Calibrate.** A small network is trained on synthetic films (``train.fit``) and its referral rule fitted on
   other synthetic films with ``python -m train calibrate --data`` (Learn-then-Test: each finding missed at most
   ``alpha`` of the time, abnormal films cleared as normal at most ``alpha``, each with confidence ``1 - delta``).
2. **Shadow.** The service starts in ``CXR_GUARANTEE_MODE=shadow`` with an empty audit trail; the site's films are
   scored (every film referred, what the rule would clear recorded) and the radiologists' verdicts posted to
   ``/v1/outcomes`` as CSV. The watch must hold.
3. **Autonomous.** A person moves the rule to autonomous through ``POST /v1/guarantee``.
4. **Shift.** The site's disease becomes subtler: every finding is planted at ``--contrast`` of the calibration
   films' opacity (``render_sample(contrast=)``), so the model scores positive films lower and the rule clears
   more of them than ``alpha``. Films and verdicts arrive in batches of ``--batch``; the count is the films
   scored after the shift until ``GET /v1/guarantee`` says ``suspended`` (``miss_rate_exceeded``). Then every
   answer must refer with ``guarantee_suspended``.
5. **Control.** A fresh trail, the same rule, autonomous, films from the calibration distribution: a suspension is
   a false alarm.

Films to detection are compared with the method's expectation: the first film count at which the expected path
(the shadow period's counts, then ``prevalence * true miss rate`` misses per film) puts the mixture confidence
sequence wholly above ``alpha`` (``bayesnet.sequential.exceeds``), taking the earliest finding. The true miss
rates after the shift are those observed over all seeds' shifted films (pooled). The watch's false-alarm rate
on an unshifted site is at most ``delta`` for ever (anytime-valid); ``bench/guarantee_watch.py`` measures it over
400 seeds on simulated scores, this bench over ``--seeds`` sites of real films through the service.

    python bench/guarantee_site.py [--seeds 10] [--shadow 150] [--shifted 600] [--control 600] [--contrast 0.45]

``tests/audit/test_guarantee_site.py`` runs one seed of the same (the functions below).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bayesnet.checkpoint import load_spec
from bayesnet.sequential import exceeds
from service.guarantee.watch import promise_prior, rule_cleared
from train.config import FitConfig
from train.synthetic import PLANTED_FINDINGS, generate, render_sample

PREDICT_KEY, ADMIN_KEY, OUTCOME_KEY = "site-predict-key-0123", "site-admin-key-01234", "site-outcome-key-0123"
#: What the site says about each film: an adult PA film (the intended population), no heatmaps (not watched here).
FILM_PARAMS = {"patient_age": 54, "view": "PA", "cams": "none"}


# --- the site's films -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Film:
    png: bytes
    #: The radiologist's verdict per planted finding (the synthetic truth).
    present: dict[str, bool]


def site_films(n: int, seed: int, *, image_size: int, prevalence: float = 0.1, contrast: float = 1.0) -> list[Film]:
    """``n`` films, each planted finding present with probability ``prevalence``, at ``contrast`` of full opacity."""
    rng = np.random.default_rng(seed)
    films = []
    for _ in range(n):
        present = {label: bool(rng.random() < prevalence) for label in PLANTED_FINDINGS}
        planted = {label: 1.0 for label, yes in present.items() if yes}
        image, _ = render_sample(rng, planted, image_size, contrast=contrast)
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        films.append(Film(buffer.getvalue(), present))
    return films


# --- the model and its rule -----------------------------------------------------------------------------------


def build_site_model(
    work: Path,
    *,
    seed: int = 0,
    image_size: int = 128,
    train_films: int = 800,
    calibration_films: int = 600,
    epochs: int = 8,
    prevalence: float = 0.1,
    alpha: float = 0.1,
    delta: float = 0.1,
) -> Path:
    """Train the small test network on synthetic films and calibrate its rule on others; the model directory."""
    from train.__main__ import main as train_main
    from train.fit import fit

    data = work / "synth-train"
    generate(data, n=train_films, seed=seed, image_size=image_size, prevalence=prevalence)
    run = work / "run"
    config = FitConfig(
        train_csv=data / "train.csv",
        valid_csv=data / "valid.csv",
        out=run,
        arch="test_efficientnet",
        init="none",
        epochs=epochs,
        batch_size=32,
        lr=3e-3,
        image_size=image_size,
        workers=0,
        progress=False,
        patience=epochs,
    )
    result = fit(config)
    print(f"trained: best validation AUROC {result.best_auc:.3f}", flush=True)
    # The calibration films come from the site's distribution before the shift: binary labels, nothing blank.
    calibration = work / "synth-calibration"
    generate(
        calibration,
        n=calibration_films,
        seed=seed + 1,
        image_size=image_size,
        valid_fraction=0.0,
        prevalence=prevalence,
        uncertain_fraction=0.0,
        blank_fraction=0.0,
    )
    model = work / "model"
    levels = ["--alpha", str(alpha), "--study-alpha", str(alpha), "--delta", str(delta)]
    inputs = ["--checkpoint", str(run / "best"), "--data", str(calibration / "train.csv"), "--out", str(model)]
    code = train_main(["calibrate", *inputs, *levels])
    if code != 0:
        raise RuntimeError(f"python -m train calibrate exited {code}")
    return model


# --- the site, through the service's HTTP API -----------------------------------------------------------------


@dataclass
class Site:
    """One site's client of a running service: scores films, posts verdicts, reads and changes the rule's state."""

    client: httpx.Client
    scored: int = 0
    #: Per promise, counted from the answers and the truth: per finding, [films with it, of those reported
    #: negative]; "study": [abnormal films, of those cleared by the rule].
    counts: dict[str, list[int]] = field(default_factory=lambda: {n: [0, 0] for n in (*PLANTED_FINDINGS, "study")})

    def score(self, films: Sequence[Film], prefix: str) -> list[dict[str, Any]]:
        """Each film scored (in order); its answer. The request id is ``prefix-i``."""
        answers = []
        for i, film in enumerate(films):
            response = self.client.post(
                "/v1/predict",
                files={"file": ("film.png", film.png, "image/png")},
                params=FILM_PARAMS,
                headers={"X-API-Key": PREDICT_KEY, "X-Request-ID": f"{prefix}-{i}"},
            )
            if response.status_code != 200:
                raise RuntimeError(f"predict answered {response.status_code}: {response.text[:300]}")
            answer: dict[str, Any] = response.json()
            if any(film.present.values()):
                self.counts["study"][0] += 1
                self.counts["study"][1] += rule_cleared(answer["referral"]["refer"], answer["referral"]["reasons"])
            for label, present in film.present.items():
                if present and label in answer["predictions"]:
                    self.counts[label][0] += 1
                    self.counts[label][1] += answer["predictions"][label]["decision"] == "negative"
            answers.append(answer)
        self.scored += len(films)
        return answers

    def verdicts(self, films: Sequence[Film], prefix: str) -> None:
        """The radiologists' verdicts on ``films`` (scored under ``prefix``), as one CSV submission; waits until
        the service's watch has read them."""
        rows = [
            f"{prefix}-{i},{label},{'present' if present else 'absent'}"
            for i, film in enumerate(films)
            for label, present in film.present.items()
        ]
        posted = datetime.now().astimezone()
        response = self.client.post(
            "/v1/outcomes",
            content="request_id,finding,verdict\n" + "\n".join(rows) + "\n",
            headers={"Content-Type": "text/csv", "X-API-Key": OUTCOME_KEY},
        )
        if response.status_code != 200:
            raise RuntimeError(f"outcomes answered {response.status_code}: {response.text[:500]}")
        deadline = time.monotonic() + 60
        while True:
            watch = self.operation()["watch"]
            if watch is not None and datetime.fromisoformat(watch["checked_at"]) >= posted:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the guarantee watch did not refresh within 60 s of the verdicts")
            time.sleep(0.05)

    def operation(self) -> dict[str, Any]:
        response = self.client.get("/v1/guarantee", headers={"X-API-Key": ADMIN_KEY})
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def act(self, **action: Any) -> dict[str, Any]:
        response = self.client.post("/v1/guarantee", json=action, headers={"X-API-Key": ADMIN_KEY})
        if response.status_code != 200:
            raise RuntimeError(f"POST /v1/guarantee answered {response.status_code}: {response.text[:300]}")
        body: dict[str, Any] = response.json()
        return body

    def suspended(self) -> bool:
        return bool(self.operation()["current"]["state"] == "suspended")

    def run_until_suspended(self, films: Sequence[Film], prefix: str, batch: int) -> int | None:
        """Films scored and judged in batches of ``batch``; the films scored when the rule was found suspended
        (a multiple of ``batch``), or None if it never was."""
        for start in range(0, len(films), batch):
            chunk = films[start : start + batch]
            name = f"{prefix}-{start}"
            self.score(chunk, name)
            self.verdicts(chunk, name)
            if self.suspended():
                return start + len(chunk)
        return None


def settings_for(model: Path, work: Path, *, mode: str) -> Any:
    """The service's settings for a site: a fresh SQLite trail under ``work``, the three key roles, the watch
    refreshed on verdicts (and hourly), no drift check (the synthetic films are not what it is about)."""
    from service.settings import Settings

    return Settings(
        model_path=model,
        max_wait_ms=2.0,
        api_keys=[PREDICT_KEY],
        admin_api_keys=[ADMIN_KEY],
        outcome_api_keys=[OUTCOME_KEY],
        audit={"url": f"sqlite:///{work / 'audit.sqlite3'}", "spool_dir": work / "spool"},
        guarantee={"mode": mode, "refresh_s": 3600, "drift_every_s": 0},
    )


@contextmanager
def site_service(model: Path, work: Path, *, mode: str) -> Iterator[Site]:
    """A server on loopback (``bench.audit.server``) with a fresh trail, and a site client of it."""
    from bench.audit import server

    work.mkdir(parents=True, exist_ok=True)
    with server(settings_for(model, work, mode=mode), audited=True) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield Site(c)


# --- the method's expectation ---------------------------------------------------------------------------------


def expected_films_to_detection(
    before: dict[str, list[int]], per_film: dict[str, tuple[float, float]], *, limits: dict[str, float], delta: float
) -> int | None:
    """Films after the shift until the expected path crosses, for the earliest promise. ``before``: per promise
    (finding label or "study"), [films it counts, misses] from the shadow period; ``per_film``: per promise, the
    films it counts and the misses per film scored after the shift (their long-run rates); ``limits``: each
    promise's alpha. None if no promise's miss rate after the shift exceeds its alpha."""
    best: int | None = None
    for name, (trials_per_film, misses_per_film) in per_film.items():
        limit = limits[name]
        if trials_per_film == 0 or misses_per_film / trials_per_film <= limit:
            continue
        prior = promise_prior(limit)  # as the service watches it
        n0, k0 = before.get(name, [0, 0])
        films = 1
        while films < 100_000 and not exceeds(
            round(k0 + misses_per_film * films), round(n0 + trials_per_film * films), limit, delta, prior
        ):
            films += 1
        best = films if best is None else min(best, films)
    return best


# --- the bench ------------------------------------------------------------------------------------------------


def _shadow_then_autonomous(site: Site, films: Sequence[Film], prefix: str) -> None:
    answers = site.score(films, prefix)
    if not all(a["referral"]["refer"] and "shadow_mode" in a["referral"]["reasons"] for a in answers):
        raise AssertionError("shadow mode let a film through")
    site.verdicts(films, prefix)
    if site.suspended():
        raise AssertionError("the rule was suspended in the shadow period on films like its calibration films")
    site.act(action="set_mode", mode="autonomous", reason="shadow period clean: verdicts within the promise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--shadow", type=int, default=150, help="films in the shadow period")
    parser.add_argument("--shifted", type=int, default=600, help="at most this many films after the shift")
    parser.add_argument("--control", type=int, default=600, help="films at each unshifted control site")
    parser.add_argument("--contrast", type=float, default=0.45, help="the shifted films' contrast")
    parser.add_argument("--batch", type=int, default=10, help="films per batch of verdicts")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--prevalence", type=float, default=0.1, help="each finding's prevalence")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=0.1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="guarantee-site-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        model = build_site_model(
            work / "model-build",
            image_size=args.image_size,
            prevalence=args.prevalence,
            alpha=args.alpha,
            delta=args.delta,
        )
        rule = load_spec(model).referral
        assert rule is not None
        print(
            f"model trained and calibrated in {time.monotonic() - started:.0f} s; rule: alpha {rule.alpha}, study "
            f"alpha {rule.study_alpha}, delta {rule.delta}, expected referral {rule.expected_study_referral_rate:.2f}"
        )
        detections: list[int | None] = []
        befores: list[dict[str, list[int]]] = []
        pooled = {name: [0, 0] for name in (*PLANTED_FINDINGS, "study")}
        false_alarms = 0
        stops: list[str] = []
        for seed in range(args.seeds):
            shadow = site_films(args.shadow, 1000 + seed, image_size=args.image_size, prevalence=args.prevalence)
            shifted = site_films(
                args.shifted,
                2000 + seed,
                image_size=args.image_size,
                prevalence=args.prevalence,
                contrast=args.contrast,
            )
            with site_service(model, work / f"site-{seed}", mode="shadow") as site:
                _shadow_then_autonomous(site, shadow, "shadow")
                befores.append({name: list(c) for name, c in site.counts.items()})
                for c in site.counts.values():
                    c[:] = [0, 0]
                found = site.run_until_suspended(shifted, "shifted", args.batch)
                if found is not None:
                    stops.append(site.operation()["current"]["detail"][:100])
                    after = site.score(shifted[found:], "after")  # the rest: the true rates, and every one referred
                    assert all("guarantee_suspended" in a["referral"]["reasons"] for a in after)
                for name, (n, k) in site.counts.items():
                    pooled[name][0] += n
                    pooled[name][1] += k
            detections.append(found)
            control = site_films(args.control, 3000 + seed, image_size=args.image_size, prevalence=args.prevalence)
            with site_service(model, work / f"control-{seed}", mode="autonomous") as site:
                alarm = site.run_until_suspended(control, "control", args.batch * 5)
                false_alarms += alarm is not None
            print(
                f"seed {seed}: suspended after {found} shifted films; control site suspended: {alarm is not None} "
                f"({time.monotonic() - started:.0f} s)",
                flush=True,
            )
        print(
            f"\nafter the shift, pooled over {args.seeds} sites of {args.shifted} films (each site's films all scored):"
        )
        print(f"  {'promise':<28} {'misses / films':>15}  rate   limit")
        limits = {name: args.alpha for name in PLANTED_FINDINGS} | {"study": rule.study_alpha}
        for name, (n, k) in pooled.items():
            print(f"  {name:<28} {k:>6} / {n:<6}  {k / n if n else 0:.3f}  {limits[name]}")
        films_after = args.seeds * args.shifted
        per_film = {name: (n / films_after, k / films_after) for name, (n, k) in pooled.items()}
        expected = [expected_films_to_detection(b, per_film, limits=limits, delta=rule.delta) for b in befores]
        found_counts = [d for d in detections if d is not None]
        print(f"\nseeds {args.seeds}, contrast {args.contrast}, batches of {args.batch} films")
        print(f"shifted sites suspended: {len(found_counts)} / {args.seeds}")
        if found_counts:
            print(
                f"films to suspension: median {statistics.median(found_counts):.0f} "
                f"(min {min(found_counts)}, max {max(found_counts)})"
            )
        known = [e for e in expected if e is not None]
        if known:
            print(
                f"expected path's crossing: median {statistics.median(known):.0f} films "
                "(the counts above are whole batches)"
            )
        print(f"false alarms on unshifted sites: {false_alarms} / {args.seeds} (bound: delta = {args.delta})")
        print("what stopped the shifted sites:", *sorted(set(stops)), sep="\n  ")
        print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
