"""Command line of the training package: ``python -m train <command> ...``.

Each subcommand is one ``_add_<command>`` function that declares its arguments and sets ``handler``;
the handler imports what it needs when it runs, so a light command (``synth``) never pays for torch or
the data loaders, and ``--help`` is instant. To add a command (``fit``, ``evaluate``, ``calibrate``),
write its ``_add_...`` and ``_run_...`` pair and list the former in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeAlias, get_args

from train.config import DEMO_RECIPE, INIT_SOURCES, AmpMode, FitConfig, field_defaults

# The type of ``add_subparsers()``'s result is private to argparse; the alias keeps signatures readable.
_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _run_synth(args: argparse.Namespace) -> int:
    from train.synthetic import generate

    started = time.perf_counter()
    paths = generate(
        args.out,
        args.n,
        args.seed,
        image_size=args.image_size,
        valid_fraction=args.valid_fraction,
        prevalence=args.prevalence,
        progress=args.progress,
    )
    elapsed_s = time.perf_counter() - started
    print(
        f"synth: wrote {paths.n_train} train + {paths.n_valid} valid images of {args.image_size} px "
        f"to {paths.root} ({paths.train_csv.name}, {paths.valid_csv.name}) in {elapsed_s:.1f} s"
    )
    return 0


def _add_synth(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic dataset in CheXpert-v1.0-small's layout",
        description="Write a synthetic CheXpert-layout dataset (CSVs, PNG films, per-pixel label maps).",
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset directory (CSV paths start with its name)")
    parser.add_argument("--n", type=int, required=True, help="number of patients, one frontal image each")
    parser.add_argument("--seed", type=int, required=True, help="seed: the same seed writes the same bytes")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images in pixels")
    parser.add_argument("--valid-fraction", type=float, default=0.2, help="fraction of patients in valid.csv")
    parser.add_argument("--prevalence", type=float, default=0.3, help="probability that a finding is positive")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.set_defaults(handler=_run_synth)


# The FitConfig fields `fit` offers as options, with their help; each option's type and default come from
# FitConfig (train/config.py), the one place the training defaults are written.
_RECIPE_HELP: Final[dict[str, str]] = {
    "arch": "timm EfficientNet-family architecture",
    "init": "backbone weights: offline ImageNet Lite0, timm's pretrained weights from the Hub, or none",
    "epochs": "training epochs",
    "batch_size": "global batch size (split across ranks)",
    "lr": "peak AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup_epochs": "linear warmup before the cosine decay, in epochs",
    "freeze_epochs": "epochs training only the head first",
    "image_size": "side of the square model input in pixels",
    "dropout": "MC dropout rate",
    "mc_dropout_blocks": "also drop out after the last N blocks",
    "uncertain_policy": "chexpert | ones | zeros | ignore [,Label=policy]",
    "amp": "autocast: auto (bf16 or fp16 on CUDA, off on CPU), fp16, bf16 or off",
    "device": "auto, cpu, cuda or cuda:N",
    "workers": "data loader worker processes",
    "seed": "seed of the patient split, the initialisation, the shuffling and the augmentation",
    "max_train_samples": "subsample the train set for quick runs",
    "patience": "early stopping patience in epochs",
    "name": "model name written into the spec",
    "version": "model version written into the spec",
}
# The options `crossfit` offers for the recipe of each fold's model.
_CROSSFIT_RECIPE: Final = (
    "arch",
    "init",
    "epochs",
    "batch_size",
    "lr",
    "freeze_epochs",
    "image_size",
    "dropout",
    "mc_dropout_blocks",
    "patience",
    "workers",
)
_CHOICES: Final[dict[str, Sequence[str]]] = {"init": INIT_SOURCES, "amp": get_args(AmpMode)}


#: ``fit --recipe``: the defaults each recipe gives the options not set on the command line.
RECIPES: Final[dict[str, Mapping[str, Any]]] = {"default": {}, "demo": DEMO_RECIPE}


def _add_recipe_options(
    parser: argparse.ArgumentParser, names: Sequence[str], defaults: Mapping[str, Any], *, recipes: bool = False
) -> None:
    """One ``--option`` per FitConfig field in ``names``, its type and default taken from ``defaults``. With
    ``recipes``, a field that the demo recipe sets defaults to None on the parser and is filled by
    :func:`fit_config` from the recipe ``--recipe`` names (its help shows both values)."""
    for name in names:
        default = defaults[name]
        shown = "" if default is None else " (default: %(default)s)"
        if recipes and name in DEMO_RECIPE:
            shown = f" (default: {default}; {DEMO_RECIPE[name]} with --recipe demo)"
        options: dict[str, Any] = {
            "default": None if recipes and name in DEMO_RECIPE else default,
            "help": _RECIPE_HELP[name] + shown,
        }
        if name in _CHOICES:
            options["choices"] = _CHOICES[name]
        else:
            options["type"] = int if name == "max_train_samples" else type(default)
        parser.add_argument("--" + name.replace("_", "-"), **options)


def fit_config(args: argparse.Namespace) -> FitConfig:
    """The FitConfig of a parsed ``fit`` command line: its options, the rest from ``--recipe``'s defaults."""
    defaults = {**field_defaults(), **RECIPES[args.recipe]}
    recipe = {name: getattr(args, name) for name in _RECIPE_HELP}
    recipe.update({name: defaults[name] for name in DEMO_RECIPE if recipe[name] is None})
    paths = {"train_csv": args.train, "valid_csv": args.valid, "out": args.out}
    return FitConfig(**paths, **recipe, resume=args.resume, progress=not args.no_progress)


