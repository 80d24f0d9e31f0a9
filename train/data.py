"""Training data: CheXpert-layout CSVs -> a Hugging Face ``Dataset`` -> augmented, normalised batches.

The path of one training image is the serving path with augmentation in the middle: file bytes ->
:func:`bayesnet.decode_image` (the decoder the service uses) -> :func:`bayesnet.preprocess.to_square` ->
:class:`Augment` (train only) -> :func:`bayesnet.preprocess.normalise`. Without augmentation the result is
exactly :func:`bayesnet.preprocess.preprocess`, so training and serving cannot drift apart.

Targets follow the label contract of :mod:`bayesnet.labels`: a ``(14,)`` float32 vector in
``CHEXPERT_LABELS`` order where NaN means "unknown" and is masked out of the loss. NaN comes from two places:
a label column absent from the CSV (the dataset never annotated that finding, e.g. Fracture in NIH
ChestX-ray14) and the ``"ignore"`` policy for uncertain (``-1``) labels. A blank cell is CheXpert's "not
mentioned" and counts as negative.

Reproducibility: subsampling and patient splits are seeded, the shuffling loader uses a seeded
``torch.Generator``, and each item's augmentation draws from an RNG derived from ``(seed, epoch, index)``,
so a batch does not depend on the number of workers or on which worker loaded it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal, cast, get_args

import datasets
import numpy as np
import numpy.typing as npt
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from bayesnet.errors import ImageError
from bayesnet.imaging import decode_image
from bayesnet.labels import CHEXPERT_LABELS
from bayesnet.preprocess import normalise, preprocess, to_square
from bayesnet.spec import ModelSpec

__all__ = [
    "Augment",
    "ChexpertTorchDataset",
    "RadiographTransform",
    "UncertainPolicy",
    "annotated_labels",
    "dataset_annotated_labels",
    "dataset_uncertain_policy",
    "load_chexpert",
    "load_chexpert_hub",
    "make_loader",
    "parse_patient_id",
    "parse_uncertain_policy",
    "patient_split",
    "positive_rates",
    "set_loader_epoch",
]

UncertainPolicy = Literal["ones", "zeros", "ignore"]
"""What an uncertain (``-1``) label becomes: 1 (U-Ones), 0 (U-Zeros) or NaN (U-Ignore, masked)."""

_POLICIES: Final[tuple[UncertainPolicy, ...]] = get_args(UncertainPolicy)
_BASES: Final[tuple[str, ...]] = ("chexpert", *_POLICIES)

#: Labels trained with U-Ones by the CheXpert paper's best policy (Irvin et al. 2019); the rest use U-Zeros.
CHEXPERT_U_ONES: Final[frozenset[str]] = frozenset({"Atelectasis", "Edema"})

# CheXpert's CSV columns this module reads besides the labels.
PATH_COLUMN: Final = "Path"
FRONTAL_COLUMN: Final = "Frontal/Lateral"
VIEW_COLUMN: Final = "AP/PA"

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

# CheXpert codes a cell as 1.0 / 0.0 / -1.0 or blank; the common spellings skip float parsing.
_CODES: Final[Mapping[str, float]] = {
    "": 0.0,
    "1.0": 1.0,
    "0.0": 0.0,
    "-1.0": -1.0,
    "1": 1.0,
    "0": 0.0,
    "-1": -1.0,
}
_PATIENT_DIR: Final = re.compile(r"^patient\d+$")
_NIH_STEM: Final = re.compile(r"^(\d+)_\d+$")

LabelArray = npt.NDArray[np.float32]


# --- policies -------------------------------------------------------------------------------------


def _base_policy(base: str) -> dict[str, UncertainPolicy]:
    """Every label's policy for one of the base names in ``_BASES``."""
    if base == "chexpert":
        return {lb: ("ones" if lb in CHEXPERT_U_ONES else "zeros") for lb in CHEXPERT_LABELS}
    return dict.fromkeys(CHEXPERT_LABELS, cast(UncertainPolicy, base))


