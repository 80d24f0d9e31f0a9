"""K-fold cross-fitting: out-of-fold predictions of every film, for estimator comparison and referral calibration.

``python -m train crossfit --data train.csv valid.csv --folds 5 --out runs/cv`` pools the films of the CSVs, deals
them into K folds by patient (seeded), and for each fold trains a model on the other K - 1 folds with the given
recipe. Inside those, a seeded 15% patient split is the model's own validation set: early stopping, temperature
and Youden thresholds are fitted there, exactly as ``make demo-model`` does with ``valid.csv``. The held-out fold is
touched once, to record predictions, so every film gets a prediction from a model that never saw it:

* ``det_logits`` ``(N, K)``: one deterministic pass (dropout off), the baseline;
* ``mc_logits`` ``(T, N, K)``: T MC-dropout samples (the trunk runs once);
* ``ensemble_logits`` ``(M, N, K)``: M linear heads refitted on the frozen pooled features of the fold's training
  films, each on a bootstrap resample with its own seed (a deep-ensemble-style estimator that shares the trunk);
* ``tta_logits`` ``(A, N, K)``: deterministic passes over A seeded mild augmentations (test-time augmentation);
* per film the fold's temperature ``(N, K)`` and thresholds ``(N, K)``, and per estimator the measured seconds.

Everything lands in ``OUT/oof.npz`` (plus each fold's checkpoint); :mod:`train.uncertainty_study` turns it into the
comparison table and the cross-validated referral numbers. Costs K trainings of the recipe, by default the demo
model's (:data:`train.config.DEMO_RECIPE`).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from numpy.typing import NDArray

from bayesnet import BayesianEfficientNet, ModelSpec, decode_image, load_checkpoint
from bayesnet.mc import mc_logits
from train.calibrate import fit_temperature, fit_thresholds
from train.chexpert_csv import PATH_COLUMN, parse_patient_id
from train.config import FitConfig
from train.fit import fit, masked_bce
from train.predict import collect, sigmoid

log = logging.getLogger(__name__)

INNER_VALID_FRACTION: Final = 0.15
ENSEMBLE_EPOCHS: Final = 200


def _read_rows(csvs: Sequence[Path]) -> tuple[list[str], list[dict[str, str]]]:
    """All rows of the CSVs, with ``Path`` made absolute (resolved as :func:`train.data.load_chexpert` does)."""
    header: list[str] = []
    rows: list[dict[str, str]] = []
    for path in csvs:
        path = path.resolve()
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            for name in reader.fieldnames or []:
                if name not in header:
                    header.append(name)
            for row in reader:
                row[PATH_COLUMN] = str(path.parent.parent / row[PATH_COLUMN])
                rows.append(row)
    if not rows:
        raise ValueError(f"no rows in {[str(p) for p in csvs]}")
    return header, rows


def _write_rows(path: Path, header: Sequence[str], rows: Sequence[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(header), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def patient_folds(rows: Sequence[dict[str, str]], folds: int, seed: int) -> NDArray[np.int64]:
    """Fold index ``(N,)`` per row; all rows of a patient share a fold; folds differ in size by at most one patient."""
    patients = sorted({parse_patient_id(row[PATH_COLUMN]) for row in rows})
    if len(patients) < folds:
        raise ValueError(f"{folds} folds need at least {folds} patients, got {len(patients)}")
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[i]: rank % folds for rank, i in enumerate(order.tolist())}
    return np.array([fold_of[parse_patient_id(row[PATH_COLUMN])] for row in rows], dtype=np.int64)


def _pooled(model: BayesianEfficientNet, x: torch.Tensor) -> torch.Tensor:
    return model.pool(model.forward_features(x))


def _features(model: BayesianEfficientNet, spec: ModelSpec, csv_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled final features ``(N, F)`` and targets ``(N, 14)`` of a CSV's films (eval mode, no dropout)."""
    from train.data import load_chexpert
    from train.loader import make_loader

    loader = make_loader(load_chexpert(csv_path), spec, train=False, batch_size=16, workers=0)
    feats, ys = [], []
    with torch.inference_mode():
        for x, y in loader:
            feats.append(_pooled(model, x))
            ys.append(y)
    return torch.cat(feats), torch.cat(ys)