def _run_fit(args: argparse.Namespace) -> int:
    import logging

    from bayesnet import tune_allocator
    from train.fit import fit

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tune_allocator()
    result = fit(fit_config(args))
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(
        f"fit: best valid mean AUC {result.best_auc:.4f} at epoch {result.best_epoch}; checkpoint {args.out / 'best'}"
    )
    return 0


def _add_fit(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="train a model on CheXpert-layout CSVs (torchrun for several GPUs/nodes)",
        description="Train the Bayesian EfficientNet. Multi-GPU: torchrun --nproc_per_node N -m train fit ...",
    )
    parser.add_argument(
        "--train", type=Path, required=True, help="CheXpert-layout train.csv, or hf://owner/name:split on the Hub"
    )
    parser.add_argument(
        "--valid", type=Path, default=None, help="valid.csv or hf://owner/name:split (default: a patient split)"
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory: checkpoints, history, state")
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="default",
        help="default: FitConfig's defaults (train/config.py); demo: the shipped demo model's (DEMO_RECIPE). "
        "Options given on the command line win (default: %(default)s)",
    )
    _add_recipe_options(parser, list(_RECIPE_HELP), field_defaults(), recipes=True)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/training_state.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_run_fit)


def _run_evaluate(args: argparse.Namespace) -> int:
    from train.evaluate import evaluate

    metrics = evaluate(args.checkpoint, args.data, args.out, mc_samples=args.mc_samples, n_boot=args.bootstrap)
    print(
        f"evaluate: mean AUC {metrics['mean_auc_mc']:.3f} (MC) / {metrics['mean_auc_det']:.3f} (det), "
        f"mean ECE {metrics['mean_ece_before']:.3f} -> {metrics['mean_ece_after']:.3f}; report {args.out / 'report.md'}"
    )
    return 0


def _add_evaluate(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="AUC with CIs, calibration, referral curves, report.md")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="CheXpert-layout CSV")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--mc-samples", type=int, default=20)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.set_defaults(handler=_run_evaluate)


def crossfit_recipe(args: argparse.Namespace) -> FitConfig:
    """The FitConfig each fold of a parsed ``crossfit`` command line trains with (its CSVs and seed replaced)."""
    recipe = {name: getattr(args, name) for name in _CROSSFIT_RECIPE}
    return FitConfig(train_csv=args.data[0], out=args.out, progress=False, **recipe)