def _check_policy_name(name: str, context: str) -> UncertainPolicy:
    if name not in _POLICIES:
        raise ValueError(f"unknown uncertain-label policy {name!r} {context}; valid policies are {list(_POLICIES)}")
    return name


def _check_label_name(label: str, context: str) -> str:
    if label not in CHEXPERT_LABELS:
        raise ValueError(f"unknown label {label!r} {context}; valid labels are {list(CHEXPERT_LABELS)}")
    return label


def parse_uncertain_policy(text: str) -> dict[str, UncertainPolicy]:
    """Parse a policy for uncertain labels into one :data:`UncertainPolicy` per CheXpert label.

    ``text`` is a base, optionally followed by comma-separated ``Label=policy`` overrides, e.g.
    ``"chexpert,Cardiomegaly=ignore,Edema=zeros"``. Bases: ``"chexpert"`` (U-Ones for Atelectasis and
    Edema, U-Zeros for every other label, the CheXpert paper's choice), ``"ones"``, ``"zeros"``,
    ``"ignore"``. When the text starts with an override the base is ``"chexpert"``. Unknown bases, labels
    or policies, a malformed item or a label overridden twice raise ``ValueError`` naming the valid values.
    """
    items = [item.strip() for item in text.split(",")]
    if not items[0]:
        raise ValueError(f"empty uncertain-label policy {text!r}; start with one of {list(_BASES)}")
    base = "chexpert" if "=" in items[0] else items.pop(0)
    if base not in _BASES:
        raise ValueError(f"unknown uncertain-label policy base {base!r}; valid bases are {list(_BASES)}")
    policy = _base_policy(base)
    overridden: set[str] = set()
    for item in items:
        label, sep, name = (part.strip() for part in item.partition("="))
        if not sep or not label:
            raise ValueError(
                f"malformed override {item!r} in uncertain-label policy {text!r}; write Label=policy, "
                f"e.g. 'Edema=zeros', with a label from {list(CHEXPERT_LABELS)}"
            )
        _check_label_name(label, f"in uncertain-label policy {text!r}")
        if label in overridden:
            raise ValueError(f"label {label!r} is overridden twice in uncertain-label policy {text!r}")
        overridden.add(label)
        policy[label] = _check_policy_name(name, f"for {label!r} in {text!r}")
    return policy


def _full_policy(policy: Mapping[str, UncertainPolicy] | None) -> dict[str, UncertainPolicy]:
    """A validated policy for every label; labels missing from ``policy`` keep the ``"chexpert"`` default."""
    full = _base_policy("chexpert")
    for label, name in (policy or {}).items():
        _check_label_name(label, "in the uncertain-label policy")
        full[label] = _check_policy_name(name, f"for {label!r}")
    return full


# --- CSV reading ----------------------------------------------------------------------------------


def _read_header(csv_path: Path) -> list[str]:
    with csv_path.open(newline="", encoding="utf-8") as file:
        header = next(csv.reader(file), None)
    if not header:
        raise ValueError(f"{csv_path} is empty: expected a CheXpert-style CSV with a header row")
    return [name.strip() for name in header]


def annotated_labels(csv_path: Path) -> tuple[str, ...]:
    """The CheXpert labels that have a column in ``csv_path``'s header, in ``CHEXPERT_LABELS`` order.

    A label without a column was not annotated by that dataset: its targets are NaN (unknown), not 0.
    """
    present = set(_read_header(Path(csv_path)))
    return tuple(lb for lb in CHEXPERT_LABELS if lb in present)


