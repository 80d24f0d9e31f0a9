"""The synthetic CheXpert-layout dataset: layout, label coding, determinism, ground truth and the CLI."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bayesnet.labels import CHEXPERT_LABELS
from train.synthetic import GRID_CELLS, LAYOUT, PLANTED_FINDINGS, SyntheticPaths, generate, render_sample

REPO_ROOT = Path(__file__).resolve().parents[2]
N_PATIENTS = 60
IMAGE_SIZE = 64
SEED = 7
EXPECTED_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS, "Mask"]
PATH_PATTERN = re.compile(r"^synth/(train|valid)/patient(\d{5})/study1/view1_frontal\.png$")
DRAWN = {"1.0", "-1.0"}


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as file:
        return list(csv.DictReader(file))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    out_dir = tmp_path_factory.mktemp("first") / "synth"
    return generate(out_dir, N_PATIENTS, SEED, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def all_rows(dataset: SyntheticPaths) -> list[dict[str, str]]:
    return _rows(dataset.train_csv) + _rows(dataset.valid_csv)


def test_same_seed_writes_same_bytes_and_another_seed_does_not(dataset: SyntheticPaths, tmp_path: Path) -> None:
    again = generate(tmp_path / "again" / "synth", N_PATIENTS, SEED, image_size=IMAGE_SIZE)
    other = generate(tmp_path / "other" / "synth", N_PATIENTS, SEED + 1, image_size=IMAGE_SIZE)

    first_files = _tree_bytes(dataset.root)
    assert _tree_bytes(again.root) == first_files
    other_files = _tree_bytes(other.root)
    assert other_files.keys() == first_files.keys()
    assert other_files["train.csv"] != first_files["train.csv"]
    image = "train/patient00001/study1/view1_frontal.png"
    assert other_files[image] != first_files[image]


def test_csv_columns_and_label_coding(dataset: SyntheticPaths, all_rows: list[dict[str, str]]) -> None:
    for csv_path in (dataset.train_csv, dataset.valid_csv):
        with csv_path.open(newline="") as file:
            assert next(csv.reader(file)) == EXPECTED_COLUMNS
    for row in all_rows:
        assert row["Frontal/Lateral"] == "Frontal"
        assert row["AP/PA"] in {"AP", "PA"}
        assert row["Sex"] in {"Male", "Female"}
        assert 18 <= int(row["Age"]) <= 90
        assert {row[label] for label in PLANTED_FINDINGS} <= {"1.0", "0.0", "-1.0", ""}
        anything_drawn = any(row[label] in DRAWN for label in PLANTED_FINDINGS)
        assert row["No Finding"] == ("0.0" if anything_drawn else "1.0")

    values = np.array([[row[label] for label in PLANTED_FINDINGS] for row in all_rows])
    positive_share = np.mean(values == "1.0")
    uncertain_share = np.mean(values == "-1.0")
    blank_among_not_positive = np.mean(values[values != "1.0"] == "")
    assert 0.2 < positive_share < 0.4  # prevalence 0.3
    assert 0.02 < uncertain_share < 0.09  # about 5% uncertain
    assert 0.04 < blank_among_not_positive < 0.17  # about 10% of negatives left blank
    assert np.any(values == "0.0")


def test_no_finding_when_nothing_is_planted(tmp_path: Path) -> None:
    clean = generate(tmp_path / "synth", 5, SEED, image_size=IMAGE_SIZE, prevalence=0.0, uncertain_fraction=0.0)

    for row in _rows(clean.train_csv) + _rows(clean.valid_csv):
        assert row["No Finding"] == "1.0"
        assert {row[label] for label in PLANTED_FINDINGS} <= {"0.0", ""}
        label_map = _pixels(tmp_path / row["Mask"])
        assert not label_map.any()


def test_paths_are_relative_to_the_parent_and_files_exist(
    dataset: SyntheticPaths, all_rows: list[dict[str, str]]
) -> None:
    assert dataset.root.name == "synth"
    for row in all_rows:
        assert PATH_PATTERN.match(row["Path"]), row["Path"]
        assert row["Mask"] == "synth/masks/" + row["Path"].removeprefix("synth/")
        assert (dataset.root.parent / row["Path"]).is_file()
        assert (dataset.root.parent / row["Mask"]).is_file()


def test_images_and_label_maps_are_8bit_grayscale_pngs_of_the_requested_size(
    dataset: SyntheticPaths, all_rows: list[dict[str, str]]
) -> None:
    for row in all_rows:
        for column in ("Path", "Mask"):
            with Image.open(dataset.root.parent / row[column]) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "L", (IMAGE_SIZE, IMAGE_SIZE))


def _cell_bounds(label: str, size: int) -> tuple[int, int, int, int]:
    placement = LAYOUT[label]
    edges = [round(i * size / GRID_CELLS) for i in range(GRID_CELLS + 1)]
    return edges[placement.row], edges[placement.row + 1], edges[placement.col], edges[placement.col + 1]


def _assert_inside_own_cell(label_map: np.ndarray, label: str) -> None:
    """The finding's region is non-empty, large enough to see, and inside its own cell (so disjoint)."""
    size = label_map.shape[0]
    ys, xs = np.nonzero(label_map == CHEXPERT_LABELS.index(label))
    assert ys.size > 0, label
    top, bottom, left, right = _cell_bounds(label, size)
    assert top <= ys.min(), label
    assert ys.max() < bottom, label
    assert left <= xs.min(), label
    assert xs.max() < right, label
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 >= 0.16 * size, label


