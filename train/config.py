"""The training recipe: :class:`FitConfig`, the one place its defaults are written.

``python -m train fit`` and ``crossfit`` build their options from these fields and defaults, the Makefile's
``demo-model`` target names the demo recipe (``--recipe demo``, :data:`DEMO_RECIPE`), and :mod:`train.fit` runs a
``FitConfig``. The module imports no torch, so the command line can read the defaults and still start at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from bayesnet.pretrained import InitSource

AmpMode = Literal["auto", "fp16", "bf16", "off"]

#: The values of :data:`bayesnet.pretrained.InitSource`, for the command line's choices (a test checks they agree;
#: importing bayesnet here would load torch).
INIT_SOURCES: Final = ("imagenet-lite0", "hub", "none")


@dataclass(frozen=True)
class FitConfig:
    """Everything one training run depends on (saved as ``config.json`` beside the checkpoints)."""

    train_csv: Path
    out: Path
    valid_csv: Path | None = None
    valid_fraction: float = 0.1
    arch: str = "tf_efficientnet_lite0"  # bayesnet.pretrained.LITE0_ARCH, the offline ImageNet initialisation's
    init: InitSource = "imagenet-lite0"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    freeze_epochs: int = 0
    image_size: int = 224
    dropout: float = 0.2
    mc_dropout_blocks: int = 0
    uncertain_policy: str = "chexpert"
    amp: AmpMode = "auto"
    device: str = "auto"
    workers: int = 2
    resume: bool = False
    seed: int = 0
    max_train_samples: int | None = None
    patience: int = 5
    grad_clip: float = 1.0
    max_pos_weight: float = 10.0
    name: str = "bayesnet-cxr"
    version: str = "0.1.0"
    progress: bool = True

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}, indent=2)


#: Where the shipped demo model's recipe departs from the defaults above, chosen for a few hundred films trained on
#: a CPU (docs/demo-training.md records what was tried): a smaller batch and learning rate, two head-only epochs
#: before the ImageNet trunk moves, more epochs and more patience. ``make demo-model`` trains with them
#: (``train fit --recipe demo``), and ``train crossfit`` trains every fold with them by
#: default because its folds cross-validate the demo recipe (docs/uncertainty.md).
DEMO_RECIPE: Final[Mapping[str, Any]] = MappingProxyType(
    {"epochs": 15, "batch_size": 16, "lr": 5e-4, "freeze_epochs": 2, "patience": 6}
)


def field_defaults() -> dict[str, Any]:
    """Every :class:`FitConfig` field that has a default, by name, in declaration order."""
    return {field.name: field.default for field in fields(FitConfig) if field.default is not MISSING}
