"""Training data: CheXpert CSV reading and label policies (train.chexpert_csv), datasets and splits (train.data), the
shared-preprocessing loader (train.loader)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from bayesnet import ModelSpec, decode_image, preprocess
from bayesnet.labels import CHEXPERT_LABELS
from train.chexpert_csv import annotated_labels, parse_patient_id, parse_uncertain_policy
from train.data import (
    dataset_annotated_labels,
    dataset_uncertain_policy,
    load_chexpert,
    load_chexpert_hub,
    patient_split,
    positive_rates,
)
from train.loader import Augment, ChexpertTorchDataset, RadiographTransform, make_loader, set_loader_epoch
from train.synthetic import SyntheticPaths, generate

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
NIH_ABSENT = ("Enlarged Cardiomediastinum", "Fracture", "Support Devices")
# 48 px from 64 px films exercises the resize; a non-default mean/std shows the spec drives normalisation.
SPEC = ModelSpec(arch="test_efficientnet", image_size=48, mean=(0.5,), std=(0.25,))
IDENTITY_AUGMENT = Augment(
    scale=(1.0, 1.0), rotation_deg=0.0, translate_fraction=0.0, brightness=0.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0)
)

Rows = list[dict[str, str]]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    return generate(tmp_path_factory.mktemp("data") / "synth", n=60, seed=0, image_size=64)


@pytest.fixture(scope="module")
def train_ds(synth: SyntheticPaths) -> datasets.Dataset:
    return load_chexpert(synth.train_csv)


def _read(csv_path: Path) -> tuple[list[str], Rows]:
    with csv_path.open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def _write_variant(synth: SyntheticPaths, name: str, edit: Callable[[list[str], Rows], tuple[list[str], Rows]]) -> Path:
    """A copy of train.csv beside it (same root for its paths), with header and rows changed by ``edit``."""
    header, rows = edit(*_read(synth.train_csv))
    out = synth.root / name
    with out.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=header, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out


def _expected(cell: str, policy: str) -> float:
    if cell == "":
        return 0.0
    value = float(cell)
    if value != -1.0:
        return value
    return {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}[policy]


def _labels(ds: datasets.Dataset) -> np.ndarray:
    return np.array([row["labels"] for row in ds], dtype=np.float64)


def _batches(
    loader: torch.utils.data.DataLoader[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _pair_equal(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1].numpy(), b[1].numpy(), equal_nan=True)


# --- reading CheXpert's layout --------------------------------------------------------------------


def test_columns_features_and_paths(synth: SyntheticPaths, train_ds: datasets.Dataset) -> None:
    _, rows = _read(synth.train_csv)
    assert train_ds.column_names == ["image", "path", "patient_id", "labels"]
    assert isinstance(train_ds.features["image"], datasets.Image) and not train_ds.features["image"].decode
    assert len(train_ds) == synth.n_train == len(rows)
    first = train_ds[0]
    assert first["path"] == rows[0]["Path"]
    assert Path(first["image"]["path"]) == synth.root.parent / rows[0]["Path"]
    assert Path(first["image"]["path"]).is_file()
    assert first["patient_id"] == "patient00001"
    assert len(first["labels"]) == len(CHEXPERT_LABELS)
    assert dataset_annotated_labels(train_ds) == CHEXPERT_LABELS == annotated_labels(synth.train_csv)
    assert dataset_uncertain_policy(train_ds) == parse_uncertain_policy("chexpert")


@pytest.mark.parametrize("text", ["ones", "zeros", "ignore", "chexpert", "zeros,Cardiomegaly=ignore,Edema=ones"])
def test_label_coding_under_each_policy(synth: SyntheticPaths, text: str) -> None:
    policy = parse_uncertain_policy(text)
    ds = load_chexpert(synth.train_csv, policy=policy)
    _, rows = _read(synth.train_csv)
    cells = [[row[label] for label in CHEXPERT_LABELS] for row in rows]
    assert sum(c == "-1.0" for r in cells for c in r) > 0 and sum(c == "" for r in cells for c in r) > 0
    expected = np.array(
        [[_expected(c, policy[label]) for c, label in zip(r, CHEXPERT_LABELS, strict=True)] for r in cells]
    )
    np.testing.assert_array_equal(_labels(ds), expected)
    assert dataset_uncertain_policy(ds) == policy


def test_view_filters(synth: SyntheticPaths) -> None:
    def edit(header: list[str], rows: Rows) -> tuple[list[str], Rows]:
        rows[0]["Frontal/Lateral"] = "Lateral"
        rows[1]["AP/PA"] = "LL"
        rows[2]["AP/PA"] = ""
        return header, rows

    csv_path = _write_variant(synth, "views.csv", edit)
    _, rows = _read(csv_path)
    paths = [row["Path"] for row in rows]

    def kept(**kwargs: object) -> list[str]:
        return list(load_chexpert(csv_path, **kwargs)["path"])  # type: ignore[arg-type]

    assert kept() == paths[3:]
    assert kept(frontal_only=False) == [paths[0], *paths[3:]]
    assert kept(views=("AP", "PA", "LL")) == [paths[1], *paths[3:]]
    assert kept(views=None) == paths[1:]
    assert kept(views=("PA",)) == [row["Path"] for row in rows[3:] if row["AP/PA"] == "PA"]
    with pytest.raises(ValueError, match="no rows"):
        load_chexpert(csv_path, views=("RL",))

    def without_view_columns(header: list[str], rows: Rows) -> tuple[list[str], Rows]:
        return [h for h in header if h not in ("Frontal/Lateral", "AP/PA")], rows

    assert len(load_chexpert(_write_variant(synth, "no-views.csv", without_view_columns))) == synth.n_train


def test_max_samples_is_deterministic_subset_in_csv_order(synth: SyntheticPaths, train_ds: datasets.Dataset) -> None:
    all_paths = list(train_ds["path"])
    first = list(load_chexpert(synth.train_csv, max_samples=10, seed=3)["path"])
    assert first == list(load_chexpert(synth.train_csv, max_samples=10, seed=3)["path"])
    assert first != list(load_chexpert(synth.train_csv, max_samples=10, seed=4)["path"])
    assert len(first) == 10 and first == [p for p in all_paths if p in first]
    assert list(load_chexpert(synth.train_csv, max_samples=10_000)["path"]) == all_paths
    with pytest.raises(ValueError, match="max_samples"):
        load_chexpert(synth.train_csv, max_samples=0)


def test_patient_split_keeps_patients_on_one_side(synth: SyntheticPaths) -> None:
    # Every row twice: two images per patient make a leak across the split possible.
    def twice(header: list[str], rows: Rows) -> tuple[list[str], Rows]:
        return header, [r for row in rows for r in (row, row)]

    ds = load_chexpert(_write_variant(synth, "twice.csv", twice))
    train, valid = patient_split(ds, 0.25, seed=0)
    train_patients, valid_patients = set(train["patient_id"]), set(valid["patient_id"])
    assert not train_patients & valid_patients
    assert len(train) + len(valid) == len(ds) == 2 * synth.n_train
    assert len(valid_patients) == round(0.25 * synth.n_train)
    assert dataset_annotated_labels(valid) == CHEXPERT_LABELS
    again_train, _ = patient_split(ds, 0.25, seed=0)
    assert list(again_train["path"]) == list(train["path"])
    assert set(patient_split(ds, 0.25, seed=1)[1]["patient_id"]) != valid_patients
    with pytest.raises(ValueError, match="valid_fraction"):
        patient_split(ds, 1.0, seed=0)


def test_absent_label_column_is_unknown_not_negative(synth: SyntheticPaths, train_ds: datasets.Dataset) -> None:
    absent = ("Fracture", "Pneumonia")

    def drop(header: list[str], rows: Rows) -> tuple[list[str], Rows]:
        return [h for h in header if h not in absent], rows

    csv_path = _write_variant(synth, "absent.csv", drop)
    ds = load_chexpert(csv_path)
    expected_annotated = tuple(lb for lb in CHEXPERT_LABELS if lb not in absent)
    assert annotated_labels(csv_path) == expected_annotated == dataset_annotated_labels(ds)
    labels, full = _labels(ds), _labels(train_ds)
    for j, label in enumerate(CHEXPERT_LABELS):
        if label in absent:
            assert np.isnan(labels[:, j]).all()
        else:
            np.testing.assert_array_equal(labels[:, j], full[:, j])
    rates = positive_rates(ds)
    assert np.isnan(rates[[CHEXPERT_LABELS.index(lb) for lb in absent]]).all()


def test_missing_image_names_the_file_and_the_root(synth: SyntheticPaths) -> None:
    def break_path(header: list[str], rows: Rows) -> tuple[list[str], Rows]:
        rows[4]["Path"] = "synth/train/patient99999/study1/view1_lateral.png"
        return header, rows

    csv_path = _write_variant(synth, "missing.csv", break_path)
    with pytest.raises(FileNotFoundError, match="patient99999") as caught:
        load_chexpert(csv_path)
    assert str(synth.root.parent) in str(caught.value)

    # Only the images that survive the filters must exist.
    def break_lateral(header: list[str], rows: Rows) -> tuple[list[str], Rows]:
        header, rows = break_path(header, rows)
        rows[4]["Frontal/Lateral"] = "Lateral"
        return header, rows

    assert len(load_chexpert(_write_variant(synth, "missing-lateral.csv", break_lateral))) == synth.n_train - 1


def test_malformed_label_value_names_row_and_column(synth: SyntheticPaths) -> None:
    def corrupt(header: list[str], rows: Rows) -> tuple[list[str], Rows]:
        rows[2]["Edema"] = "2.0"
        return header, rows

    with pytest.raises(ValueError, match=r"row 3, column 'Edema'"):
        load_chexpert(_write_variant(synth, "corrupt.csv", corrupt))


@pytest.mark.parametrize(
    ("path", "patient"),
    [
        ("CheXpert-v1.0-small/train/patient00042/study3/view2_lateral.jpg", "patient00042"),
        ("nih-cxr14-sample/images/00000075_000.png", "00000075"),
        ("elsewhere/scan_a.png", "scan_a"),
    ],
)
def test_parse_patient_id(path: str, patient: str) -> None:
    assert parse_patient_id(path) == patient


# --- uncertain-label policies ---------------------------------------------------------------------


def test_parse_uncertain_policy_bases_and_overrides() -> None:
    chexpert = parse_uncertain_policy("chexpert")
    assert list(chexpert) == list(CHEXPERT_LABELS)
    assert {lb for lb, p in chexpert.items() if p == "ones"} == {"Atelectasis", "Edema"}
    assert {p for lb, p in chexpert.items() if lb not in ("Atelectasis", "Edema")} == {"zeros"}
    for base in ("ones", "zeros", "ignore"):
        assert set(parse_uncertain_policy(base).values()) == {base}
    mixed = parse_uncertain_policy("chexpert,Cardiomegaly=ignore,Edema=zeros")
    assert mixed == {**chexpert, "Cardiomegaly": "ignore", "Edema": "zeros"}
    assert parse_uncertain_policy(" ignore , No Finding = ones ") == {
        **parse_uncertain_policy("ignore"),
        "No Finding": "ones",
    }
    assert parse_uncertain_policy("Pneumonia=ignore") == {**chexpert, "Pneumonia": "ignore"}


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "chexpert"),
        ("optimistic", "chexpert"),
        ("chexpert,Heart=ones", "Cardiomegaly"),
        ("chexpert,Edema=maybe", "ignore"),
        ("chexpert,Edema", "Label=policy"),
        ("chexpert,Edema=ones,Edema=zeros", "twice"),
    ],
)
def test_parse_uncertain_policy_rejects_with_valid_names(text: str, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        parse_uncertain_policy(text)


def test_load_rejects_unknown_policy_entries(synth: SyntheticPaths) -> None:
    with pytest.raises(ValueError, match="valid labels"):
        load_chexpert(synth.train_csv, policy={"Heart": "ones"})
    with pytest.raises(ValueError, match="valid policies"):
        load_chexpert(synth.train_csv, policy={"Edema": "maybe"})  # type: ignore[dict-item]


def test_positive_rates(synth: SyntheticPaths) -> None:
    ds = load_chexpert(synth.train_csv, policy=parse_uncertain_policy("ignore"))
    _, rows = _read(synth.train_csv)
    for j, label in enumerate(CHEXPERT_LABELS):
        known = [_expected(row[label], "ignore") for row in rows if row[label] != "-1.0"]
        assert positive_rates(ds)[j] == pytest.approx(sum(known) / len(known))
    unannotated = datasets.Dataset.from_dict(
        {"labels": [[math.nan] * len(CHEXPERT_LABELS), [1.0] + [math.nan] * (len(CHEXPERT_LABELS) - 1)]}
    )
    rates = positive_rates(unannotated)
    assert rates[0] == 1.0 and np.isnan(rates[1:]).all()


# --- transforms and loaders -----------------------------------------------------------------------


def test_eval_transform_is_the_serving_preprocessing(train_ds: datasets.Dataset) -> None:
    transform = RadiographTransform(SPEC, train=False)
    for i in (0, 7):
        decoded = decode_image(Path(train_ds[i]["image"]["path"]).read_bytes())
        served = preprocess(decoded, SPEC)
        assert torch.equal(transform(decoded.pixels), served)
        assert torch.equal(transform(decoded.pixels, np.random.default_rng(i)), served)
        assert torch.equal(ChexpertTorchDataset(train_ds, transform)[i][0], served)


def test_train_transform_augments_deterministically(train_ds: datasets.Dataset) -> None:
    pixels = decode_image(Path(train_ds[0]["image"]["path"]).read_bytes()).pixels
    served = preprocess(pixels, SPEC)
    train = RadiographTransform(SPEC, train=True)
    assert train.augment == Augment() and not Augment().hflip
    first = train(pixels, np.random.default_rng(5))
    assert first.shape == served.shape == (1, SPEC.image_size, SPEC.image_size) and first.dtype == torch.float32
    assert torch.equal(first, train(pixels, np.random.default_rng(5)))
    assert not torch.equal(first, train(pixels, np.random.default_rng(6)))
    assert (first - served).abs().mean() > 0.01
    # Augmentation is the only difference: with every range at identity, training input == serving input.
    assert torch.equal(RadiographTransform(SPEC, train=True, augment=IDENTITY_AUGMENT)(pixels), served)
    flip = Augment(**{**IDENTITY_AUGMENT.__dict__, "hflip": True})
    flipped = [RadiographTransform(SPEC, train=True, augment=flip)(pixels, np.random.default_rng(s)) for s in range(8)]
    assert all(torch.equal(x, served) or torch.equal(x, served.flip(-1)) for x in flipped)
    assert any(torch.equal(x, served.flip(-1)) for x in flipped)


def test_loader_batches_are_normalised_with_masked_labels(synth: SyntheticPaths) -> None:
    ds = load_chexpert(synth.train_csv, policy=parse_uncertain_policy("ignore"))
    batches = _batches(make_loader(ds, SPEC, train=False, batch_size=20))
    assert [len(y) for _, y in batches] == [20, 20, synth.n_train - 40]  # drop_last=False
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.shape == (synth.n_train, 1, SPEC.image_size, SPEC.image_size) and images.dtype == torch.float32
    assert labels.shape == (synth.n_train, len(CHEXPERT_LABELS)) and labels.dtype == torch.float32
    np.testing.assert_array_equal(labels.numpy(), _labels(ds).astype(np.float32))
    assert labels.isnan().any()
    # Normalised with the spec's mean/std: [0, 1] maps to [-2, 2] here.
    assert images.min() >= -2.0 and images.max() <= 2.0 and images.min() < -1.0
    for i in (0, synth.n_train - 1):
        decoded = decode_image(Path(ds[i]["image"]["path"]).read_bytes())
        assert torch.equal(images[i], preprocess(decoded, SPEC))
    three = SPEC.replace(in_chans=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x, _ = next(iter(make_loader(ds, three, train=False, batch_size=4)))
    assert x.shape == (4, 3, SPEC.image_size, SPEC.image_size)


def test_loader_follows_the_spec_label_order(train_ds: datasets.Dataset) -> None:
    spec = ModelSpec(arch="test_efficientnet", labels=("Edema", "Cardiomegaly"), image_size=SPEC.image_size)
    _, y = next(iter(make_loader(train_ds, spec, train=False, batch_size=5)))
    expected = _labels(train_ds)[:5][:, [CHEXPERT_LABELS.index("Edema"), CHEXPERT_LABELS.index("Cardiomegaly")]]
    np.testing.assert_array_equal(y.numpy(), expected.astype(np.float32))


def test_train_loader_is_reproducible_with_and_without_workers(train_ds: datasets.Dataset) -> None:
    def run(workers: int, seed: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        loader = make_loader(train_ds, SPEC, train=True, batch_size=16, workers=workers, seed=seed)
        epochs = []
        for epoch in (0, 1):
            set_loader_epoch(loader, epoch)
            epochs.append(_batches(loader))
        return epochs

    serial = run(0, seed=11)
    assert all(_pair_equal(a, b) for a, b in zip(serial[0], run(0, seed=11)[0], strict=True))
    parallel = run(2, seed=11)
    for epoch in (0, 1):
        assert all(_pair_equal(a, b) for a, b in zip(serial[epoch], parallel[epoch], strict=True))
    # A new epoch reshuffles and re-augments; another seed gives another run.
    assert not _pair_equal(serial[0][0], serial[1][0])
    assert not _pair_equal(serial[0][0], run(0, seed=12)[0][0])
    # Each epoch visits every item once, in a shuffled order.
    shuffled = torch.cat([y for _, y in serial[0]])
    in_order = torch.from_numpy(_labels(train_ds)).float()
    assert not torch.equal(shuffled, in_order)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, in_order.tolist()))


# --- Hugging Face Hub (the hub itself cannot exist here: load_dataset is replaced by a local dataset) ---


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 50), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hub_dataset_gets_the_same_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = datasets.Dataset.from_dict(
        {
            "image": [
                {"bytes": _png(40 * i), "path": f"small/train/patient0000{i}/study1/view1.jpg"} for i in range(4)
            ],
            "Frontal/Lateral": ["Frontal", "Frontal", "Lateral", "Frontal"],
            "AP/PA": ["AP", "PA", "", "PA"],
            "Edema": [1.0, -1.0, None, None],
            "Cardiomegaly": [0.0, None, 1.0, -1.0],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "Frontal/Lateral": datasets.Value("string"),
                "AP/PA": datasets.Value("string"),
                "Edema": datasets.Value("float32"),
                "Cardiomegaly": datasets.Value("float32"),
            }
        ),
    )
    calls: list[tuple[object, ...]] = []

    def fake_load_dataset(repo_id: str, *, split: str, revision: str | None) -> datasets.Dataset:
        calls.append((repo_id, split, revision))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_chexpert_hub("someone/chexpert", "train", policy=parse_uncertain_policy("ignore"))
    assert calls == [("someone/chexpert", "train", None)]
    assert ds.column_names == ["image", "path", "patient_id", "labels"]
    assert ds.features["image"] == datasets.Image(decode=False)
    assert list(ds["patient_id"]) == ["patient00000", "patient00001", "patient00003"]
    assert dataset_annotated_labels(ds) == ("Cardiomegaly", "Edema")
    labels = _labels(ds)
    edema, cardiomegaly = CHEXPERT_LABELS.index("Edema"), CHEXPERT_LABELS.index("Cardiomegaly")
    np.testing.assert_array_equal(labels[:, [edema, cardiomegaly]], [[1.0, 0.0], [math.nan, 0.0], [0.0, math.nan]])
    others = [j for j in range(len(CHEXPERT_LABELS)) if j not in (edema, cardiomegaly)]
    assert np.isnan(labels[:, others]).all()
    x, _ = next(iter(make_loader(ds, SPEC, train=False, batch_size=3)))
    assert torch.equal(x[2], preprocess(decode_image(_png(120)), SPEC))


def test_hub_offline_error_is_actionable(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(repo_id: str, **kwargs: object) -> datasets.Dataset:
        raise ConnectionError(f"Couldn't reach {repo_id!r} on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="load_chexpert") as caught:
        load_chexpert_hub("someone/chexpert", "train")
    assert "OfflineModeIsEnabled" in str(caught.value)


# --- real data ------------------------------------------------------------------------------------


def test_nih_sample_marks_unannotated_labels_unknown() -> None:
    csv_path = SHARED_DATA / "nih-cxr14-sample" / "train.csv"
    if not csv_path.is_file():
        pytest.skip(f"real data {csv_path} is absent (only present on the project's machines)")
    ds = load_chexpert(csv_path)
    assert len(ds) == 233
    annotated = dataset_annotated_labels(ds)
    assert annotated == annotated_labels(csv_path) == tuple(lb for lb in CHEXPERT_LABELS if lb not in NIH_ABSENT)
    labels = _labels(ds)
    absent = [CHEXPERT_LABELS.index(lb) for lb in NIH_ABSENT]
    assert np.isnan(labels[:, absent]).all()
    assert not np.isnan(labels[:, [CHEXPERT_LABELS.index(lb) for lb in annotated]]).any()
    assert ds[0]["patient_id"] == parse_patient_id(ds[0]["path"]) and ds[0]["patient_id"].isdigit()
    x, y = next(iter(make_loader(ds, SPEC, train=True, batch_size=4)))
    assert x.shape == (4, 1, SPEC.image_size, SPEC.image_size) and torch.isfinite(x).all()
    assert y.shape == (4, len(CHEXPERT_LABELS)) and y[:, absent].isnan().all()