def test_label_maps_match_the_labels(dataset: SyntheticPaths, all_rows: list[dict[str, str]]) -> None:
    for row in all_rows:
        label_map = _pixels(dataset.root.parent / row["Mask"])
        assert set(np.unique(label_map).tolist()) <= set(range(len(CHEXPERT_LABELS)))
        for label in PLANTED_FINDINGS:
            if row[label] in DRAWN:
                _assert_inside_own_cell(label_map, label)
            else:
                assert not np.any(label_map == CHEXPERT_LABELS.index(label)), (row["Path"], label)


def test_all_findings_at_once_occupy_disjoint_cells() -> None:
    image, label_map = render_sample(np.random.default_rng(0), dict.fromkeys(PLANTED_FINDINGS, 1.0), 224)

    assert image.dtype == label_map.dtype == np.uint8
    assert image.shape == label_map.shape == (224, 224)
    # 0 is the background (No Finding's index), 1..13 the planted findings.
    assert set(np.unique(label_map).tolist()) == set(range(len(CHEXPERT_LABELS)))
    for label in PLANTED_FINDINGS:
        _assert_inside_own_cell(label_map, label)
    assert len({(p.row, p.col) for p in LAYOUT.values()}) == len(PLANTED_FINDINGS)
    assert len({p.texture for p in LAYOUT.values()}) == len(PLANTED_FINDINGS)


def test_patient_level_split(dataset: SyntheticPaths) -> None:
    def patients(csv_path: Path, split: str) -> set[str]:
        found = set()
        for row in _rows(csv_path):
            match = PATH_PATTERN.match(row["Path"])
            assert match is not None
            assert match.group(1) == split
            found.add(match.group(2))
        return found

    train, valid = patients(dataset.train_csv, "train"), patients(dataset.valid_csv, "valid")
    assert (dataset.n_train, dataset.n_valid) == (48, 12)
    assert (len(train), len(valid)) == (48, 12)
    assert not train & valid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_planted_pattern_changes_only_its_region_and_clearly(seed: int) -> None:
    """Same generator state, with and without one finding: the films differ only under its label map."""
    for label in PLANTED_FINDINGS:
        plain, _ = render_sample(np.random.default_rng(seed), {}, 128)
        planted, label_map = render_sample(np.random.default_rng(seed), {label: 1.0}, 128)
        faint, faint_map = render_sample(np.random.default_rng(seed), {label: -1.0}, 128)

        region = label_map == CHEXPERT_LABELS.index(label)
        np.testing.assert_array_equal(faint_map, label_map)
        np.testing.assert_array_equal(planted[~region], plain[~region])
        change = np.abs(planted.astype(np.float64) - plain)[region].mean()
        faint_change = np.abs(faint.astype(np.float64) - plain)[region].mean()
        assert change > 50.0, (label, change)  # grey levels out of 255
        assert 0.35 < faint_change / change < 0.65, (label, faint_change, change)


def test_textures_differ_from_each_other() -> None:
    """Cropped to their regions and resized alike, no two findings' patterns look the same."""
    image, label_map = render_sample(np.random.default_rng(3), dict.fromkeys(PLANTED_FINDINGS, 1.0), 128)
    crops = []
    for label in PLANTED_FINDINGS:
        ys, xs = np.nonzero(label_map == CHEXPERT_LABELS.index(label))
        crop = Image.fromarray(image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
        crops.append(np.asarray(crop.resize((24, 24), Image.Resampling.BILINEAR), dtype=np.float64))
    for i, first in enumerate(crops):
        for j in range(i + 1, len(crops)):
            distance = np.abs(first - crops[j]).mean()
            assert distance > 20.0, (PLANTED_FINDINGS[i], PLANTED_FINDINGS[j], distance)


def test_unknown_labels_and_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown finding"):
        render_sample(np.random.default_rng(0), {"Pneumonitis": 1.0})
    with pytest.raises(ValueError, match="n must be"):
        generate(tmp_path / "synth", 0, SEED)
    with pytest.raises(ValueError, match="valid_fraction"):
        generate(tmp_path / "synth", 5, SEED, valid_fraction=1.0)


def test_cli_writes_the_same_dataset_as_the_library(tmp_path: Path) -> None:
    out_dir = tmp_path / "cli" / "synth"
    args = ["--out", str(out_dir), "--n", "6", "--seed", "3", "--image-size", "48", "--valid-fraction", "0.5"]
    done = subprocess.run(
        [sys.executable, "-m", "train", "synth", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "3 train + 3 valid" in done.stdout
    library = generate(tmp_path / "lib" / "synth", 6, 3, image_size=48, valid_fraction=0.5)
    assert _tree_bytes(out_dir) == _tree_bytes(library.root)


def test_cli_module_imports_nothing_heavy() -> None:
    """``python -m train`` defers each command's imports to its handler: no numpy, torch or generator."""
    probe = "import sys, train.__main__; print(sorted({'numpy', 'torch', 'train.synthetic'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