def _fit_heads(
    model: BayesianEfficientNet, features: torch.Tensor, targets: torch.Tensor, members: int, seed: int
) -> list[torch.nn.Linear]:
    """M linear heads on frozen features, each from the trained head plus a bootstrap refit with its own seed."""
    heads = []
    n = features.shape[0]
    for m in range(members):
        generator = torch.Generator().manual_seed(seed * 1000 + m)
        rows = torch.randint(0, n, (n,), generator=generator)
        head = torch.nn.Linear(features.shape[1], targets.shape[1])
        with torch.no_grad():
            head.weight.copy_(model.classifier.weight + 0.01 * torch.randn(head.weight.shape, generator=generator))
            head.bias.copy_(model.classifier.bias)
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-3)
        x, y = features[rows], targets[rows]
        for _ in range(ENSEMBLE_EPOCHS):
            optimizer.zero_grad()
            masked_bce(head(x), y).backward()
            optimizer.step()
        heads.append(head.eval())
    return heads


def _heldout(
    model: BayesianEfficientNet,
    spec: ModelSpec,
    csv_path: Path,
    heads: Sequence[torch.nn.Linear],
    *,
    mc_samples: int,
    tta: int,
    seed: int,
) -> dict[str, Any]:
    """Every estimator's logits on the held-out films, with the seconds each took per film."""
    from train.data import load_chexpert
    from train.loader import Augment, RadiographTransform, make_loader

    ds = load_chexpert(csv_path)
    loader = make_loader(ds, spec, train=False, batch_size=16, workers=0)
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {"y": [], "det": [], "mc": [], "ens": []}
    seconds = {"trunk": 0.0, "det": 0.0, "mc": 0.0, "ens": 0.0, "tta": 0.0}
    with torch.inference_mode():
        for x, y in loader:
            started = time.perf_counter()
            trunk = model.forward_trunk(x)
            seconds["trunk"] += time.perf_counter() - started
            started = time.perf_counter()
            out["det"].append(model.forward_stochastic(trunk))
            seconds["det"] += time.perf_counter() - started
            started = time.perf_counter()
            out["mc"].append(mc_logits(model, trunk, mc_samples, generator=generator))
            seconds["mc"] += time.perf_counter() - started
            pooled = model.trunk_features(trunk) if model.head_only else _pooled(model, x)
            started = time.perf_counter()
            members = [head(pooled) for head in heads]
            out["ens"].append(torch.stack(members) if members else pooled.new_zeros((0, x.shape[0], y.shape[1])))
            seconds["ens"] += time.perf_counter() - started
            out["y"].append(y)
        tta_logits = []
        transform = RadiographTransform(spec, train=True, augment=Augment())
        started = time.perf_counter()
        films = [decode_image(Path(item["image"]["path"]).read_bytes()).pixels for item in ds] if tta else []
        for a in range(tta):
            rows = [transform(pixels, rng=np.random.default_rng([seed, a, i])) for i, pixels in enumerate(films)]
            batch = torch.stack(rows)
            tta_logits.append(torch.cat([model(chunk) for chunk in batch.split(16)]))
        seconds["tta"] = time.perf_counter() - started
    n = len(ds)
    return {
        "y": torch.cat(out["y"]).numpy().astype(np.float64),
        "det": torch.cat(out["det"]).numpy().astype(np.float64),
        "mc": torch.cat(out["mc"], dim=1).numpy().astype(np.float64),
        "ens": torch.cat(out["ens"], dim=1).numpy().astype(np.float64),
        "tta": torch.stack(tta_logits).numpy().astype(np.float64) if tta_logits else np.zeros((0, n, 14)),
        "seconds_per_film": {k: v / max(1, n) for k, v in seconds.items()},
    }


