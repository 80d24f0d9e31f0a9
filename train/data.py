"""Training data as Hugging Face ``Dataset``s: CheXpert-layout CSVs or Hub datasets, patient splits, label rates.

The path of one training image is the serving path with augmentation in the middle: file bytes ->
:func:`bayesnet.decode_image` (the decoder the service uses) -> :func:`bayesnet.preprocess.to_square` ->
:class:`train.loader.Augment` (train only) -> :func:`bayesnet.preprocess.normalise`. This module builds the
datasets (the CSV side, label codes and uncertain-label policies, is :mod:`train.chexpert_csv`); the torch
side, transforms and seeded loaders, is :mod:`train.loader`.

Reproducibility: subsampling and patient splits are seeded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, cast

import datasets
import numpy as np
import numpy.typing as npt
import pyarrow.compute as pc

from bayesnet.labels import CHEXPERT_LABELS
from train.chexpert_csv import (
    FRONTAL_COLUMN,
    PATH_COLUMN,
    VIEW_COLUMN,
    UncertainPolicy,
    code_labels,
    full_policy,
    parse_patient_id,
    read_csv_columns,
    select_rows,
)

__all__ = [
    "DESCRIPTION_FORMAT",
    "FEATURES",
    "dataset_annotated_labels",
    "dataset_uncertain_policy",
    "labels_array",
    "load_chexpert",
    "load_chexpert_hub",
    "patient_split",
    "positive_rates",
]

#: Format tag of the JSON that :func:`load_chexpert` stores in ``Dataset.info.description``.
DESCRIPTION_FORMAT: Final = "train.data/1"

#: The features of every dataset built here; ``labels`` is in ``CHEXPERT_LABELS`` order, NaN = unknown.
FEATURES: Final = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "path": datasets.Value("string"),
        "patient_id": datasets.Value("string"),
        "labels": datasets.Sequence(datasets.Value("float32"), length=len(CHEXPERT_LABELS)),
    }
)


def _description(
    source: str,
    annotated: Sequence[str],
    policy: Mapping[str, UncertainPolicy],
    *,
    frontal_only: bool,
    views: Sequence[str] | None,
    max_samples: int | None,
    seed: int,
) -> str:
    return json.dumps(
        {
            "format": DESCRIPTION_FORMAT,
            "source": source,
            "annotated_labels": list(annotated),
            "uncertain_policy": dict(policy),
            "frontal_only": frontal_only,
            "views": None if views is None else list(views),
            "max_samples": max_samples,
            "seed": seed,
        }
    )


def _stored_description(ds: datasets.Dataset) -> dict[str, Any] | None:
    """The JSON :func:`load_chexpert` stored in ``ds.info.description``, or None for other datasets."""
    text = ds.info.description or ""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("format") != DESCRIPTION_FORMAT:
        return None
    return data


def dataset_annotated_labels(ds: datasets.Dataset) -> tuple[str, ...]:
    """The labels ``ds`` annotates, in ``CHEXPERT_LABELS`` order (what a model trained on it has learnt).

    Read from the description :func:`load_chexpert` stores; for any other dataset, the labels that have at
    least one non-NaN target.
    """
    stored = _stored_description(ds)
    if stored is not None:
        return tuple(lb for lb in CHEXPERT_LABELS if lb in stored["annotated_labels"])
    known = [not np.isnan(column).all() for column in labels_array(ds).T]
    return tuple(lb for lb, k in zip(CHEXPERT_LABELS, known, strict=True) if k)


def dataset_uncertain_policy(ds: datasets.Dataset) -> dict[str, UncertainPolicy] | None:
    """The uncertain-label policy ``ds`` was built with, or None when it was not built by this module."""
    stored = _stored_description(ds)
    if stored is None:
        return None
    return {lb: cast(UncertainPolicy, name) for lb, name in stored["uncertain_policy"].items()}


# --- loading --------------------------------------------------------------------------------------


def load_chexpert(
    csv_path: Path,
    *,
    policy: Mapping[str, UncertainPolicy] | None = None,
    frontal_only: bool = True,
    views: Sequence[str] | None = ("AP", "PA"),
    max_samples: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """Read a CheXpert-layout CSV (``train.csv`` / ``valid.csv``) into a ``datasets.Dataset``.

    Image paths: the ``Path`` column is relative to the dataset root's parent, as in CheXpert-v1.0-small
    (``CheXpert-v1.0-small/train/patient00001/...`` beside ``CheXpert-v1.0-small/train.csv``), so each
    file is ``csv_path.parent.parent / Path``. Labels: 1 / 0 / -1 / blank (= 0), with -1 mapped per label
    by ``policy`` (None: :func:`parse_uncertain_policy` ``("chexpert")``; labels missing from a mapping
    keep that default); a label column absent from the CSV gives NaN for every row.

    Filters: when the columns exist, ``Frontal/Lateral == "Frontal"`` (if ``frontal_only``) and ``AP/PA``
    in ``views`` (None: any view; rows with a missing view are dropped). Then ``max_samples`` rows are
    drawn without replacement with ``seed`` (CSV order kept). Only the kept images must exist.

    Returns columns ``image`` (``Image(decode=False)`` holding the absolute path: decoded lazily, by
    :func:`bayesnet.decode_image`), ``path`` (as in the CSV), ``patient_id`` (see
    :func:`parse_patient_id`) and ``labels`` (float32 ``(14,)``, ``CHEXPERT_LABELS`` order, NaN = unknown).
    ``info.description`` holds JSON with the annotated labels and the policy: read it with
    :func:`dataset_annotated_labels` and :func:`dataset_uncertain_policy`.

    Raises:
        FileNotFoundError: the CSV, or an image it lists, is missing (names the first missing file and the
            root paths are resolved against).
        ValueError: no ``Path`` column, a malformed label value, an invalid policy, or no rows left.
    """
    csv_path = Path(os.path.abspath(csv_path))
    if not csv_path.is_file():
        raise FileNotFoundError(f"CheXpert CSV {csv_path} does not exist")
    policy_full = full_policy(policy)
    columns = read_csv_columns(csv_path)
    if PATH_COLUMN not in columns:
        raise ValueError(f"{csv_path} has no {PATH_COLUMN!r} column (columns: {list(columns)})")
    rows = select_rows(
        columns,
        len(columns[PATH_COLUMN]),
        source=str(csv_path),
        frontal_only=frontal_only,
        views=views,
        max_samples=max_samples,
        seed=seed,
    )
    root = csv_path.parent.parent
    paths = [columns[PATH_COLUMN][i] for i in rows]
    files = [root / p for p in paths]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(files)} images listed in {csv_path} are missing, the first is {missing[0]}; "
            f"CSV paths are resolved against {root} (the parent of the CSV's folder, as in CheXpert's layout)"
        )
    annotated = tuple(lb for lb in CHEXPERT_LABELS if lb in columns)
    labels = code_labels(columns, rows, policy_full, str(csv_path))
    description = _description(
        str(csv_path),
        annotated,
        policy_full,
        frontal_only=frontal_only,
        views=views,
        max_samples=max_samples,
        seed=seed,
    )
    return datasets.Dataset.from_dict(
        {
            "image": [str(f) for f in files],
            "path": paths,
            "patient_id": [parse_patient_id(p) for p in paths],
            "labels": labels.tolist(),
        },
        features=FEATURES,
        info=datasets.DatasetInfo(description=description, features=FEATURES),
    )


def load_chexpert_hub(
    repo_id: str,
    split: str,
    *,
    policy: Mapping[str, UncertainPolicy] | None = None,
    frontal_only: bool = True,
    views: Sequence[str] | None = ("AP", "PA"),
    max_samples: int | None = None,
    seed: int = 0,
    image_column: str = "image",
    revision: str | None = None,
) -> datasets.Dataset:
    """Load a CheXpert-style dataset from the Hugging Face Hub with :func:`load_chexpert`'s columns.

    The Hub dataset needs an Image column (``image_column``) and label columns named as in
    ``CHEXPERT_LABELS`` with CheXpert's coding; ``Path``, ``Frontal/Lateral``, ``AP/PA`` and ``patient_id``
    are used when present (else the path comes from the image feature and the patient from the path).
    Filters, policy and subsampling behave as in :func:`load_chexpert`. Needs network access or the
    dataset in the local Hugging Face cache.

    Raises:
        ConnectionError: the Hub cannot be reached (offline) and the dataset is not cached.
        ValueError: the split lacks the image column.
    """
    policy_full = full_policy(policy)
    try:
        hub = datasets.load_dataset(repo_id, split=split, revision=revision)
    except ConnectionError as err:
        raise ConnectionError(
            f"could not load {repo_id!r} (split {split!r}) from the Hugging Face Hub: {err}. This needs network "
            "access or the dataset in the local Hugging Face cache; for a local copy of CheXpert use "
            "load_chexpert(path/to/train.csv)"
        ) from err
    if not isinstance(hub, datasets.Dataset):
        raise TypeError(f"load_dataset({repo_id!r}, split={split!r}) returned {type(hub).__name__}, not a Dataset")
    if image_column not in hub.column_names:
        raise ValueError(f"{repo_id} split {split!r} has no image column {image_column!r}: {hub.column_names}")
    hub = hub.cast_column(image_column, datasets.Image(decode=False))
    source = f"hf://datasets/{repo_id}/{split}"
    wanted = {*CHEXPERT_LABELS, PATH_COLUMN, FRONTAL_COLUMN, VIEW_COLUMN, "patient_id"}
    columns: dict[str, list[Any]] = hub.select_columns([c for c in hub.column_names if c in wanted]).to_dict()
    rows = select_rows(
        columns,
        len(hub),
        source=source,
        frontal_only=frontal_only,
        views=views,
        max_samples=max_samples,
        seed=seed,
    )
    if PATH_COLUMN in columns:
        paths = [str(columns[PATH_COLUMN][i]) for i in rows]
    else:
        # Read only the path field of the image structs, never the image bytes.
        stored = pc.struct_field(hub.data.column(image_column), "path").to_pylist()
        paths = [stored[i] or f"{split}/{i}" for i in rows]
    if "patient_id" in columns:
        patients = [str(columns["patient_id"][i]) for i in rows]
    else:
        patients = [parse_patient_id(p) for p in paths]
    annotated = tuple(lb for lb in CHEXPERT_LABELS if lb in columns)
    # New columns are added at full length and rows selected last: adding a column to a selection would
    # first rewrite the whole table, image bytes included.
    n_rows = len(hub)
    full_paths, full_patients = [""] * n_rows, [""] * n_rows
    full_labels = np.full((n_rows, len(CHEXPERT_LABELS)), np.nan, dtype=np.float32)
    full_labels[rows] = code_labels(columns, rows, policy_full, source)
    for k, i in enumerate(rows):
        full_paths[i], full_patients[i] = paths[k], patients[k]
    out = hub.select_columns([image_column])
    if image_column != "image":
        out = out.rename_column(image_column, "image")
    out = out.add_column("path", full_paths, feature=FEATURES["path"])
    out = out.add_column("patient_id", full_patients, feature=FEATURES["patient_id"])
    out = out.add_column("labels", full_labels.tolist(), feature=FEATURES["labels"])
    out = out.select(rows)
    out.info.description = _description(
        source,
        annotated,
        policy_full,
        frontal_only=frontal_only,
        views=views,
        max_samples=max_samples,
        seed=seed,
    )
    return out


# --- splits and statistics ------------------------------------------------------------------------


def patient_split(ds: datasets.Dataset, valid_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``ds`` into ``(train, valid)`` by patient, so no patient's images leak across.

    ``round(valid_fraction * n_patients)`` patients (at least one, and at least one left for training) are
    drawn with ``seed``; row order is kept within each part.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    patients = [str(p) for p in ds["patient_id"]]
    unique = sorted(set(patients))
    if len(unique) < 2:
        raise ValueError(f"a patient split needs at least 2 patients, the dataset has {len(unique)}")
    n_valid = min(max(1, round(valid_fraction * len(unique))), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    valid_patients = {unique[i] for i in order[:n_valid].tolist()}
    train_rows = [i for i, p in enumerate(patients) if p not in valid_patients]
    valid_rows = [i for i, p in enumerate(patients) if p in valid_patients]
    return ds.select(train_rows), ds.select(valid_rows)


def labels_array(ds: datasets.Dataset) -> npt.NDArray[np.float64]:
    """``(N, 14)`` float64 targets of ``ds`` (NaN = unknown)."""
    if len(ds) == 0:
        return np.empty((0, len(CHEXPERT_LABELS)), dtype=np.float64)
    table = ds.select_columns(["labels"]).with_format("numpy")[:]
    labels = np.asarray(np.stack(list(table["labels"])), dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != len(CHEXPERT_LABELS):
        raise ValueError(f"labels must have {len(CHEXPERT_LABELS)} values per row, got shape {labels.shape}")
    return labels


def positive_rates(ds: datasets.Dataset) -> npt.NDArray[np.float64]:
    """``(14,)`` fraction of positive targets among the known (non-NaN) ones; NaN where none is known.

    The ratio ``(1 - p) / p`` is the usual ``pos_weight`` of ``BCEWithLogitsLoss`` for imbalanced labels.
    """
    labels = labels_array(ds)
    known = ~np.isnan(labels)
    n_known = known.sum(axis=0)
    n_positive = np.where(known, labels, 0.0).sum(axis=0)
    rates = np.full(len(CHEXPERT_LABELS), np.nan)
    np.divide(n_positive, n_known, out=rates, where=n_known > 0)
    return rates