def _run_crossfit(args: argparse.Namespace) -> int:
    import logging

    from bayesnet import tune_allocator
    from train.crossfit import crossfit

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tune_allocator()
    path = crossfit(
        args.data,
        args.out,
        crossfit_recipe(args),
        folds=args.folds,
        seed=args.seed,
        mc_samples=args.mc_samples,
        ensemble=args.ensemble,
        tta=args.tta,
    )
    print(f"crossfit: out-of-fold predictions of every film in {path}")
    return 0


def _add_crossfit(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "crossfit",
        help="K-fold out-of-fold predictions (MC, deterministic, ensemble heads, TTA) for every film",
        description="Pool the films of the CSVs, train one model per fold on the others (inner 15%% patient split for "
        "early stopping, temperature and thresholds) and record every estimator's predictions on the held-out fold. "
        "Each fold trains the demo model's recipe unless told otherwise (train/config.py DEMO_RECIPE).",
    )
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="CheXpert-layout CSVs to pool")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mc-samples", type=int, default=20)
    parser.add_argument("--ensemble", type=int, default=5, help="linear heads refitted on the frozen trunk")
    parser.add_argument("--tta", type=int, default=4, help="test-time augmentation passes")
    _add_recipe_options(parser, _CROSSFIT_RECIPE, {**field_defaults(), **DEMO_RECIPE})
    parser.set_defaults(handler=_run_crossfit)


def _run_study(args: argparse.Namespace) -> int:
    from train.uncertainty_study import run_study

    levels = [(a, a, args.delta, args.alpha_positive, score) for a in args.alpha for score in args.referral_score]
    variants = dict(item.split("=", 1) for item in args.variant)
    study = run_study(args.cv, args.out, levels=levels, variants={k: Path(v) for k, v in variants.items()})
    if args.card is not None:
        from train.card import with_section
        from train.uncertainty_study import CARD_HEADING, card_section

        args.card.write_text(with_section(args.card.read_text(), CARD_HEADING, card_section(study)))
    print((args.out / "study.md").read_text())
    return 0


def _add_study(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "study",
        help="estimator comparison and nested referral check from crossfit's out-of-fold predictions",
        description="Read OUT/oof.npz of `python -m train crossfit` and write study.json and study.md.",
    )
    parser.add_argument("--cv", type=Path, required=True, help="the crossfit output directory")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another crossfit directory (same films and folds, another recipe) to compare, e.g. last_stage=runs/cv2",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.1, 0.2], help="alpha = study_alpha levels")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--alpha-positive", type=float, default=0.1)
    parser.add_argument(
        "--card", type=Path, default=None, help="MODEL_CARD.md to write the cross-validated section into"
    )
    parser.add_argument("--referral-score", nargs="+", choices=("mean", "interval"), default=["mean", "interval"])
    parser.set_defaults(handler=_run_study)


def _run_calibrate(args: argparse.Namespace) -> int:
    import json
    import logging

    from bayesnet import tune_allocator
    from train.calibrate import calibrate_checkpoint, tradeoff_table
    from train.conformal import ReferralInputError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    if args.from_audit is not None:
        return _run_calibrate_from_audit(args)
    if args.from_archive is not None:
        return _run_calibrate_from_archive(args)
    if args.labels is not None:
        print("calibrate: --labels goes with --from-archive", file=sys.stderr)
        return 2
    tune_allocator()
    try:
        spec = calibrate_checkpoint(
            args.checkpoint,
            args.data,
            out=args.out,
            mc_samples=args.mc_samples,
            referral=args.referral,
            alpha=args.alpha,
            delta=args.delta,
            study_alpha=args.study_alpha,
            alpha_positive=args.alpha_positive,
            referral_score=args.referral_score,
        )
    except ReferralInputError as err:
        print(f"calibrate: {err}", file=sys.stderr)
        return 2
    target = args.out or args.checkpoint
    if spec.referral is not None:
        report = json.loads((target / "referral_report.json").read_text())
        print(tradeoff_table(report["tradeoff"], spec.referral))
        print(f"trade-off plot: {target / 'referral_tradeoff.png'}")
    print(f"calibrate: spec {spec.name} {spec.version} written to {target}")
    return 0


