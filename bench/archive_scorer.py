"""Archive scoring without HTTP vs the HTTP service, on the same machine, the same model and the same films, in ONE run.

Prints images/s of
  (a) the archive scorer (``service.archive.ArchiveScorer``: decode-ahead thread pool, full batches, JSON lines
      written to a file), in this process after the model is loaded and warmed up;
  (b) the service over HTTP on loopback (a separate server process started as ``bench/serve.py`` does,
      with the service's default settings), 16 concurrent clients posting the same files;
for ``cams=none`` and ``cams=auto`` at T=20, and the ratio a/b; first the scorer alone at several batch sizes
(``--sweep``), which is how its default batch size was chosen. With ``--dicomweb``, also (c) the same films
wrapped as DICOM (explicit VR little endian) read from files, and (d) the same DICOM instances fetched from a local
Orthanc by WADO-RS (``--dicomweb``'s path: inventory by QIDO-RS, default ``CXR_PACS_*`` limits), cams=none: (c)
against (a) is what DICOM decoding costs, (d) against (c) what fetching from a PACS costs. Each measurement is
repeated (``--repeats``) alternating a and b, and the best of each is compared, because the machine may be shared.

    python bench/archive_scorer.py [--model DIR] [--device cpu|cuda] [--images 64] [--batch-size N] [--dicomweb]

The films are the real NIH sample in ../shared (512x512 PNG) when present, else synthetic films of the
same size. Absolute numbers depend on the machine; read the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from serve import free_port, load, radiographs, start_server

from bayesnet import tune_allocator
from service.archive import ArchiveScorer, LogProgress, ScoreItem, default_batch_size
from service.runtime.heatmaps import parse_cams
from service.runtime.loading import LoadedModel, build_predictor, load_model
from service.runtime.predictor import Predictor
from service.schemas import ModelRef
from service.settings import DEFAULT_MODEL_DIR, Settings

CLIENTS = 16


def batch_rate(scorer: ArchiveScorer, items: list[ScoreItem], out_dir: Path) -> float:
    """Images/s of one pass of the archive scorer over ``items`` (a fresh output file each time)."""
    out = out_dir / f"results-{time.monotonic_ns()}.jsonl"
    with out.open("w") as handle:
        summary = scorer.score(items, handle, LogProgress(len(items), every_s=1e9))
    if summary.failed:
        raise RuntimeError(f"{summary.failed} films failed in the archive scorer; see {out}")
    return summary.scored / summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, help="default: the scorer's default for the device")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sweep", default="8,16,32", help="batch sizes to time the scorer at (cams=none); '' skips")
    parser.add_argument("--dicomweb", action="store_true", help="also DICOM files and WADO-RS from a local Orthanc")
    args = parser.parse_args()
    tune_allocator()  # as the service, the archive scorer and train fit do at start-up (bayesnet/runtime.py)

    settings = Settings(model_path=args.model, device=args.device)
    loaded = load_model(settings)
    device = torch.device(args.device)
    args.batch_size = args.batch_size or default_batch_size(device, settings.max_batch_images)
    predictor = build_predictor(loaded, settings, device=device, max_batch=max([args.batch_size, *sweep_sizes(args)]))
    predictor.warmup()
    model_ref = ModelRef(name=loaded.spec.name, version=loaded.spec.version, sha256=loaded.sha256)
    films = radiographs(args.images)
    work = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    try:
        with pacs_items(films, work, enabled=args.dicomweb) as extra:
            measure(args, predictor, loaded, settings, model_ref, films, work, extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def pacs_items(films: list[bytes], work: Path, *, enabled: bool) -> Iterator[dict[str, list[ScoreItem]]]:
    """With ``enabled``: the films as DICOM files, and the same instances in a local Orthanc read by WADO-RS (the
    inventory built by QIDO-RS, as ``--dicomweb`` does); else nothing."""
    if not enabled:
        yield {}
        return
    import sys

    import numpy as np
    from PIL import Image
    from pydicom.uid import generate_uid

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ and tests/ as packages

    from bench.pacs_archive import Film, dicom_from_image, load_into_orthanc
    from service.archive.dicomweb import ArchiveQuery, WadoInstance, build_inventory, open_client, open_fetcher
    from service.settings import PacsSettings
    from tests.dicom.orthanc import orthanc

    study = generate_uid()
    dicoms = []
    for data in films:
        with Image.open(io.BytesIO(data)) as image:
            dicoms.append(dicom_from_image(np.asarray(image.convert("L")), study_uid=study))
    files = []
    for i, data in enumerate(dicoms):
        (work / f"film{i:04d}.dcm").write_bytes(data)
        files.append(ScoreItem(f"film{i:04d}.dcm", work / f"film{i:04d}.dcm"))
    pacs_dir = work / "orthanc"
    pacs_dir.mkdir()
    with orthanc(pacs_dir) as url:
        load_into_orthanc(url, [Film(data, None, str(i)) for i, data in enumerate(dicoms)])
        client = open_client(url, PacsSettings())
        rows = build_inventory(client, ArchiveQuery())
        fetcher = open_fetcher(client, PacsSettings())
        yield {"dicom files": files, "dicomweb": [ScoreItem(row.key, WadoInstance(fetcher, row)) for row in rows]}


def sweep_sizes(args: argparse.Namespace) -> list[int]:
    return [int(size) for size in args.sweep.split(",") if size.strip()]


def measure(
    args: argparse.Namespace,
    predictor: Predictor,
    loaded: LoadedModel,
    settings: Settings,
    model_ref: ModelRef,
    films: list[bytes],
    work: Path,
    extra: dict[str, list[ScoreItem]],
) -> None:
    """Write the films to ``work``, time the scorer and the server alternately, print the comparison."""
    batch_size = args.batch_size
    items = []
    for i, data in enumerate(films):
        (work / f"film{i:04d}.png").write_bytes(data)
        items.append(ScoreItem(f"film{i:04d}.png", work / f"film{i:04d}.png"))
    scorers = {
        cams: ArchiveScorer(
            predictor,
            model_ref,
            n_samples=loaded.spec.mc_samples,
            cams=parse_cams(cams, loaded.spec),
            batch_size=batch_size,
            decode_workers=settings.decode_workers,
            max_pixels=settings.max_pixels,
        )
        for cams in ("none", "auto")
    }
    per_client = max(1, args.images // CLIENTS)
    sweep = sweep_sizes(args)
    sweepers = {
        size: ArchiveScorer(
            predictor,
            model_ref,
            n_samples=loaded.spec.mc_samples,
            cams=(),
            batch_size=size,
            decode_workers=settings.decode_workers,
            max_pixels=settings.max_pixels,
        )
        for size in sweep
    }

    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-archive-serve-{port}.log"
    runs: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for size, scorer in sweepers.items():
            runs.setdefault(("sweep", str(size)), []).append(batch_rate(scorer, items[: CLIENTS * per_client], work))
        for cams, scorer in scorers.items():
            runs.setdefault(("batch", cams), []).append(batch_rate(scorer, items[: CLIENTS * per_client], work))
        for source, source_items in extra.items():
            runs.setdefault(("source", source), []).append(
                batch_rate(scorers["none"], source_items[: CLIENTS * per_client], work)
            )
        # The server runs only while it is measured, so it never competes with the archive scorer for the CPU.
        server = start_server(port, args.model, args.device, log_path)
        try:
            asyncio.run(load(port, films, 4, 2, "auto"))  # warm the server's allocator and thread pools
            for cams in scorers:
                result = asyncio.run(load(port, films, CLIENTS, per_client, cams))
                if result.errors:
                    raise RuntimeError(f"{result.errors} HTTP errors; see {log_path}")
                runs.setdefault(("http", cams), []).append(result.images_per_s)
        finally:
            server.terminate()
            server.wait(timeout=60)

    n = CLIENTS * per_client
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, model {loaded.spec.name} "
        f"({loaded.spec.arch}, {loaded.spec.image_size} px), T={loaded.spec.mc_samples}, {n} 512x512 PNG films, "
        f"best of {args.repeats} (every run in brackets)"
    )

    def runs_text(key: tuple[str, str]) -> str:
        return f"{max(runs[key]):.1f} [{', '.join(f'{rate:.1f}' for rate in runs[key])}]"

    if sweep:
        print(
            "archive scorer by batch size (cams=none): "
            + "; ".join(f"{s}: {runs_text(('sweep', str(s)))}" for s in sweep)
        )
    for cams in scorers:
        a, b = max(runs[("batch", cams)]), max(runs[("http", cams)])
        print(
            f"cams={cams}: archive scorer {runs_text(('batch', cams))} images/s; HTTP, 16 clients "
            f"{runs_text(('http', cams))} images/s; batch/HTTP = {a / b:.2f}"
        )
    png = max(runs[("batch", "none")])
    for source in extra:
        rate = max(runs[("source", source)])
        print(f"cams=none, {source}: archive scorer {runs_text(('source', source))} images/s; /PNG = {rate / png:.2f}")
    print(
        f"(archive scorer: batch size {batch_size}, {settings.decode_workers} decode threads; "
        f"server: max batch {settings.max_batch_images})"
    )


if __name__ == "__main__":
    main()
