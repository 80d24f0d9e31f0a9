"""The ``python -m service.archive`` command: its arguments, its settings, and one rank's run from input to output.

Arguments override the service's ``CXR_*`` settings (``load_settings``), so the scorer loads, decodes and
scores exactly as the server configured the same way would. The command exits with 2 on a bad input, a
damaged output file, a missing checkpoint or invalid settings, each reported in one log line.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import requests
import torch
from pydantic import ValidationError

from bayesnet import CheckpointError, tune_allocator
from service.archive.dicomweb import (
    ArchiveQuery,
    InventoryRow,
    PacsUnavailableError,
    WadoInstance,
    build_inventory,
    open_client,
    open_fetcher,
    read_inventory,
    skipped_by_reason,
    write_inventory,
)
from service.archive.forward import ResultForwarder, outbox_dir
from service.archive.inputs import BatchInputError, ScoreItem, list_inputs
from service.archive.progress import make_progress
from service.archive.results import ResultsFileError, repair_torn_tail
from service.archive.scorer import ArchiveScorer, ScoreSummary
from service.archive.sharding import (
    DistInfo,
    merge_shards,
    merge_when_all_done,
    pick_device,
    prepare_output,
    process_group,
    shard_files,
)
from service.archive.table import write_parquet
from service.runtime.heatmaps import CamSelectionError, parse_cams
from service.runtime.loading import LoadedModel, build_predictor, load_model
from service.settings import InvalidSettingsError, Settings, load_settings

__all__ = ["EXIT_PACS_UNAVAILABLE", "build_parser", "default_batch_size", "main", "merge", "run"]

#: Exit status when the PACS stops answering mid-run (``--dicomweb``): the films written stay; rerun to resume.
EXIT_PACS_UNAVAILABLE = 4

log = logging.getLogger("service.archive")  # the command's one logger name, whichever module writes the line


def default_batch_size(device: torch.device, max_batch_images: int) -> int:
    """Images per model call when ``--batch-size`` is not given.

    On a CPU, the server's ``max_batch_images`` (CXR_MAX_BATCH_IMAGES): small batches are fastest per image
    there. On a GPU, 64: larger batches keep the card busy. ``bench/archive_scorer.py --sweep`` measures both
    (docs/benchmarks.md, "Archive scoring vs the HTTP service").
    """
    return 64 if device.type == "cuda" else max_batch_images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.archive",
        description="Score a folder, CSV or list of radiographs, or a PACS over DICOMweb, with the service's model, "
        "no HTTP.",
        epilog="Defaults not given here come from the service's CXR_* settings. Inputs, output and resuming: "
        "python -m pydoc service.archive.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, help="directory, CSV with a Path column, or list file")
    source.add_argument(
        "--dicomweb",
        metavar="URL",
        help="a PACS's DICOMweb root: inventory by QIDO-RS, films by WADO-RS (credentials and limits: CXR_PACS_*)",
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines output (appended to; resumable)")
    pacs = parser.add_argument_group("with --dicomweb: which instances (QIDO-RS matching, ANDed)")
    pacs.add_argument("--modality", default="CR,DX", help="modalities, comma-separated (default CR,DX)")
    pacs.add_argument("--body-part", help="Body Part Examined to match (e.g. CHEST; * wildcards); default any")
    pacs.add_argument("--study-date", help="Study Date or DICOM range: 20260101-20261231, 20260101-, -20261231")
    pacs.add_argument("--accessions", type=Path, help="file of accession numbers, one per line")
    pacs.add_argument(
        "--inventory",
        type=Path,
        help="the inventory CSV: built first and reused by reruns and shards (default OUT.inventory.csv)",
    )
    pacs.add_argument(
        "--inventory-only", action="store_true", help="build the inventory and stop (before a sharded run)"
    )
    parser.add_argument("--model", type=Path, help="checkpoint directory (default models/demo, CXR_MODEL_PATH)")
    parser.add_argument("--device", help="auto (cuda:LOCAL_RANK under torchrun), cpu, cuda, cuda:N")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="images per model call (default: CXR_MAX_BATCH_IMAGES on a CPU, 64 on a GPU)",
    )
    parser.add_argument("--mc-samples", type=int, help="MC samples T (default the model's, CXR_MC_SAMPLES)")
    parser.add_argument(
        "--cams",
        default="none",
        help="auto | all | none (default; each map adds a base64 PNG to its line) | names",
    )
    parser.add_argument("--decode-workers", type=int, help="decoding threads (default CXR_DECODE_WORKERS)")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default torch's)")
    parser.add_argument(
        "--ood-action", choices=["flag", "reject"], help="as the server: flag (default, CXR_OOD_ACTION) or reject"
    )
    parser.add_argument("--allow-untrained", action="store_true", help="score with the random placeholder model")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    forward = parser.add_argument_group("result objects to a PACS (off by default; service/archive/forward.py)")
    forward.add_argument(
        "--forward-results",
        action="store_true",
        help="each scored DICOM film's SR, result page and heatmap images to CXR_DICOMWEB_FORWARD_URL by STOW-RS, "
        "through a persistent outbox beside --out (heatmaps as --cams selects)",
    )
    forward.add_argument(
        "--forward-wait-s",
        type=float,
        default=600.0,
        help="at the end, how long to wait for the outbox to empty; what is left is sent by the next run (600)",
    )
    shards = parser.add_argument_group("independent shards (a Kubernetes Indexed Job; torchrun needs none of these)")
    shards.add_argument(
        "--shards", type=int, help="score shard JOB_COMPLETION_INDEX (or --shard-index) of this many, on its own"
    )
    shards.add_argument("--shard-index", type=int, help="which shard, instead of JOB_COMPLETION_INDEX")
    shards.add_argument(
        "--inventory-wait-s",
        type=float,
        default=1800.0,
        help="with --dicomweb, how long shards other than 0 wait for shard 0 to write the inventory (1800)",
    )
    shards.add_argument(
        "--merge", action="store_true", help="join the shard files beside --out into it (once every shard is done)"
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "model_path": args.model,
        "device": args.device,
        "mc_samples": args.mc_samples,
        "decode_workers": args.decode_workers,
        "torch_threads": args.torch_threads,
        "ood_action": args.ood_action,
    }
    values = {key: value for key, value in overrides.items() if value is not None}
    values.update(allow_untrained=args.allow_untrained, log_level=args.log_level, warmup=False)
    return load_settings(values, flags={name: "--" + name.replace("_", "-") for name in overrides})


def _load(settings: Settings, *, allow_untrained: bool) -> LoadedModel:
    """Set torch up as the settings say and load the checkpoint; refuse the random placeholder unless allowed."""
    if settings.tune_allocator:
        tune_allocator()
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    loaded = load_model(settings)
    if not loaded.trained and not allow_untrained:
        raise CheckpointError(
            "no trained checkpoint found (--model, CXR_MODEL_PATH or models/demo); pass --allow-untrained "
            "to score with the random placeholder, whose outputs mean nothing"
        )
    return loaded


def _build_scorer(
    loaded: LoadedModel,
    settings: Settings,
    cams: str | tuple[int, ...],
    device: torch.device,
    batch_size: int | None,
    forwarder: ResultForwarder | None = None,
) -> ArchiveScorer:
    """The predictor on ``device`` (warmed up on CUDA) wrapped in a scorer; ``batch_size`` None: the default."""
    batch_size = batch_size or default_batch_size(device, settings.max_batch_images)
    predictor = build_predictor(loaded, settings, device=device, max_batch=batch_size)
    if device.type == "cuda":  # each padded batch size's cuDNN set-up and CUDA graph before the first batch
        predictor.warmup()
    return ArchiveScorer(
        predictor,
        loaded.ref,
        n_samples=settings.mc_samples or loaded.spec.mc_samples,
        cams=cams,
        batch_size=batch_size,
        decode_workers=settings.decode_workers,
        max_pixels=settings.max_pixels,
        reject_ood=settings.ood_action == "reject",
        forwarder=forwarder,
    )


def _score_into(scorer: ArchiveScorer, todo: list[ScoreItem], target: Path) -> ScoreSummary:
    progress = make_progress(len(todo))
    try:
        with target.open("a") as handle:
            return scorer.score(todo, handle, progress)
    finally:
        progress.close()


def _query(args: argparse.Namespace) -> ArchiveQuery:
    modalities = tuple(m.strip().upper() for m in args.modality.split(",") if m.strip())
    if not modalities:
        raise BatchInputError("--modality names no modality")
    accessions: tuple[str, ...] = ()
    if args.accessions is not None:
        try:
            lines = args.accessions.read_text().splitlines()
        except OSError as err:
            raise BatchInputError(f"--accessions {args.accessions}: {err}") from err
        accessions = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
        if not accessions:
            raise BatchInputError(f"--accessions {args.accessions} names no accession number")
    return ArchiveQuery(modalities, args.body_part, args.study_date, accessions)


def _pacs_items(args: argparse.Namespace, settings: Settings, dist: DistInfo) -> list[ScoreItem]:
    """This rank's films of the PACS: the inventory (reused, or built and written first), skips left out."""
    path: Path = args.inventory or args.out.with_name(args.out.name + ".inventory.csv")
    client = open_client(args.dicomweb, settings.pacs)
    if path.exists():
        try:
            rows = read_inventory(path)
        except ValueError as err:
            raise BatchInputError(str(err)) from err
        log.info("inventory %s: %d instances (reused: delete it to query the PACS again)", path, len(rows))
    elif dist.independent and dist.rank > 0:
        rows = _wait_for_inventory(path, args.inventory_wait_s)
    elif dist.world_size > 1 and not dist.independent:
        raise BatchInputError(
            f"a sharded run needs its inventory first, so every shard slices the same list: run once with "
            f"--inventory-only (it writes {path})"
        )
    else:  # one process, or shard 0 of independent shards: the others wait for it
        try:
            rows = build_inventory(client, _query(args))
        except requests.RequestException as err:
            raise PacsUnavailableError(f"the inventory query failed ({type(err).__name__}: {err})") from err
        write_inventory(rows, path)
        log.info("inventory %s: %d instances found by QIDO-RS", path, len(rows))
    skipped = skipped_by_reason(rows)
    if skipped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
        log.info("skipped %d instances: %s", sum(skipped.values()), reasons)
    fetcher = open_fetcher(client, settings.pacs)
    films = [ScoreItem(row.key, WadoInstance(fetcher, row)) for row in rows if row.skip is None]
    return films[dist.rank :: dist.world_size]


