"""CheXpert-layout CSVs: columns, label codes, uncertain-label policies and patient ids.

The tabular half of the training data (:mod:`train.data` builds Hugging Face datasets from it). Targets
follow the label contract of :mod:`bayesnet.labels`: a ``(14,)`` float32 vector in ``CHEXPERT_LABELS``
order where NaN means "unknown" and is masked out of the loss. NaN comes from two places: a label column
absent from the CSV (the dataset never annotated that finding, e.g. Fracture in NIH ChestX-ray14) and the
``"ignore"`` policy for uncertain (``-1``) labels. A blank cell is CheXpert's "not mentioned" and counts
as negative.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal, cast, get_args

import numpy as np
import numpy.typing as npt

from bayesnet.labels import CHEXPERT_LABELS

__all__ = [
    "CHEXPERT_U_ONES",
    "FRONTAL_COLUMN",
    "PATH_COLUMN",
    "VIEW_COLUMN",
    "UncertainPolicy",
    "annotated_labels",
    "code_labels",
    "full_policy",
    "parse_patient_id",
    "parse_uncertain_policy",
    "read_csv_columns",
    "select_rows",
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


def full_policy(policy: Mapping[str, UncertainPolicy] | None) -> dict[str, UncertainPolicy]:
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


def read_csv_columns(csv_path: Path) -> dict[str, list[str]]:
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


def select_rows(
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


def code_labels(
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
