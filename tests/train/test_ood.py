"""Fitting the out-of-distribution gate: the estimator, the grouped folds and threshold, the CLI and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from bayesnet import ModelSpec, build_model, decode_image, load_checkpoint, save_checkpoint
from bayesnet.checkpoint import SPEC_FILE, WEIGHTS_FILE, sha256_file
from bayesnet.ood import hellinger as torch_hellinger
from bayesnet.ood import load_ood_gate, save_ood_gate
from train.__main__ import main
from train.card import OOD_HEADING, with_ood_section
from train.ood import (
    CT_INSTANCES,
    CT_WINDOWS,
    GateRecipe,
    Reference,
    auroc,
    calibrate_threshold,
    evaluate,
    fit_gate,
    fit_ood,
    folder_films,
    grouped_folds,
    hellinger,
    probe_images,
)
from train.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "demo"
NIH = REPO.parent / "shared" / "data" / "nih-cxr14-sample"
OOD_GATE_BUDGET_BYTES = 1024 * 1024


def _low_rank(n: int, seed: int) -> np.ndarray:
    """Points near a 4-dimensional subspace of R^40 (what radiograph features look like to the gate)."""
    rng = np.random.default_rng(seed)
    axes = np.linalg.qr(np.random.default_rng(99).normal(size=(40, 4)))[0]
    return rng.normal(size=(n, 4)) * [5.0, 4.0, 3.0, 2.0] @ axes.T + 0.05 * rng.normal(size=(n, 40))


@pytest.mark.parametrize("kind", ["residual", "subspace", "combined"])
def test_fit_gate_separates_points_off_the_training_subspace(kind: str) -> None:
    train, valid = _low_rank(200, 0), _low_rank(50, 1)
    outliers = np.random.default_rng(2).normal(size=(30, 40)) * 3.0 + (0.0 if kind == "residual" else 8.0)
    fitted = fit_gate(train, dims=4, kind=kind, feature_map="none")  # type: ignore[arg-type]
    assert fitted.basis.shape == (40, 4)
    np.testing.assert_allclose(fitted.basis.T @ fitted.basis, np.eye(4), atol=1e-10)
    assert auroc(fitted.score(valid), fitted.score(outliers)) > 0.95
    # The stored gate (torch, float32) scores what the fit (numpy, float64) scores.
    gate = fitted.gate(threshold=calibrate_threshold(fitted.score(valid)))
    np.testing.assert_allclose(gate.score(torch.from_numpy(valid)).numpy(), fitted.score(valid), rtol=1e-4)


def test_combined_weight_balances_the_two_parts_on_the_training_images() -> None:
    train = _low_rank(200, 0)
    fitted = fit_gate(train, dims=4, kind="combined", feature_map="none")
    centred = train - fitted.mean
    coords = centred @ fitted.basis
    inside = np.einsum("nk,kj,nj->n", coords, fitted.precision, coords)
    outside = (centred**2).sum(axis=1) - (coords**2).sum(axis=1)
    assert fitted.residual_weight * outside.mean() == pytest.approx(inside.mean())


def test_fit_gate_needs_images_and_caps_the_dimension() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fit_gate(np.zeros((1, 8)), dims=4)
    assert fit_gate(_low_rank(6, 0), dims=64).basis.shape == (40, 5)


def test_hellinger_gate_fits_and_scores_as_the_torch_gate_does() -> None:
    features = np.abs(_low_rank(60, 0))  # non-negative, like pooled ReLU6 features
    fitted = fit_gate(features, dims=4)
    assert fitted.feature_map == "hellinger" and fitted.method == "hellinger-pca-residual"
    torch.testing.assert_close(
        torch_hellinger(torch.from_numpy(features)), torch.from_numpy(hellinger(features)).float()
    )
    gate = fitted.gate(threshold=1.0)
    assert gate.spec.method == "hellinger-pca-residual"
    np.testing.assert_allclose(gate.score(torch.from_numpy(features)).numpy(), fitted.score(features), atol=1e-6)


def _reference(patients: list[str], sources: list[str], seed: int = 0) -> Reference:
    features = _low_rank(len(patients), seed)
    names = np.array([f"film{i}" for i in range(len(patients))])
    return Reference(features, np.zeros((0, *features.shape)), np.array(patients), np.array(sources), names)


def test_grouped_folds_never_split_a_patient_and_test_every_film_once() -> None:
    patients = [f"p{i // 3}" for i in range(45)]  # 15 patients with 3 films each
    sources = ["a" if i < 30 else "b" for i in range(45)]
    ref = _reference(patients, sources)
    tested = []
    for fit, test in grouped_folds(ref, 5, seed=0):
        assert not set(ref.patients[fit]) & set(ref.patients[test])
        assert {"a", "b"} <= set(ref.sources[test])  # stratified by source
        tested.extend(test.tolist())
    assert sorted(tested) == list(range(45))
    assert len(list(grouped_folds(_reference(["x", "y", "y"], ["a"] * 3), 5, seed=0))) == 2  # capped at patients
    with pytest.raises(ValueError, match="at least 2 patients"):
        list(grouped_folds(_reference(["x", "x"], ["a", "a"]), 5, seed=0))


def test_threshold_comes_from_scores_of_films_left_out_of_the_fit() -> None:
    ref = _reference([f"p{i}" for i in range(80)], ["a"] * 80)
    recipe = GateRecipe(dims=4, feature_map="none", quantile=0.9)
    fitted, threshold, crossfit = recipe.fit(ref)
    assert threshold == pytest.approx(np.quantile(crossfit, 0.9))
    # A subspace fitted on a film explains it better than one fitted without it: in-sample scores are lower.
    assert fitted.score(ref.features).mean() < crossfit.mean()
    _, with_margin, _ = GateRecipe(dims=4, feature_map="none", quantile=0.9, margin=1.5).fit(ref)
    assert with_margin == pytest.approx(1.5 * threshold)


def test_evaluation_counts_held_out_films_per_source_and_probes_per_kind() -> None:
    ref = _reference([f"p{i}" for i in range(60)], ["a"] * 40 + ["b"] * 20)
    probes = 3.0 * np.random.default_rng(5).normal(size=(6, 40))  # off the films' subspace
    kinds = ["photo"] * 4 + ["ct"] * 2
    result = evaluate(GateRecipe(dims=4, feature_map="none", folds=4), ref, probes, kinds, ref.features[:2])
    assert len(result["folds"]) == 4
    assert result["held_out_flagged"]["a"][1] == 40 and result["held_out_flagged"]["b"][1] == 20
    assert result["held_out_flagged_total"][0] <= 4  # about 1% by construction, on 60 films
    assert result["non_chest_caught"] == {"photo": [16, 16], "ct": [8, 8]}
    assert [row["held_out"] for row in result["new_source"]] == ["a", "b"]
    assert result["new_source"][1]["flagged"][1] == 20


def test_threshold_is_the_quantile_and_auroc_matches_sklearn() -> None:
    scores = np.arange(1.0, 101.0)
    assert calibrate_threshold(scores, 0.99) == pytest.approx(99.01)
    rng = np.random.default_rng(0)
    inside, outside = rng.normal(size=40), rng.normal(1.0, size=25)
    outside[:3] = inside[:3]  # ties count half, as in sklearn
    expected = roc_auc_score(np.r_[np.zeros(40), np.ones(25)], np.r_[inside, outside])
    assert auroc(inside, outside) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least one"):
        calibrate_threshold(np.array([]))


@pytest.mark.slow  # renders every probe: make test, not make test-fast
def test_probes_are_uploadable_non_radiographs() -> None:
    probes = probe_images(seed=0)
    kinds = {p.kind for p in probes}
    assert {"photo", "radiograph-other", "ct", "noise", "shapes"} <= kinds
    names = {p.name for p in probes}
    assert {"pydicom-RG3-tibia", "pydicom-RG3-tibia-j2k", "skimage-chelsea"} <= names
    ct = [p for p in probes if p.kind == "ct" and p.name.startswith("pydicom-")]
    for instance in CT_INSTANCES:  # every CT instance, rendered in most of the windows (not twice the same)
        renderings = [p for p in ct if p.name.startswith(f"pydicom-{instance.removesuffix('.dcm')}-")]
        assert len(CT_WINDOWS) - 1 <= len(renderings) <= len(CT_WINDOWS), instance
    assert len({p.data for p in ct}) == len(ct)
    for probe in probes:
        image = decode_image(probe.data)
        assert min(image.width, image.height) >= 32, probe.name
    assert [p.data for p in probe_images(seed=0)] == [p.data for p in probes]  # deterministic bytes


CARD = "# Model card\n\n## Measured performance\nnumbers\n\n## Limitations\nsmall data\n"
REPORT = {
    "method": "squared distance from a subspace",
    "threshold": 71.4,
    "threshold_quantile": 0.99,
    "n_train": 233,
    "n_valid": 60,
    "train_csv": "train.csv",
    "valid_csv": "valid.csv",
    "auroc": 1.0,
    "valid_accepted": 0.983,
    "train_accepted": 1.0,
    "n_outliers": 33,
    "outliers_flagged": 1.0,
    "lowest_outlier_over_threshold": 1.11,
    "flagged_by_kind": {"photo": "21/21"},
    "missed": [],
    "variants": [{"kind": "residual", "dims": 64, "auroc": 1.0, "outliers_flagged": 1.0}],
}


def test_card_section_goes_before_limitations_and_is_replaced_not_repeated() -> None:
    once = with_ood_section(CARD, REPORT)
    assert once.index(OOD_HEADING) < once.index("## Limitations") and "small data" in once
    assert "AUROC" in once and "1.000" in once and "71.40" in once and "lateral" in once
    twice = with_ood_section(once, {**REPORT, "threshold": 80.0})
    assert twice.count(OOD_HEADING) == 1 and "80.00" in twice and "71.40" not in twice
    assert twice.endswith("## Limitations\nsmall data\n")


def _film_folder(root: Path, images: list[Path]) -> Path:
    """A film folder in the other-sites layout: the images and a labels.csv naming each one's patient."""
    root.mkdir()
    rows = ["file,modality,view,patientid"]
    for i, image in enumerate(images):
        (root / f"{i:03d}.png").write_bytes(image.read_bytes())
        rows.append(f"{i:03d}.png,X-ray,PA,{i // 2}")  # two films per patient
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_cli_validates_and_fits_a_gate_on_a_tiny_model_without_touching_its_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "synth"
    generate(data, n=15, seed=0, image_size=64)
    folder = _film_folder(tmp_path / "site-b", sorted((data / "train").rglob("*.png"))[:6])
    torch.manual_seed(0)
    spec = ModelSpec(arch="test_efficientnet", image_size=64, provenance="trained: test fixture")
    checkpoint = save_checkpoint(build_model(spec), None, tmp_path / "ckpt")
    (checkpoint / "MODEL_CARD.md").write_text(CARD)
    weights, card = sha256_file(checkpoint / WEIGHTS_FILE), (checkpoint / "MODEL_CARD.md").read_text()
    argv = [
        "ood",
        "--checkpoint",
        str(checkpoint),
        "--train",
        str(data / "train.csv"),
        "--valid",
        str(data / "valid.csv"),
    ]
    argv += ["--films", str(folder), "--dims", "8", "--folds", "3", "--no-compare"]
    assert main([*argv, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "fold | fit films | threshold" in dry and "not written (--dry-run)" in dry
    assert "site-b left out (a new site)" in dry
    assert (checkpoint / "MODEL_CARD.md").read_text() == card and not (checkpoint / "ood.safetensors").exists()

    assert main(argv) == 0
    assert "ood: threshold" in capsys.readouterr().out
    assert sha256_file(checkpoint / WEIGHTS_FILE) == weights
    _, loaded = load_checkpoint(checkpoint)
    assert loaded.ood is not None and loaded.ood.dims == 8 and loaded.ood.method == "hellinger-pca-residual"
    gate = load_ood_gate(checkpoint, loaded)
    assert gate is not None and gate.threshold == loaded.ood.threshold
    report = json.loads((checkpoint / SPEC_FILE).read_text())["metadata"]["ood"]
    assert report["n_train"] == 21 and report["sources"] == {"synth": 15, "site-b": 6} and "variants" not in report
    assert report["n_valid"] == 21 and len(report["validation"]["folds"]) == 3
    assert report["n_patients"] == 15 + 3
    written = (checkpoint / "MODEL_CARD.md").read_text()
    assert written.count(OOD_HEADING) == 1 and f"{loaded.ood.threshold:.4f}" in written
    again = with_ood_section(written, report)  # replaced, not repeated
    assert again.count(OOD_HEADING) == 1 and with_ood_section(again, report) == again
    assert written.index(OOD_HEADING) < written.index("## Limitations")


def test_film_folders_need_their_labels_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"labels\.csv"):
        folder_films(tmp_path)
    (tmp_path / "labels.csv").write_text("file,patientid\nmissing.png,1\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        folder_films(tmp_path)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("file,patientid\na.png,\n")
    assert [f.patient for f in folder_films(tmp_path)] == [f"{tmp_path.name}/a.png"]  # no patient: its own


@pytest.mark.slow
def test_demo_model_gate_refit_on_a_subset_separates_radiographs_from_the_rest(tmp_path: Path) -> None:
    if not (DEMO / SPEC_FILE).is_file() or not (NIH / "valid.csv").is_file():
        pytest.skip("needs models/demo and the NIH sample in ../shared")
    demo_json = (DEMO / SPEC_FILE).read_bytes()
    # A 12-film validation CSV beside the real images (CSV paths are relative to the folder's parent).
    subset = tmp_path / "data" / NIH.name
    subset.mkdir(parents=True)
    (subset / "images").symlink_to(NIH / "images")
    lines = (NIH / "valid.csv").read_text().splitlines()
    (subset / "valid.csv").write_text("\n".join(lines[:13]) + "\n")
    out = tmp_path / "gated"
    recipe = GateRecipe(dims=8)
    report = fit_ood(
        DEMO, NIH / "train.csv", subset / "valid.csv", out=out, recipe=recipe, max_train_samples=24, compare=False
    )
    assert (DEMO / SPEC_FILE).read_bytes() == demo_json  # the shipped model is left alone
    assert sha256_file(out / WEIGHTS_FILE) == sha256_file(DEMO / WEIGHTS_FILE)
    children = report.get("children_left_out", {}).get("n", 0)  # the reference is adult films
    assert report["n_train"] + children == 36 and report["n_valid"] == report["n_train"]
    assert report["auroc"] > 0.9
    assert report["outliers_flagged"] > 0.8
    card = (out / "MODEL_CARD.md").read_text()
    assert card.count(OOD_HEADING) == 1 and f"{report['threshold']:.4f}" in card
    _, spec = load_checkpoint(out)
    assert spec.ood is not None and spec.ood.threshold == pytest.approx(report["threshold"])


def test_shipped_demo_model_has_a_gate_within_the_size_budget() -> None:
    if not (DEMO / SPEC_FILE).is_file():
        pytest.skip("models/demo has not been trained yet (make demo-model)")
    _, spec = load_checkpoint(DEMO)
    assert spec.ood is not None, "run: python -m train ood --checkpoint models/demo (see Makefile demo-model)"
    assert load_ood_gate(DEMO, spec) is not None
    assert spec.ood.method == "hellinger-pca-residual"
    sizes = [f.stat().st_size for f in DEMO.iterdir()]
    assert sum(sizes) < 10 * 1024 * 1024 and max(sizes) < 10 * 1024 * 1024
    assert (DEMO / spec.ood.file).stat().st_size < OOD_GATE_BUDGET_BYTES
    card = (DEMO / "MODEL_CARD.md").read_text()
    assert OOD_HEADING in card and f"{spec.ood.threshold:.4f}" in card


def test_export_carries_the_gate_and_its_card_section(tmp_path: Path) -> None:
    from train.card import export

    torch.manual_seed(0)
    spec = ModelSpec(arch="test_efficientnet", image_size=64, name="tiny", version="1")
    model = build_model(spec)
    checkpoint = save_checkpoint(model, None, tmp_path / "ckpt")
    fitted = fit_gate(np.random.default_rng(0).normal(size=(20, model.num_features)), dims=4)
    save_ood_gate(checkpoint, fitted.gate(threshold=71.4), metadata={"ood": REPORT})
    report = tmp_path / "report"
    report.mkdir()
    metrics = {
        "model": {"name": "tiny", "version": "1", "arch": "test_efficientnet"},
        "auc_mc": {"Edema": 0.8},
        "auc_mc_ci": {"lo": {"Edema": 0.7}, "hi": {"Edema": 0.9}},
        "auc_det": {"Edema": 0.8},
        "ece_before": {"Edema": 0.1},
        "ece_after": {"Edema": 0.05},
        "untrained_labels": [],
        "mc_samples": 20,
        "data": "valid.csv",
        "n_images": 10,
        "bootstrap": {"n": 10},
        "ece_bins": "15 equal-width bins on [0, 1]",
        "temperature_source": "fitted",
        "mean_auc_mc": 0.8,
        "mean_auc_det": 0.8,
        "mean_ece_before": 0.1,
        "mean_ece_after": 0.05,
    }
    (report / "metrics.json").write_text(json.dumps(metrics))
    out = export(checkpoint, report, tmp_path / "exported", data_notes="synthetic", training_notes="none")
    _, exported = load_checkpoint(out)
    assert exported.ood is not None and load_ood_gate(out, exported) is not None
    assert OOD_HEADING in (out / "MODEL_CARD.md").read_text()