def _wait_for_inventory(path: Path, seconds: float) -> list[InventoryRow]:
    """Shard 0 builds the inventory; every other shard waits for it (written at once: complete when it appears)."""
    log.info("waiting up to %.0f s for shard 0 to write the inventory %s", seconds, path)
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise BatchInputError(f"shard 0 did not write the inventory {path} within {seconds:.0f} s")
        time.sleep(min(2.0, seconds / 10))
    return read_inventory(path)


def merge(out: Path) -> int:
    """``--merge``: join the shard files beside ``out`` into it (first line per path wins); lines in ``out``."""
    shards = shard_files(out)
    for path in [out, *shards]:
        if path.exists():
            repair_torn_tail(path)
    total = merge_shards(out, shards)
    log.info("merged %d shard files into %s (%d lines)", len(shards), out, total)
    _table(out)
    return total


def _table(out: Path) -> None:
    table, rows = write_parquet(out)
    log.info("results as a table: %s (%d rows)", table, rows)


def run(args: argparse.Namespace, dist: DistInfo) -> ScoreSummary:
    """Score this rank's shard of ``args.input`` (or of the PACS's inventory) into its output file; rank 0 merges
    at the end."""
    if args.batch_size is not None and args.batch_size < 1:
        raise BatchInputError("--batch-size must be >= 1")
    if args.merge:
        merge(args.out)
        return ScoreSummary(0, 0, 0.0)
    if (args.input is None) == (args.dicomweb is None):
        raise BatchInputError("give --input or --dicomweb (one of them)")
    if args.dicomweb is None:
        if args.inventory_only:
            raise BatchInputError("--inventory-only goes with --dicomweb")
        items = list_inputs(args.input)[dist.rank :: dist.world_size]  # fail on a bad input before loading
        settings = _settings(args)
    else:
        settings = _settings(args)
        items = _pacs_items(args, settings, dist)
        if args.inventory_only:
            return ScoreSummary(0, 0, 0.0)
    if args.forward_results and settings.dicomweb.forward_url is None:
        raise BatchInputError("--forward-results needs CXR_DICOMWEB_FORWARD_URL, the PACS's STOW-RS root")
    loaded = _load(settings, allow_untrained=args.allow_untrained)
    try:
        cams = parse_cams(args.cams, loaded.spec)
    except CamSelectionError as err:
        raise BatchInputError(str(err)) from err
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    target, done = prepare_output(out, dist)
    todo = [item for item in items if item.key not in done]
    log.info(
        "rank %d/%d: %d files in this shard, %d already in the output, %d to score -> %s",
        dist.rank,
        dist.world_size,
        len(items),
        len(items) - len(todo),
        len(todo),
        target,
    )
    forwarder = None
    if args.forward_results:
        forwarder = ResultForwarder(
            settings.dicomweb, outbox_dir(target), spec=loaded.spec, max_pixels=settings.max_pixels
        ).start()
    with process_group(dist):
        scorer = _build_scorer(loaded, settings, cams, pick_device(settings.device, dist), args.batch_size, forwarder)
        try:
            summary = _score_into(scorer, todo, target)
        except BaseException:
            if forwarder is not None:  # stopped (the PACS gone, a signal): what waits stays for the rerun
                forwarder.close(0.0)
            raise
        if forwarder is not None:
            forwarder.close(args.forward_wait_s)
        log.info(
            "rank %d: %d scored, %d failed in %.1f s (%.2f images/s)",
            dist.rank,
            summary.scored,
            summary.failed,
            summary.seconds,
            (summary.scored + summary.failed) / max(summary.seconds, 1e-9),
        )
        merge_when_all_done(out, dist)
        if dist.rank == 0 and not dist.independent:  # the whole output is in --out now
            _table(out)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, configure plain-text logging and run this rank; 2 on an error the user can fix, else 0."""
    args = build_parser().parse_args(argv)
    from service.process.logs import configure_logging

    configure_logging(args.log_level, json_lines=False)
    try:
        dist = DistInfo.indexed(args.shards, index=args.shard_index) if args.shards else DistInfo.from_env()
        run(args, dist)
    except (BatchInputError, ResultsFileError, CheckpointError, ValidationError, InvalidSettingsError) as err:
        log.error("%s", err)
        return 2
    except PacsUnavailableError as err:
        log.error("%s", err)
        return EXIT_PACS_UNAVAILABLE
    return 0
