"""Training end to end on the synthetic set: learns, resumes, and DDP (2 CPU processes, gloo) agrees."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bayesnet import load_checkpoint
from train.fit import FitConfig, fit, lr_factor, masked_bce, pos_weights
from train.synthetic import generate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    generate(root, n=600, seed=0, image_size=128, prevalence=0.3)
    return root


def quick_config(synth: Path, out: Path, **changes: object) -> FitConfig:
    values: dict[str, object] = {
        "train_csv": synth / "train.csv",
        "valid_csv": synth / "valid.csv",
        "out": out,
        "arch": "test_efficientnet",
        "init": "none",
        "epochs": 8,
        "batch_size": 32,
        "lr": 3e-3,
        "image_size": 128,
        "workers": 0,
        "progress": False,
        "patience": 10,
    }
    values.update(changes)
    return FitConfig(**values)  # type: ignore[arg-type]


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    f = [lr_factor(s, warmup_steps=10, total_steps=100, min_ratio=0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1)
    assert f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))
    assert lr_factor(100, warmup_steps=10, total_steps=100, min_ratio=0.01) == pytest.approx(0.01)


def test_masked_bce_ignores_unknown_targets() -> None:
    logits = torch.tensor([[2.0, -1.0, 5.0]])
    known = masked_bce(logits, torch.tensor([[1.0, 0.0, float("nan")]]))
    reference = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], torch.tensor([[1.0, 0.0]]))
    assert known.item() == pytest.approx(reference.item())
    assert masked_bce(logits, torch.full((1, 3), float("nan"))).item() == 0.0
    assert pos_weights(torch.tensor([0.1, 0.5, float("nan")]).numpy(), 5.0).tolist() == [5.0, 1.0, 1.0]


@pytest.mark.slow
def test_short_cpu_run_learns_the_synthetic_findings_and_resumes(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = fit(quick_config(synth, out))
    assert first.best_auc >= 0.95, first.history
    _, spec = load_checkpoint(out / "best")
    assert spec.arch == "test_efficientnet"
    assert spec.trained_labels == spec.labels  # the synthetic CSV annotates every label
    lines = (out / "history.jsonl").read_text().splitlines()
    assert len(lines) == 8
    assert set(json.loads(lines[-1])["valid_auc"]) == set(spec.labels)
    resumed = fit(quick_config(synth, out, epochs=9, resume=True))
    assert [h["epoch"] for h in resumed.history] == list(range(1, 10))
    assert resumed.epochs_run == 9


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_matches_one_process(synth: Path, tmp_path: Path) -> None:
    common = [
        "--train", str(synth / "train.csv"), "--valid", str(synth / "valid.csv"), "--arch", "test_efficientnet",
        "--init", "none", "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--image-size", "128",
        "--workers", "0", "--no-progress", "--seed", "1",
    ]  # fmt: skip
    single = tmp_path / "single"
    double = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "train", "fit", *common, "--out", str(single)], cwd=REPO, check=True, env=env)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "train", "fit", *common, "--out", str(double)],
        cwd=REPO, check=True, env=env,
    )  # fmt: skip
    one = [json.loads(line) for line in (single / "history.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (double / "history.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 2
    # Same data, same global batch; BatchNorm sees half batches per rank, so agreement is close, not exact.
    for a, b in zip(one, two, strict=True):
        assert math.isclose(a["valid_mean_auc"], b["valid_mean_auc"], abs_tol=0.05), (a, b)
    assert two[-1]["valid_mean_auc"] > 0.7  # and it learns