def _refit(args: argparse.Namespace, refit: Callable[..., Any], source: Callable[[], Any]) -> int:
    """``refit(checkpoint, source(), out=..., levels...)``, the refitted rule in words, 2 on an input it refuses."""
    from bayesnet.referral import describe
    from train.conformal import ReferralInputError
    from train.from_archive import AuditInputError
    from train.from_audit import TrailError

    try:
        spec = refit(
            args.checkpoint,
            *source(),
            out=args.out,
            alpha=args.alpha,
            delta=args.delta,
            study_alpha=args.study_alpha,
            alpha_positive=args.alpha_positive,
            score=args.referral_score,
        )
    except (TrailError, AuditInputError, ReferralInputError) as err:
        print(f"calibrate: {err}", file=sys.stderr)
        return 2
    assert spec.referral is not None
    print(describe(spec.referral))
    print(f"calibrate: spec {spec.name} {spec.version} written to {args.out or args.checkpoint}")
    return 0


def _run_calibrate_from_audit(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from train.from_audit import calibrate_from_trail

    since = None
    if args.since is not None:
        try:
            since = datetime.fromisoformat(args.since)
        except ValueError:
            print(f"calibrate: --since {args.since!r} is not an ISO date (2026-11-01 or 2026-11-01T08:00:00Z)")
            return 2
        since = since if since.tzinfo is not None else since.replace(tzinfo=timezone.utc)
    return _refit(args, partial(calibrate_from_trail, since=since), lambda: (args.from_audit,))


def _run_calibrate_from_archive(args: argparse.Namespace) -> int:
    from train.from_archive import calibrate_from_archive, read_site_labels

    if args.labels is None:
        print("calibrate: --from-archive needs --labels (the radiologists' verdicts on the run's films)")
        return 2
    return _refit(args, calibrate_from_archive, lambda: (args.from_archive, read_site_labels(args.labels, args.codes)))


def _add_calibrate(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="fit temperature, thresholds and the referral rule (also: recalibrate for a site)",
        description="Fit per-label temperature and thresholds, and the risk-controlled referral rule, on held-out "
        "labelled films; writes a new spec version (weights untouched). A site recalibrates the shipped model on a "
        "few hundred of its own labelled films with --data site.csv --out models/site.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    films = parser.add_mutually_exclusive_group(required=True)
    films.add_argument("--data", type=Path, help="held-out CheXpert-layout CSV with labels")
    films.add_argument(
        "--from-audit",
        metavar="URL",
        help="refit only the referral rule on the site's scored films with radiologists' verdicts, from the audit "
        "trail at URL (stored scores, no images; docs/guarantee.md)",
    )
    films.add_argument(
        "--from-archive",
        metavar="PARQUET",
        type=Path,
        help="refit only the referral rule on an archive run's films (its results.parquet, stored scores) with the "
        "radiologists' verdicts in --labels (train/from_archive.py)",
    )
    parser.add_argument("--since", default=None, help="with --from-audit: only films scored since this ISO date")
    _add_labels_options(parser)
    parser.add_argument("--out", type=Path, default=None, help="write here instead of updating the checkpoint")
    parser.add_argument("--mc-samples", type=int, default=20)
    parser.add_argument(
        "--referral",
        choices=("conformal", "disagreement"),
        default="conformal",
        help="conformal: risk-controlled triage with guarantees (default); disagreement: the older MC rule",
    )
    parser.add_argument("--alpha", type=float, default=0.1, help="per finding: max fraction of positives cleared")
    parser.add_argument(
        "--study-alpha", type=float, default=0.1, help="per film: max fraction of abnormal films cleared as normal"
    )
    parser.add_argument("--delta", type=float, default=0.1, help="the guarantees hold with probability 1 - delta")
    parser.add_argument(
        "--alpha-positive",
        type=float,
        default=0.1,
        help="per finding: max fraction of negative films called positive",
    )
    parser.add_argument(
        "--referral-score",
        choices=("mean", "interval"),
        default="mean",
        help="mean: threshold the MC mean; interval: clear only when the 95th MC percentile is below the threshold",
    )
    parser.set_defaults(handler=_run_calibrate)


def _add_labels_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="the radiologists' verdicts: a CheXpert-layout CSV (matched on the run's paths) or an outcomes file "
        "(CSV/NDJSON, FHIR Bundle, HL7 v2; matched on request id, SOP or study instance UID)",
    )
    parser.add_argument("--codes", type=Path, default=None, help="the site's code map for an outcomes file's codes")


def _run_audit(args: argparse.Namespace) -> int:
    import json

    from service.archive.report import write_report
    from train.from_archive import (
        AuditInputError,
        audit,
        audit_markdown,
        auroc_plot,
        films_from_archive,
        read_site_labels,
        run_model_spec,
    )

    try:
        labels = read_site_labels(args.labels, args.codes)
        films = films_from_archive(args.results, labels)
        spec = None if args.checkpoint is None else run_model_spec(films, args.checkpoint, args.results)
    except AuditInputError as err:
        print(f"audit: {err}", file=sys.stderr)
        return 2
    result = audit(
        films,
        spec=spec,
        alpha=args.alpha,
        delta=args.delta,
        study_alpha=args.study_alpha,
        alpha_positive=args.alpha_positive,
        score=args.referral_score,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    plot = auroc_plot(result, args.out)
    section = audit_markdown(result, labels.source, [plot] if plot else [])
    report = write_report(args.results, args.out, args.inventory, sections=[section])
    (args.out / "audit.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    for problem in labels.problems[:10]:
        print(f"audit: labels {problem}", file=sys.stderr)
    films_part = result["films"]["abnormal_among_cleared"]
    print(
        f"audit: {result['films']['n']} films with verdicts; cleared {result['films']['cleared']}, of which "
        f"{films_part['count']} with a finding; report {report}"
    )
    return 0


def _add_audit(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="the retrospective audit: an archive run against the radiologists' labels (report.md, audit.json)",
        description="Per-finding AUROC with bootstrap intervals, the miss rate among films the run would have "
        "cleared with an exact upper bound, and what calibrate would fit on these films, appended to the archive "
        "run's report (python -m service.archive.report).",
    )
    parser.add_argument("--results", type=Path, required=True, help="the run's results.parquet")
    parser.add_argument("--inventory", type=Path, default=None, help="a PACS run's inventory CSV")
    parser.add_argument("--checkpoint", type=Path, default=None, help="the run's model: adds what calibrate would fit")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md, audit.json and plots")
    _add_labels_options(parser)
    parser.add_argument("--alpha", type=float, default=0.1, help="for the fit: max fraction of positives cleared")
    parser.add_argument("--study-alpha", type=float, default=0.1, help="for the fit: max abnormal films cleared")
    parser.add_argument("--delta", type=float, default=0.1, help="for the fit: the bounds hold w.p. 1 - delta")
    parser.add_argument("--alpha-positive", type=float, default=0.1)
    parser.add_argument(
        "--referral-score", choices=("mean", "interval"), default=None, help="for the fit (default: the model's)"
    )
    parser.set_defaults(handler=_run_audit)


def _run_export(args: argparse.Namespace) -> int:
    from train.card import export

    out = export(
        args.checkpoint,
        args.report,
        args.out,
        data_notes=args.data_notes.read_text() if args.data_notes else "See the training run.",
        training_notes=args.training_notes.read_text() if args.training_notes else "See the training run.",
    )
    print(f"export: half-precision checkpoint and MODEL_CARD.md in {out}")
    return 0


def _add_export(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser("export", help="half-precision copy + MODEL_CARD.md (e.g. for models/demo)")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True, help="directory with the evaluation's metrics.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-notes", type=Path, default=None, help="Markdown file: data provenance")
    parser.add_argument("--training-notes", type=Path, default=None, help="Markdown file: what was tried")
    parser.set_defaults(handler=_run_export)


def _run_ood(args: argparse.Namespace) -> int:
    import logging

    from train.ood import GateRecipe, fit_ood, fold_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    recipe = GateRecipe(
        dims=args.dims,
        kind=args.score,
        feature_map=args.features,
        crops=args.crops,
        quantile=args.quantile,
        margin=args.margin,
        folds=args.folds,
    )
    report = fit_ood(
        args.checkpoint,
        args.train,
        args.valid,
        films=args.films,
        checks=args.check,
        out=args.out,
        recipe=recipe,
        max_train_samples=args.max_train_samples,
        compare=not args.no_compare,
        write=not args.dry_run,
    )
    print(fold_table(report))
    held_out = report["validation"]["held_out_flagged_total"]
    where = "not written (--dry-run)" if args.dry_run else f"gate in {args.out or args.checkpoint}"
    print(
        f"ood: threshold {report['threshold']:.4f}; held-out chest films flagged {held_out[0]}/{held_out[1]}, "
        f"AUROC {report['auroc']:.3f} against {report['n_outliers']} non-chest images "
        f"({100 * report['outliers_flagged']:.0f}% flagged by the shipped gate); {where}"
    )
    return 0


def _add_ood(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "ood",
        help="fit and validate the out-of-distribution gate of a checkpoint (weights untouched)",
        description="Validate the OOD gate's recipe in folds grouped by patient (and with each source left out), "
        "print the table, then fit the gate on every reference film and record it in the checkpoint and its card.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True, help="CheXpert-layout CSV of reference films")
    parser.add_argument("--valid", type=Path, default=None, help="another CheXpert-layout CSV of reference films")
    parser.add_argument(
        "--films",
        type=Path,
        action="append",
        default=[],
        help="folder of reference films with a labels.csv (file, patientid), e.g. other-sites; repeatable",
    )
    parser.add_argument(
        "--check", type=Path, action="append", default=[], help="a chest film never fitted, reported; repeatable"
    )
    parser.add_argument("--out", type=Path, default=None, help="write a gated copy here instead of in place")
    parser.add_argument("--dims", type=int, default=32, help="principal subspace dimension")
    parser.add_argument("--score", choices=["residual", "subspace", "combined"], default="residual")
    parser.add_argument("--features", choices=["hellinger", "none"], default="hellinger", help="feature map")
    parser.add_argument("--crops", type=int, default=1, help="random field-of-view crops per film added to the fit")
    parser.add_argument("--quantile", type=float, default=0.99, help="cross-fitted score quantile used as threshold")
    parser.add_argument("--margin", type=float, default=1.0, help="threshold = margin x that quantile")
    parser.add_argument("--folds", type=int, default=5, help="grouped folds (validation and threshold)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="subsample --train for quick runs")
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison with other recipes")
    parser.add_argument("--dry-run", action="store_true", help="print the validation, write nothing")
    parser.set_defaults(handler=_run_ood)


_COMMANDS: tuple[Callable[[_Subparsers], None], ...] = (
    _add_synth,
    _add_fit,
    _add_evaluate,
    _add_calibrate,
    _add_audit,
    _add_crossfit,
    _add_study,
    _add_export,
    _add_ood,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m train`` parser with one subparser per entry of ``_COMMANDS``."""
    parser = argparse.ArgumentParser(prog="python -m train", description="Train, evaluate and calibrate models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen subcommand and return its exit status."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
