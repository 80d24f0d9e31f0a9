"""``python -m service.archive``: archive scoring without HTTP, on real radiographs and a real tiny checkpoint."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from bayesnet import ModelSpec, build_model, save_checkpoint
from service.archive import (
    ArchiveScorer,
    BatchInputError,
    DistInfo,
    LogProgress,
    ResultsFileError,
    ScoreItem,
    build_parser,
    list_inputs,
    repair_torn_tail,
    request_id_for,
    run,
)
from service.runtime.loading import load_model
from service.runtime.predictor import Predictor
from service.schemas import ModelRef, PredictionResponse
from service.settings import Settings
from tests.service.live import LiveServer, live_server, tiny_settings

REPO = Path(__file__).resolve().parents[2]
FILMS = ("00000129_000.png", "00000211_000.png", "00000075_000.png")
DICOM = "siim-chest-cr-jpeg-baseline.dcm"


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """Real films (one in a subfolder), a suffix-less DICOM, a truncated PNG, text named .png, a README."""
    root = tmp_path_factory.mktemp("archive")
    images = shared_data / "nih-cxr14-sample" / "images"
    shutil.copy(images / FILMS[0], root / FILMS[0])
    shutil.copy(images / FILMS[1], root / FILMS[1])
    (root / "ward" / ".cache").mkdir(parents=True)
    shutil.copy(images / FILMS[2], root / "ward" / FILMS[2])
    shutil.copy(images / FILMS[2], root / "ward" / ".cache" / FILMS[2])  # hidden: not scored
    shutil.copy(shared_data / "originals" / DICOM, root / "ward" / "IM0001")  # no suffix: sniffed as DICOM
    (root / "damaged.png").write_bytes((images / FILMS[1]).read_bytes()[:4000])
    (root / "notes.png").write_text("pleural effusion on the left, see previous\n")
    (root / "README.txt").write_text("not an image and not named like one\n")
    return root


SCORED_KEYS = {FILMS[0], FILMS[1], f"ward/{FILMS[2]}", "ward/IM0001", "damaged.png", "notes.png"}


def score(source: Path, out: Path, checkpoint: Path, *extra: str) -> None:
    """The command's work in this process (``main`` would reconfigure logging for the whole test session)."""
    argv = ["--input", str(source), "--out", str(out), "--model", str(checkpoint), "--batch-size", "2", *extra]
    run(build_parser().parse_args(argv), DistInfo(0, 1, 0))


