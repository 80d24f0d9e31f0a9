from __future__ import annotations

import json

import pytest
import torch

from bayesnet import CHEXPERT_LABELS, ModelSpec, SpecError, preprocess
from bayesnet.preprocess import to_square


def test_chexpert_labels_in_csv_column_order() -> None:
    assert len(CHEXPERT_LABELS) == 14
    assert CHEXPERT_LABELS[0] == "No Finding"
    assert CHEXPERT_LABELS[-1] == "Support Devices"
    assert CHEXPERT_LABELS.index("Pleural Effusion") == 10


def test_default_spec_is_efficientnet_b0_grayscale_with_neutral_calibration() -> None:
    spec = ModelSpec()
    assert (spec.arch, spec.in_chans, spec.image_size, spec.mc_samples) == ("efficientnet_b0", 1, 224, 20)
    assert spec.labels == CHEXPERT_LABELS
    assert spec.temperature == (1.0,) * 14 and spec.threshold == (0.5,) * 14
    assert spec.trained_labels == CHEXPERT_LABELS and spec.untrained_labels == ()
    assert spec.mc_dropout_blocks == 0  # head-only MC dropout by default


def test_spec_round_trips_through_json() -> None:
    spec = ModelSpec(
        arch="tf_efficientnet_lite0",
        mean=(0.5,),
        std=(0.5,),
        trained_labels=tuple(lb for lb in CHEXPERT_LABELS if lb != "Fracture"),
        temperature=tuple(1.0 + i / 10 for i in range(14)),
        extra={"metrics": {"auc": 0.8}},
    )
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    assert again.untrained_labels == ("Fracture",)
    assert json.loads(spec.to_json())["format"] == "bayesnet.ModelSpec/1"


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"labels": ("a", "a")}, "duplicates"),
        ({"temperature": (1.0, 2.0)}, "temperature has 2 values"),
        ({"trained_labels": ("Nonsense",)}, "Nonsense"),
        ({"mean": (0.5, 0.5, 0.5)}, "one value per input channel"),
        ({"dropout": 1.0}, "dropout"),
        ({"in_chans": 2}, "in_chans"),
        ({"threshold": (0.0,) * 14}, "threshold"),
    ],
)
def test_invalid_specs_are_refused_with_a_reason(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        ModelSpec(**changes)  # type: ignore[arg-type]


def test_unknown_fields_and_formats_are_refused() -> None:
    data = ModelSpec().to_dict()
    with pytest.raises(SpecError, match="unknown fields"):
        ModelSpec.from_dict({**data, "surprise": 1})
    with pytest.raises(SpecError, match="unsupported spec format"):
        ModelSpec.from_dict({**data, "format": "other/9"})


def test_label_index_accepts_names_and_indices() -> None:
    spec = ModelSpec()
    assert spec.label_index("Edema") == 5
    assert spec.label_index(3) == 3
    with pytest.raises(SpecError, match="unknown label"):
        spec.label_index("Edemaa")


def test_preprocess_uses_the_spec_only() -> None:
    spec = ModelSpec(image_size=64, mean=(0.25,), std=(0.5,))
    pixels = torch.full((100, 80), 0.75)
    x = preprocess(pixels.numpy(), spec)
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full((1, 64, 64), 1.0))
    rgb = ModelSpec(image_size=32, in_chans=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    y = preprocess(torch.ones(40, 40), rgb)
    assert y.shape == (3, 32, 32)
    torch.testing.assert_close(y[:, 0, 0], torch.tensor([1.0, 2.0, 0.5]))


def test_letterbox_keeps_aspect_ratio_and_pads_with_black() -> None:
    spec = ModelSpec(image_size=64, resize="letterbox")
    wide = torch.ones(50, 100)
    square = to_square(wide, spec)
    assert square.shape == (64, 64)
    assert square[0, 32].item() == 0.0 and square[32, 32].item() == pytest.approx(1.0)
    assert to_square(wide, spec.replace(resize="squash"))[0, 32].item() == pytest.approx(1.0)


def test_preprocess_rejects_colour_arrays() -> None:
    with pytest.raises(ValueError, match="2-D grayscale"):
        preprocess(torch.ones(3, 10, 10), ModelSpec())