def crossfit(
    csvs: Sequence[Path],
    out: Path,
    recipe: FitConfig,
    *,
    folds: int = 5,
    seed: int = 0,
    mc_samples: int = 20,
    ensemble: int = 5,
    tta: int = 4,
) -> Path:
    """Train ``folds`` models with ``recipe`` (its csv/out fields replaced) and write ``out/oof.npz``."""
    header, rows = _read_rows(csvs)
    fold_of = patient_folds(rows, folds, seed)
    n = len(rows)
    arrays: dict[str, NDArray[np.float64]] = {}
    timing: list[dict[str, float]] = []
    order: list[int] = []
    for k in range(folds):
        fold_dir = out / f"fold{k}"
        held = [i for i in range(n) if fold_of[i] == k]
        rest = [rows[i] for i in range(n) if fold_of[i] != k]
        inner = patient_folds(rest, round(1 / INNER_VALID_FRACTION), seed + 1 + k)
        heldout_csv = _write_rows(fold_dir / "heldout.csv", header, [rows[i] for i in held])
        train_csv = _write_rows(fold_dir / "train.csv", header, [r for r, f in zip(rest, inner, strict=True) if f != 0])
        valid_csv = _write_rows(fold_dir / "valid.csv", header, [r for r, f in zip(rest, inner, strict=True) if f == 0])
        best = fold_dir / "run" / "best"
        if not (best / "model.json").is_file():
            log.info("fold %d/%d: training on %d films", k + 1, folds, len(rest))
            fit(replace(recipe, train_csv=train_csv, valid_csv=valid_csv, out=fold_dir / "run", seed=seed + k))
        model, spec = load_checkpoint(best)

        inner_preds = collect(model, spec, valid_csv, policy=recipe.uncertain_policy, mc_samples=mc_samples, seed=seed)
        temperature = fit_temperature(inner_preds.mc_logits, inner_preds.y)
        thresholds = fit_thresholds(inner_preds.y, sigmoid(inner_preds.mc_logits / temperature).mean(axis=0))
        features, targets = _features(model, spec, train_csv)
        heads = _fit_heads(model, features, targets, ensemble, seed + k)
        result = _heldout(model, spec, heldout_csv, heads, mc_samples=mc_samples, tta=tta, seed=seed + k)
        untrained = [i for i, label in enumerate(spec.labels) if label not in spec.trained_labels]
        result["y"][:, untrained] = np.nan
        for name, value in (
            ("y", result["y"]),
            ("det_logits", result["det"]),
            ("mc_logits", result["mc"]),
            ("ensemble_logits", result["ens"]),
            ("tta_logits", result["tta"]),
            ("temperature", np.broadcast_to(temperature, result["det"].shape)),
            ("threshold", np.broadcast_to(thresholds, result["det"].shape)),
            ("fold", np.full(len(held), k, dtype=np.float64)),
        ):
            axis = 1 if value.ndim == 3 else 0
            arrays[name] = value if name not in arrays else np.concatenate([arrays[name], value], axis=axis)
        timing.append(result["seconds_per_film"])
        order.extend(held)
        log.info("fold %d/%d done: %d held-out films", k + 1, folds, len(held))
    np.savez_compressed(out / "oof.npz", **arrays, row=np.array(order), labels=np.array(spec.labels))
    (out / "crossfit.json").write_text(
        json.dumps(
            {
                "csvs": [str(p) for p in csvs],
                "folds": folds,
                "seed": seed,
                "mc_samples": mc_samples,
                "ensemble": ensemble,
                "tta": tta,
                "n_films": n,
                "recipe": json.loads(recipe.to_json()),
                "seconds_per_film": timing,
                "trained_labels": list(spec.trained_labels),
            },
            indent=2,
        )
        + "\n"
    )
    return out / "oof.npz"