@pytest.fixture(scope="module")
def scored(archive: Path, tiny_service_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scored") / "results.jsonl"
    score(archive, out, tiny_service_checkpoint, "--cams", "auto")
    return out


def test_folder_scores_every_film_and_records_bad_files(scored: Path) -> None:
    lines = read_lines(scored)
    assert Counter(line["path"] for line in lines) == Counter(SCORED_KEYS)
    by_path = {line["path"]: line for line in lines}
    assert by_path["damaged.png"]["ok"] is False
    assert by_path["damaged.png"]["error"]["type"] == "TruncatedImageError"  # type: ignore[index]
    assert by_path["notes.png"]["error"]["type"] == "NotAnImageError"  # type: ignore[index]
    for key in SCORED_KEYS - {"damaged.png", "notes.png"}:
        assert by_path[key]["ok"] is True
        response = PredictionResponse.model_validate(by_path[key]["result"])
        assert response.request_id == request_id_for(key)
        assert response.model.name == "tiny-test-model"
        assert set(response.predictions) == set(ModelSpec().labels) - {"Fracture"}
    dicom = PredictionResponse.model_validate(by_path["ward/IM0001"]["result"])
    assert (dicom.image.format, dicom.image.width, dicom.image.height) == ("dicom", 1024, 1024)


def test_no_patient_identifier_from_dicom_headers_is_written(scored: Path, shared_data: Path) -> None:
    header = pydicom.dcmread(shared_data / "originals" / DICOM, stop_before_pixels=True)
    identifiers = [str(header.get(tag) or "") for tag in ("PatientID", "PatientName", "StudyInstanceUID")]
    assert all(identifiers), "the test film should carry identifiers to look for"
    text = scored.read_text()
    assert not [value for value in identifiers if value in text]


def test_resume_skips_done_paths_and_repairs_a_torn_line(
    archive: Path, scored: Path, tiny_service_checkpoint: Path, tmp_path: Path
) -> None:
    complete = scored.read_text().splitlines(keepends=True)
    out = tmp_path / "results.jsonl"
    out.write_text("".join(complete[:3]) + complete[3][: len(complete[3]) // 2])  # killed mid-write
    score(archive, out, tiny_service_checkpoint)
    lines = out.read_text().splitlines(keepends=True)
    assert lines[:3] == complete[:3]  # kept verbatim, not scored again
    assert Counter(json.loads(line)["path"] for line in lines) == Counter(SCORED_KEYS)

    before = out.read_bytes()
    score(archive, out, tiny_service_checkpoint)  # nothing left to do
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        (b"", b""),
        (b"no newline at all", b""),
        (b"a\nbcdefghij", b"a\n"),
        (b"a\nb\n", b"a\nb\n"),
        (b"x\n" * 5 + b"yy", b"x\n" * 5),
    ],
)
def test_torn_tail_repair_scans_back_across_chunks(tmp_path: Path, content: bytes, kept: bytes) -> None:
    out = tmp_path / "results.jsonl"
    out.write_bytes(content)
    repair_torn_tail(out, chunk_bytes=3)
    assert out.read_bytes() == kept


def test_a_damaged_line_inside_the_output_stops_the_run_untouched(
    archive: Path, scored: Path, tiny_service_checkpoint: Path, tmp_path: Path
) -> None:
    lines = scored.read_text().splitlines(keepends=True)
    out = tmp_path / "results.jsonl"
    out.write_text(lines[0] + "{not json\n" + lines[1])
    before = out.read_bytes()
    with pytest.raises(ResultsFileError, match=r"results.jsonl:2 is not a batch result line"):
        score(archive, out, tiny_service_checkpoint)
    assert out.read_bytes() == before


def test_csv_paths_resolve_against_the_parent_of_its_folder(
    shared_data: Path, tiny_service_checkpoint: Path, tmp_path: Path
) -> None:
    dataset = tmp_path / "CheXpert-small"
    (dataset / "valid").mkdir(parents=True)
    for film in FILMS[:2]:
        shutil.copy(shared_data / "nih-cxr14-sample" / "images" / film, dataset / "valid" / film)
    csv_path = dataset / "valid.csv"
    rows = [f"CheXpert-small/valid/{film},Female,60" for film in (*FILMS[:2], "missing.png")]
    csv_path.write_text("Path,Sex,Age\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out.jsonl"
    score(csv_path, out, tiny_service_checkpoint)
    by_path = {line["path"]: line for line in read_lines(out)}
    assert set(by_path) == {f"CheXpert-small/valid/{film}" for film in (*FILMS[:2], "missing.png")}
    assert by_path["CheXpert-small/valid/missing.png"]["error"]["type"] == "FileNotFoundError"  # type: ignore[index]
    assert all(by_path[f"CheXpert-small/valid/{film}"]["ok"] for film in FILMS[:2])


def test_text_list_and_bad_inputs(archive: Path, tmp_path: Path) -> None:
    listing = tmp_path / "films.txt"
    listing.write_text(f"# films to score\n\n{archive / FILMS[0]}\n{FILMS[1]}\n{FILMS[1]}\n")
    items = list_inputs(listing)
    assert [item.key for item in items] == sorted([str(archive / FILMS[0]), FILMS[1]])
    assert items[1].file == tmp_path / FILMS[1]  # relative to the list's folder
    (tmp_path / "labels.csv").write_text("Image,Finding\na.png,1\n")
    with pytest.raises(BatchInputError, match="no 'Path' column"):
        list_inputs(tmp_path / "labels.csv")
    with pytest.raises(BatchInputError, match="does not exist"):
        list_inputs(tmp_path / "nowhere")


def test_a_batch_failing_in_the_model_fails_only_its_files(
    archive: Path, tiny_service_checkpoint: Path, tmp_path: Path
) -> None:
    loaded = load_model(Settings(model_path=tiny_service_checkpoint))
    predictor = Predictor(loaded.model, loaded.spec, device=torch.device("cpu"))
    real_run, calls = predictor.run, []

    def fail_first_batch(requests):  # type: ignore[no-untyped-def]
        calls.append(len(requests))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (injected)")
        return real_run(requests)

    predictor.run = fail_first_batch  # type: ignore[method-assign]
    scorer = ArchiveScorer(
        predictor,
        ModelRef(name="m", version="1", sha256="x"),
        n_samples=4,
        cams=(),
        batch_size=2,
        decode_workers=2,
        max_pixels=50_000_000,
    )
    items = [ScoreItem(key, archive / key) for key in (FILMS[0], FILMS[1], f"ward/{FILMS[2]}", "notes.png")]
    out = tmp_path / "out.jsonl"
    with out.open("w") as handle:
        summary = scorer.score(items, handle, LogProgress(len(items)))
    by_path = {line["path"]: line for line in read_lines(out)}
    assert calls == [2, 1]
    assert (summary.scored, summary.failed) == (1, 3)
    assert [by_path[key]["error"]["type"] for key in FILMS[:2]] == ["RuntimeError", "RuntimeError"]  # type: ignore[index]
    assert by_path[f"ward/{FILMS[2]}"]["ok"] is True


@pytest.fixture(scope="module")
def deterministic_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dropout 0: the MC samples coincide, so HTTP and batch scoring must give the same numbers."""
    spec = ModelSpec(
        arch="test_efficientnet", image_size=64, dropout=0.0, name="det", version="1", provenance="trained: test"
    )
    torch.manual_seed(3)
    return save_checkpoint(build_model(spec), None, tmp_path_factory.mktemp("det") / "ckpt")


@pytest.fixture(scope="module")
def deterministic_server(deterministic_checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(tiny_settings(deterministic_checkpoint)) as live:
        yield live


def heatmap_pixels(png_base64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))), dtype=np.int16)


def test_a_csvs_age_and_view_declare_the_films_population_as_a_client_does_over_http(
    shared_data: Path, tiny_service_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = tmp_path / "site"
    (dataset / "films").mkdir(parents=True)
    films = sorted(path.name for path in (shared_data / "nih-cxr14-sample" / "images").glob("*.png"))[:4]
    for film in films:
        shutil.copy(shared_data / "nih-cxr14-sample" / "images" / film, dataset / "films" / film)
    declared = [("54", "Frontal", "PA"), ("8", "Frontal", "AP"), ("61", "Lateral", ""), ("unknown", "", "PA")]
    rows = [f"site/films/{film},{age},{side},{view}" for film, (age, side, view) in zip(films, declared, strict=True)]
    csv_path = dataset / "films.csv"
    csv_path.write_text("Path,Age,Frontal/Lateral,AP/PA\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, logger="service.archive"):
        score(csv_path, out, tiny_service_checkpoint, "--cams", "auto")
    referral = {line["path"].split("/")[-1]: line["result"]["referral"] for line in read_lines(out)}  # type: ignore[index]
    adult, child, lateral, unreadable = (referral[film] for film in films)
    assert adult["population_verified"] and adult["population"] == []
    assert "population_unverified" not in adult["reasons"]
    assert child["population"] == ["paediatric"] and child["refer"]
    assert lateral["population"] == ["lateral_or_oblique_view"] and lateral["refer"]
    # "unknown" declares no age: the view alone does not verify the film, which is referred for that.
    assert not unreadable["population_verified"] and "population_unverified" in unreadable["reasons"]
    assert "1 rows of" in caplog.text


def test_results_equal_the_http_service(
    archive: Path, deterministic_checkpoint: Path, deterministic_server: LiveServer, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    score(archive, out, deterministic_checkpoint, "--cams", "all", "--mc-samples", "5")
    batch = {line["path"]: PredictionResponse.model_validate(line["result"]) for line in read_lines(out) if line["ok"]}
    with deterministic_server.client() as http:
        for key in (FILMS[0], "ward/IM0001"):
            reply = http.post(
                "/v1/predict",
                params={"cams": "all", "mc_samples": 5},
                files={"file": ("upload", (archive / key).read_bytes())},
            )
            assert reply.status_code == 200, reply.text
            served, mine = PredictionResponse.model_validate(reply.json()), batch[key]
            assert (mine.model, mine.mc_samples, mine.image, mine.uncertain, mine.ood) == (
                served.model,
                served.mc_samples,
                served.image,
                served.uncertain,
                served.ood,
            )
            assert mine.predictions.keys() == served.predictions.keys()
            for label, prediction in served.predictions.items():
                assert mine.predictions[label].decision == prediction.decision
                assert mine.predictions[label].conf == pytest.approx(prediction.conf, abs=1e-5)
            assert mine.gradcam.keys() == served.gradcam.keys()
            for label, heatmap in served.gradcam.items():
                diff = np.abs(heatmap_pixels(mine.gradcam[label].png_base64) - heatmap_pixels(heatmap.png_base64))
                assert diff[..., 3].max() <= 1  # alpha = intensity: one 8-bit level of float rounding
                assert diff[..., :3].max() <= 3  # the colour ramp is three times steeper


@pytest.mark.parametrize("action", ["flag", "reject"])
def test_demo_model_gate_flags_or_rejects_an_off_target_film(shared_data: Path, tmp_path: Path, action: str) -> None:
    demo = REPO / "models" / "demo"
    tibia = get_testdata_file("RG3_UNCR.dcm")
    if not (demo / "ood.safetensors").is_file() or tibia is None:
        pytest.skip("needs the demo model's OOD gate and pydicom-data's RG3_UNCR.dcm (a tibia radiograph)")
    films = tmp_path / "films"
    films.mkdir()
    shutil.copy(shared_data / "nih-cxr14-sample" / "images" / FILMS[0], films / "chest.png")
    shutil.copy(tibia, films / "tibia.dcm")
    out = tmp_path / "out.jsonl"
    score(films, out, demo, "--mc-samples", "2", "--ood-action", action)
    by_path = {line["path"]: line for line in read_lines(out)}
    chest = PredictionResponse.model_validate(by_path["chest.png"]["result"])
    assert chest.ood is not None and chest.ood.in_distribution
    if action == "flag":
        flagged = PredictionResponse.model_validate(by_path["tibia.dcm"]["result"])
        assert flagged.ood is not None and not flagged.ood.in_distribution
        assert flagged.predictions  # flag mode keeps the predictions
    else:
        assert by_path["tibia.dcm"]["ok"] is False
        assert by_path["tibia.dcm"]["error"]["type"] == "OutOfDistributionError"  # type: ignore[index]


def test_scorer_imports_without_fastapi() -> None:
    blocker = "import sys; sys.modules.update(fastapi=None, starlette=None, uvicorn=None); import service.archive"
    completed = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_rank_environment_is_validated() -> None:
    assert DistInfo.from_env({}) == DistInfo(0, 1, 0)
    assert DistInfo.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistInfo(3, 4, 1)
    with pytest.raises(BatchInputError, match="not in"):
        DistInfo.from_env({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.slow
def test_torchrun_two_ranks_score_their_shards_and_merge(
    archive: Path, tiny_service_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.jsonl"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "service.archive", "--input", str(archive), "--out", str(out)),
        *("--model", str(tiny_service_checkpoint), "--batch-size", "2", "--torch-threads", "1"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert Counter(line["path"] for line in read_lines(out)) == Counter(SCORED_KEYS)
    assert not list(tmp_path.glob("results.rank*.jsonl"))  # merged and removed
    assert "rank 0/2: 3 files in this shard" in completed.stdout
    assert "rank 1/2: 3 files in this shard" in completed.stdout
