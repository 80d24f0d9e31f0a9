"""The CheXpert findings: an ordered contract shared by checkpoints, training and the API."""

from __future__ import annotations

from typing import Final

#: The 14 CheXpert observations in the column order of CheXpert's ``train.csv``.
CHEXPERT_LABELS: Final[tuple[str, ...]] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