def _read_csv_columns(csv_path: Path) -> dict[str, list[str]]:
    """All columns of a CSV as lists of stripped strings, keyed by the header's names."""
    with csv_path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise ValueError(f"{csv_path} is empty: expected a CheXpert-style CSV with a header row")
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise ValueError(f"{csv_path} has duplicate columns {duplicates}")
        columns: dict[str, list[str]] = {name: [] for name in header}
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{csv_path} line {reader.line_num} has {len(row)} fields, the header has {len(header)}"
                )
            for name, value in zip(header, row, strict=True):
                columns[name].append(value.strip())
    return columns


# --- rows, labels and patients --------------------------------------------------------------------


def _select_rows(
    columns: Mapping[str, Sequence[Any]],
    n_rows: int,
    *,
    source: str,
    frontal_only: bool,
    views: Sequence[str] | None,
    max_samples: int | None,
    seed: int,
) -> list[int]:
    """Row indices kept by the view filters, then subsampled to ``max_samples`` (CSV order kept)."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1 (or None for all rows), got {max_samples}")
    keep = list(range(n_rows))
    if frontal_only and FRONTAL_COLUMN in columns:
        frontal = columns[FRONTAL_COLUMN]
        keep = [i for i in keep if str(frontal[i]).strip() == "Frontal"]
    if views is not None and VIEW_COLUMN in columns:
        wanted = {str(v).strip() for v in views}
        view = columns[VIEW_COLUMN]
        keep = [i for i in keep if view[i] is not None and str(view[i]).strip() in wanted]
    if not keep:
        raise ValueError(
            f"no rows of {source} are left after filtering ({n_rows} rows; frontal_only={frontal_only}, "
            f"views={None if views is None else list(views)})"
        )
    if max_samples is not None and max_samples < len(keep):
        chosen = np.random.default_rng(seed).choice(len(keep), size=max_samples, replace=False)
        keep = [keep[i] for i in sorted(chosen.tolist())]
    return keep


def _code(raw: Any, where: str) -> float:
    """One label cell -> 1.0, 0.0 or -1.0; blank, None and NaN mean "not mentioned", i.e. 0.0."""
    if raw is None:
        return 0.0
    if isinstance(raw, str):
        value = _CODES.get(raw.strip())
        if value is None:
            try:
                value = float(raw)
            except ValueError as err:
                raise ValueError(f"{where}: label value {raw!r} is not 1, 0, -1 or blank") from err
    else:
        value = float(raw)
    if math.isnan(value):
        return 0.0
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"{where}: label value {raw!r} is not 1, 0, -1 or blank")
    return value


def _code_labels(
    columns: Mapping[str, Sequence[Any]],
    rows: Sequence[int],
    policy: Mapping[str, UncertainPolicy],
    source: str,
) -> LabelArray:
    """``(len(rows), 14)`` float32 targets: coded cells with ``policy`` applied to -1, NaN for absent columns."""
    labels = np.full((len(rows), len(CHEXPERT_LABELS)), np.nan, dtype=np.float32)
    uncertain_target = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}
    for j, label in enumerate(CHEXPERT_LABELS):
        if label not in columns:
            continue
        cells = columns[label]
        if_uncertain = uncertain_target[policy[label]]
        for k, i in enumerate(rows):
            value = _code(cells[i], f"{source} row {i + 1}, column {label!r}")
            labels[k, j] = if_uncertain if value == -1.0 else value
    return labels


def parse_patient_id(path: str) -> str:
    """The patient a file belongs to, from its path, so splits never put one patient on both sides.

    CheXpert: the ``patientNNNNN`` folder. NIH ChestX-ray14 (``00000075_000.png``): the number before the
    underscore. Anything else: the file's stem (each file its own patient).
    """
    pure = PurePosixPath(path.replace("\\", "/"))
    for part in reversed(pure.parts[:-1]):
        if _PATIENT_DIR.match(part):
            return part
    nih = _NIH_STEM.match(pure.stem)
    return nih.group(1) if nih else pure.stem


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
    known = [not np.isnan(column).all() for column in _labels_array(ds).T]
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
    full_policy = _full_policy(policy)
    columns = _read_csv_columns(csv_path)
    if PATH_COLUMN not in columns:
        raise ValueError(f"{csv_path} has no {PATH_COLUMN!r} column (columns: {list(columns)})")
    rows = _select_rows(
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
    labels = _code_labels(columns, rows, full_policy, str(csv_path))
    description = _description(
        str(csv_path),
        annotated,
        full_policy,
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
    full_policy = _full_policy(policy)
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
    rows = _select_rows(
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
    full_labels[rows] = _code_labels(columns, rows, full_policy, source)
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
        full_policy,
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


def _labels_array(ds: datasets.Dataset) -> npt.NDArray[np.float64]:
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
    labels = _labels_array(ds)
    known = ~np.isnan(labels)
    n_known = known.sum(axis=0)
    n_positive = np.where(known, labels, 0.0).sum(axis=0)
    rates = np.full(len(CHEXPERT_LABELS), np.nan)
    np.divide(n_positive, n_known, out=rates, where=n_known > 0)
    return rates


# --- transforms -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Small, radiograph-appropriate random augmentation of a square ``(S, S)`` image in [0, 1].

    Geometry (one affine warp, bilinear, black = air outside): isotropic ``scale``, rotation within
    ``+-rotation_deg``, translation within ``+-translate_fraction`` of the side. Intensity: ``gamma``
    (log-uniform, so 0.8 and 1.25 are equally likely), ``contrast`` about the image mean, ``brightness``
    offset, then clipped to [0, 1]. No horizontal flip by default: left and right are anatomy (the heart
    is on the left; a flipped film looks like situs inversus), so ``hflip`` is opt-in.
    """

    scale: tuple[float, float] = (0.9, 1.1)
    rotation_deg: float = 7.0
    translate_fraction: float = 0.05
    brightness: float = 0.1
    contrast: tuple[float, float] = (0.85, 1.15)
    gamma: tuple[float, float] = (0.8, 1.25)
    hflip: bool = False

    def __post_init__(self) -> None:
        for name in ("scale", "contrast", "gamma"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high:
                raise ValueError(f"Augment.{name} must be (low, high) with 0 < low <= high, got {(low, high)}")
        if not 0.0 <= self.rotation_deg <= 45.0:
            raise ValueError(f"Augment.rotation_deg must be within 0..45, got {self.rotation_deg}")
        if not 0.0 <= self.translate_fraction < 0.5:
            raise ValueError(f"Augment.translate_fraction must be in [0, 0.5), got {self.translate_fraction}")
        if not 0.0 <= self.brightness < 1.0:
            raise ValueError(f"Augment.brightness must be in [0, 1), got {self.brightness}")

    def apply(self, square: Tensor, rng: np.random.Generator) -> Tensor:
        """``(S, S)`` float in [0, 1] -> augmented ``(S, S)`` in [0, 1].

        Always draws 8 numbers from ``rng``, whatever the settings, so two generators in the same state
        give the same result.
        """
        u: list[float] = rng.random(8).tolist()
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        angle = math.radians(self.rotation_deg * (2.0 * u[1] - 1.0))
        shift_x = self.translate_fraction * (2.0 * u[2] - 1.0)
        shift_y = self.translate_fraction * (2.0 * u[3] - 1.0)
        brightness = self.brightness * (2.0 * u[4] - 1.0)
        contrast = self.contrast[0] + (self.contrast[1] - self.contrast[0]) * u[5]
        log_gamma = math.log(self.gamma[0]) + (math.log(self.gamma[1]) - math.log(self.gamma[0])) * u[6]
        flip = self.hflip and u[7] < 0.5

        x = square
        if (scale, angle, shift_x, shift_y) != (1.0, 0.0, 0.0, 0.0):
            x = _affine(x, scale=scale, angle=angle, shift=(shift_x, shift_y))
        if flip:
            x = x.flip(-1)
        x = torch.pow(x.clamp(0.0, 1.0), math.exp(log_gamma))
        # (x - mean) * contrast + mean + brightness, written so that contrast 1 and brightness 0 are exact.
        x = x * contrast + (x.mean() * (1.0 - contrast) + brightness)
        return x.clamp(0.0, 1.0)


def _affine(square: Tensor, *, scale: float, angle: float, shift: tuple[float, float]) -> Tensor:
    """Warp ``(S, S)`` by scaling about the centre, rotating by ``angle`` rad and shifting by ``shift`` sides.

    ``affine_grid`` maps output to input coordinates (normalised to [-1, 1]), so ``theta`` is the inverse
    of the forward transform ``p -> scale * R(angle) p + 2 * shift``.
    """
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    inverse = torch.tensor([[cos, sin], [-sin, cos]], dtype=square.dtype)
    offset = -inverse @ torch.tensor([2.0 * shift[0], 2.0 * shift[1]], dtype=square.dtype)
    theta = torch.cat([inverse, offset[:, None]], dim=1)[None]
    size = square.shape[-1]
    grid = F.affine_grid(theta, [1, 1, size, size], align_corners=False)
    warped = F.grid_sample(square[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[0, 0]


class RadiographTransform:
    """Decoded pixels ``(H, W)`` in [0, 1] -> model input ``(in_chans, S, S)``, per the spec.

    Eval (``train=False``) is exactly :func:`bayesnet.preprocess.preprocess`, the serving path. Train
    inserts ``augment`` (default :class:`Augment()`) between :func:`~bayesnet.preprocess.to_square` and
    :func:`~bayesnet.preprocess.normalise`; ``augment`` is ignored in eval.
    """

    def __init__(self, spec: ModelSpec, *, train: bool, augment: Augment | None = None) -> None:
        self.spec = spec
        self.train = train
        self.augment: Augment | None = (augment or Augment()) if train else None

    def __call__(
        self, pixels: npt.NDArray[np.floating[Any]] | Tensor, rng: np.random.Generator | None = None
    ) -> Tensor:
        """Transform one image; in train mode the augmentation draws from ``rng`` (None: fresh entropy)."""
        if self.augment is None:
            return preprocess(pixels, self.spec)
        x = pixels if isinstance(pixels, Tensor) else torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        if x.dim() != 2:
            raise ValueError(f"RadiographTransform expects a 2-D grayscale image (H, W), got {tuple(x.shape)}")
        square = to_square(x.float(), self.spec)
        square = self.augment.apply(square, rng if rng is not None else np.random.default_rng())
        return normalise(square, self.spec).contiguous()

    def __repr__(self) -> str:
        return f"RadiographTransform(image_size={self.spec.image_size}, train={self.train}, augment={self.augment})"


# --- torch side -----------------------------------------------------------------------------------


class ChexpertTorchDataset(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """A map-style torch dataset over a dataset from :func:`load_chexpert`: ``(image, labels)`` pairs.

    ``image`` is ``(in_chans, S, S)`` float32 from the file's bytes via :func:`bayesnet.decode_image` and
    ``transform``; ``labels`` is float32 in the spec's label order (``(14,)`` for the default spec), NaN =
    unknown. Item ``i`` of epoch ``e`` augments with an RNG seeded by ``(seed, e, i)``: reproducible with
    any number of workers. The epoch lives in shared memory so :meth:`set_epoch` reaches persistent
    workers too (call it before iterating the loader for that epoch).
    """

    def __init__(self, ds: datasets.Dataset, transform: RadiographTransform, *, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        missing = {"image", "labels"} - set(ds.column_names)
        if missing:
            raise ValueError(f"the dataset lacks columns {sorted(missing)}; build it with load_chexpert")
        unknown = [lb for lb in transform.spec.labels if lb not in CHEXPERT_LABELS]
        if unknown:
            raise ValueError(f"the spec has labels {unknown} that are not CheXpert labels {list(CHEXPERT_LABELS)}")
        ds = ds.select_columns(["image", "labels"])
        image_feature = ds.features["image"]
        if isinstance(image_feature, datasets.Image) and image_feature.decode:
            # Decode with bayesnet's decoder (as the service does), never with PIL via datasets.
            ds = ds.cast_column("image", datasets.Image(decode=False))
        self.ds = ds
        self.transform = transform
        self.seed = seed
        self._label_index = torch.tensor([CHEXPERT_LABELS.index(lb) for lb in transform.spec.labels])
        # torch leaves share_memory_ unannotated; it returns the tensor itself.
        self._epoch: Tensor = torch.zeros((), dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch`` (shared with worker processes, persistent ones included)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        row = self.ds[index]
        image = row["image"]
        if isinstance(image, dict):
            data, name = image.get("bytes"), image.get("path")
        else:
            data, name = None, str(image)
        if data is None:
            if not name:
                raise ValueError(f"row {index} has neither image bytes nor a path")
            data = Path(name).read_bytes()
        try:
            decoded = decode_image(data)
        except ImageError as err:
            raise ImageError(f"cannot decode training image {name or f'row {index}'}: {err}") from err
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pixels = self.transform(decoded.pixels, rng)
        labels = torch.tensor(row["labels"], dtype=torch.float32)[self._label_index]
        return pixels, labels


class _EpochShuffleSampler(Sampler[int]):
    """A permutation of ``dataset``'s indices drawn from ``(seed, dataset.epoch)``.

    Tied to the dataset's epoch rather than to a generator that advances with every ``iter()``, so the
    order of epoch ``e`` is the same with any number of workers and after resuming at epoch ``e``.
    """

    def __init__(self, dataset: ChexpertTorchDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.dataset.epoch])
        order: list[int] = rng.permutation(len(self.dataset)).tolist()
        return iter(order)


def make_loader(
    ds: datasets.Dataset,
    spec: ModelSpec,
    *,
    train: bool,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    sampler: Sampler[int] | None = None,
    augment: Augment | None = None,
    pin_memory: bool | None = None,
) -> DataLoader[tuple[Tensor, Tensor]]:
    """A DataLoader of ``(images (B, in_chans, S, S), labels (B, L))`` float32 batches, NaN = unknown.

    When ``train`` and no ``sampler`` is given it shuffles, with an order drawn from ``(seed, epoch)``;
    when ``train`` it augments. Call :func:`set_loader_epoch` before each epoch: it selects both the order
    and the augmentation, identically for any number of workers. ``pin_memory`` defaults to whether CUDA is
    available; workers persist across epochs; the last partial batch is kept.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    dataset = ChexpertTorchDataset(ds, RadiographTransform(spec, train=train, augment=augment), seed=seed)
    if sampler is None and train:
        sampler = _EpochShuffleSampler(dataset, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=False,
        persistent_workers=workers > 0,
        # Only seeds the workers' torch RNGs, which nothing here uses; seeded anyway so that no global
        # RNG state leaks into a run.
        generator=torch.Generator().manual_seed(seed),
    )


def set_loader_epoch(loader: DataLoader[tuple[Tensor, Tensor]], epoch: int) -> None:
    """Start ``epoch`` on a loader from :func:`make_loader`: its augmentation and shuffling order.

    A caller's sampler with a ``set_epoch`` method (e.g. ``DistributedSampler``) is told too.
    """
    dataset = loader.dataset
    if not isinstance(dataset, ChexpertTorchDataset):
        raise TypeError(f"expected a loader from make_loader, its dataset is {type(dataset).__name__}")
    dataset.set_epoch(epoch)
    sampler_set_epoch = getattr(loader.sampler, "set_epoch", None)
    if callable(sampler_set_epoch):
        sampler_set_epoch(epoch)
