"""``python -m service.archive --input DIR_OR_CSV_OR_LIST --out results.jsonl``: score an archive without HTTP.

The same model loading (``load_model``), decoding and preprocessing (``service.responses``), batched model
work (``Predictor.run``: trunk once, B x T stochastic rows, Grad-CAM) and response shape
(``PredictionResponse``) as the server, with no HTTP and no FastAPI import. A thread pool decodes the
next images while the model works on the current batch, so on a GPU the model waits only when decoding
is slower than inference.

Input (``--input``):
  * a directory, walked recursively (hidden entries skipped). A file is scored when its name ends in
    .png/.jpg/.jpeg/.dcm/.dicom (any case), has no suffix (DICOM archives often have none), or its first
    bytes are a PNG, JPEG or DICOM signature. The decoder then judges the content, never the name: a
    ``.png`` holding text becomes an error line. Other files (``README.txt``, ``labels.csv``) are skipped
    and counted. The ``path`` written is the file's path relative to the directory.
  * a ``.csv`` with a ``Path`` column (CheXpert layout): paths relative to the parent of the CSV's folder,
    as ``train.data.load_chexpert`` reads them; ``path`` is the value as written.
  * any other file: a list of paths, one per line (blank lines and ``#`` comments ignored), relative to
    the list's folder unless absolute; ``path`` is the line as written.

Output (``--out``): JSON lines, one per input file:
``{"path": ..., "ok": true, "result": <PredictionResponse>}`` or
``{"path": ..., "ok": false, "error": {"type": ..., "detail": ...}}``. A bad file never stops the run; a
batch that fails inside the model fails only its files. ``request_id`` is derived from ``path``
(``batch-`` + 24 hex digits of its sha256), so a rerun names a film the same way. Nothing from DICOM
headers is written (format, size, photometric interpretation and decoding warnings only).
Each result carries the model's out-of-distribution verdict (``ood``) as the server's does; with
``--ood-action reject`` (``CXR_OOD_ACTION``) a flagged film becomes an ``OutOfDistributionError`` line
instead, as the server answers 422.

Resume: a rerun reads the existing output, truncates a torn last line (a crash mid-write), skips every
path already present (results and errors alike) and appends. Lines are flushed once per batch, so a kill
loses at most one batch.

Several GPUs or nodes: ``torchrun --nproc_per_node N -m service.archive ...``. Each rank takes the
shard ``sorted(paths)[RANK::WORLD_SIZE]``, runs on ``cuda:LOCAL_RANK`` when CUDA is present (``--device
auto``) and writes ``<out stem>.rank<R><suffix>`` beside ``--out``; after a gloo barrier rank 0 merges the
shards into ``--out`` (atomically, de-duplicated by path) and deletes them. Every rank skips the paths
already in ``--out`` or in any shard file, so a run may resume with a different world size.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Protocol

import torch
from pydantic import ValidationError
from torch import Tensor

from bayesnet import CheckpointError, ImageFacts, ModelSpec, single_threaded_torch, sniff_format, tune_allocator
from service.decoding import decode_for_model
from service.model_loading import LoadedModel, build_predictor, load_model
from service.predictor import InferenceRequest, InferenceResult, Predictor, resolve_device
from service.responses import (
    CamSelectionError,
    build_response,
    heatmaps,
    ood_result,
    parse_cams,
)
from service.schemas import ModelRef
from service.settings import InvalidSettingsError, Settings, load_settings

log = logging.getLogger("service.archive")

#: File names scored when walking a directory (besides suffix-less files and content-sniffed images).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
#: Enough leading bytes for every signature ``sniff_format`` knows (DICOM's ``DICM`` sits at byte 128).
SNIFF_BYTES = 132
PATH_COLUMN = "Path"
#: How long ranks wait for each other at the end (the slowest shard may take hours on a big archive).
DIST_TIMEOUT = timedelta(hours=24)
LOG_EVERY_S = 10.0


class BatchInputError(ValueError):
    """The ``--input`` cannot be read as a directory, a CSV with a Path column, or a list of paths."""


class ResultsFileError(ValueError):
    """An existing output file has a damaged line before its last one (not a crash's torn tail)."""


class OutOfDistributionError(ValueError):
    """With ``ood_action=reject``: the film is outside what the model was trained on (recorded, not raised)."""


# --- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreItem:
    """One file to score: ``key`` is what the output's ``path`` says, ``file`` where the bytes are."""

    key: str
    file: Path


def _is_candidate(file: Path) -> bool:
    if file.suffix.lower() in IMAGE_SUFFIXES or file.suffix == "":
        return True
    try:
        with file.open("rb") as handle:
            return sniff_format(handle.read(SNIFF_BYTES)) is not None
    except OSError:
        return False


def _scan_directory(root: Path) -> list[ScoreItem]:
    items, skipped = [], 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            file = Path(folder) / name
            if name.startswith(".") or not file.is_file():
                continue
            if _is_candidate(file):
                items.append(ScoreItem(file.relative_to(root).as_posix(), file))
            else:
                skipped += 1
    if skipped:
        log.info("skipped %d files in %s that are neither named nor sniffed as PNG, JPEG or DICOM", skipped, root)
    return items


def _read_csv(csv_path: Path) -> list[ScoreItem]:
    root = csv_path.resolve().parent.parent
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or PATH_COLUMN not in reader.fieldnames:
            raise BatchInputError(f"{csv_path} has no {PATH_COLUMN!r} column (columns: {reader.fieldnames})")
        keys = [row[PATH_COLUMN].strip() for row in reader if (row.get(PATH_COLUMN) or "").strip()]
    return [ScoreItem(key, root / key) for key in keys]


def _read_list(list_path: Path) -> list[ScoreItem]:
    base = list_path.resolve().parent
    try:
        lines = list_path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise BatchInputError(
            f"{list_path} is not a text list of paths; pass a directory, a .csv with a Path column or a text list"
        ) from err
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [ScoreItem(key, base / key) for key in keys]


def list_inputs(source: Path) -> list[ScoreItem]:
    """Every file ``source`` names, sorted by key, one per key (see the module docstring for the rules)."""
    if source.is_dir():
        items = _scan_directory(source)
    elif source.is_file():
        items = _read_csv(source) if source.suffix.lower() == ".csv" else _read_list(source)
    else:
        raise BatchInputError(f"--input {source} does not exist")
    unique = {item.key: item for item in reversed(items)}  # the first mention of a key wins
    if len(unique) < len(items):
        log.warning("%d paths are listed more than once in %s; each is scored once", len(items) - len(unique), source)
    return sorted(unique.values(), key=lambda item: item.key)


def request_id_for(key: str) -> str:
    """A deterministic request id per input path (a rerun gives the same film the same id)."""
    return "batch-" + hashlib.sha256(key.encode()).hexdigest()[:24]


# --- the output file ------------------------------------------------------------------------------


def complete_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every newline-terminated line; a torn last line is left out."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.endswith(b"\n"):
                yield number, raw.decode()


def repair_torn_tail(path: Path, chunk_bytes: int = 1 << 16) -> None:
    """Truncate a last line without its newline (the process died mid-write) so appends start clean.

    Scans backwards in chunks: an output with heatmaps can be gigabytes, and only its tail matters.
    """
    if not path.is_file():
        return
    size = path.stat().st_size
    with path.open("rb+") as handle:
        end = size
        while end > 0:
            start = max(0, end - chunk_bytes)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return
        handle.truncate(end)
    log.warning("%s ended in a torn line (an interrupted run); truncated %d bytes", path, size - end)


def done_paths(path: Path) -> set[str]:
    """The ``path`` of every complete line of an output file (empty when the file does not exist).

    Raises:
        ResultsFileError: a complete line is not a result line; the file is not ours or was damaged.
    """
    if not path.is_file():
        return set()
    done = set()
    for number, text in complete_lines(path):
        try:
            done.add(str(json.loads(text)["path"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ResultsFileError(
                f"{path}:{number} is not a batch result line; move the file away or fix that line"
            ) from err
    return done


def shard_path(out: Path, rank: int) -> Path:
    """Where rank ``rank`` writes: ``results.rank3.jsonl`` beside ``results.jsonl``."""
    return out.with_name(f"{out.stem}.rank{rank}{out.suffix}")


def shard_files(out: Path) -> list[Path]:
    """Every rank's file beside ``out`` (of this run or of an earlier run with another world size)."""
    return sorted(out.parent.glob(f"{out.stem}.rank*{out.suffix}"))


def merge_shards(out: Path, shards: Sequence[Path]) -> int:
    """Append the shards' lines to ``out`` (atomically, first line per path wins), then delete the shards.

    Returns the number of lines in the merged file. Streams line by line: heatmaps make lines large.
    """
    tmp = out.with_name(out.name + ".merging")
    seen: set[str] = set()
    with tmp.open("w") as merged:
        for source in ([out] if out.is_file() else []) + list(shards):
            for _, text in complete_lines(source):
                key = str(json.loads(text)["path"])
                if key not in seen:
                    seen.add(key)
                    merged.write(text)
        merged.flush()
        os.fsync(merged.fileno())
    os.replace(tmp, out)
    for shard in shards:
        shard.unlink()
    return len(seen)


# --- progress -------------------------------------------------------------------------------------


class Progress(Protocol):
    def update(self, scored: int, failed: int) -> None: ...

    def close(self) -> None: ...


class LogProgress:
    """Periodic log lines with the rate (used when tqdm is missing, as in the serve-only image, or no TTY)."""

    def __init__(self, total: int, every_s: float = LOG_EVERY_S) -> None:
        self.total, self.every_s = total, every_s
        self.scored = self.failed = 0
        self.started = self.last = time.perf_counter()

    def update(self, scored: int, failed: int) -> None:
        self.scored += scored
        self.failed += failed
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._log(now)

    def _log(self, now: float) -> None:
        done = self.scored + self.failed
        rate = done / max(now - self.started, 1e-9)
        log.info("%d/%d files (%d failed), %.1f images/s", done, self.total, self.failed, rate)

    def close(self) -> None:
        self._log(time.perf_counter())


class TqdmProgress:
    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", dynamic_ncols=True)
        self.failed = 0

    def update(self, scored: int, failed: int) -> None:
        self.failed += failed
        if failed:
            self.bar.set_postfix(failed=self.failed)
        self.bar.update(scored + failed)

    def close(self) -> None:
        self.bar.close()


def make_progress(total: int) -> Progress:
    """A tqdm bar on an interactive terminal when tqdm is installed, else periodic log lines."""
    if sys.stderr.isatty():
        try:
            return TqdmProgress(total)
        except ImportError:
            pass
    return LogProgress(total)


# --- scoring --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Decoded:
    item: ScoreItem
    image: ImageFacts
    tensor: Tensor
    submitted_at: float
    ready_at: float


@dataclass(frozen=True)
class ScoreSummary:
    scored: int
    failed: int
    seconds: float


def error_line(key: str, err: BaseException, detail: str | None = None) -> str:
    record = {"path": key, "ok": False, "error": {"type": type(err).__name__, "detail": detail or str(err)}}
    return json.dumps(record, separators=(",", ":")) + "\n"


@dataclass(frozen=True)
class _Inferred:
    """One batch after the model: results in batch order, or the exception that failed the whole batch."""

    batch: list[_Decoded]
    results: list[InferenceResult] | None
    error: Exception | None
    started: float
    inference_s: float


class ArchiveScorer:
    """Decode ahead in a thread pool, run full batches through the predictor, append one line per file.

    Three stages overlap: the decode pool prepares the next images, the calling thread runs the model on
    the current batch, and a writer thread turns the previous batch into response lines (heatmap PNGs,
    JSON) and appends them. At most one batch waits for the writer, so memory stays bounded.
    """

    def __init__(
        self,
        predictor: Predictor,
        model_ref: ModelRef,
        *,
        n_samples: int,
        cams: str | tuple[int, ...],
        batch_size: int,
        decode_workers: int,
        max_pixels: int,
        reject_ood: bool = False,
    ) -> None:
        self.predictor = predictor
        self.reject_ood = reject_ood
        self.spec: ModelSpec = predictor.spec
        self.model_ref = model_ref
        self.n_samples = n_samples
        self.cams = cams
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.max_pixels = max_pixels

    def _decode(self, item: ScoreItem) -> tuple[ImageFacts, Tensor]:
        image, tensor = decode_for_model(item.file.read_bytes(), self.spec, max_pixels=self.max_pixels)
        return image, self.predictor.stage(tensor)  # page-locked on CUDA: the batch's copies become DMAs

    def score(self, items: Sequence[ScoreItem], out: IO[str], progress: Progress) -> ScoreSummary:
        """Score ``items``; a file's line is appended once its batch is done, flushed once per batch."""
        started = time.perf_counter()
        counts = [0, 0]  # scored, failed
        # Enough decoded images in flight to fill the next batch while the model runs the current one.
        window = 2 * self.batch_size + self.decode_workers
        todo = iter(items)
        pending: deque[tuple[ScoreItem, float, Future[tuple[ImageFacts, Tensor]]]] = deque()
        batch: list[_Decoded] = []
        errors: list[str] = []
        writing: Future[None] | None = None

        def write(failed_lines: list[str], inferred: _Inferred | None) -> None:
            lines = [(line, False) for line in failed_lines] + (self._lines(inferred) if inferred else [])
            out.writelines(line for line, _ in lines)
            out.flush()
            ok = sum(success for _, success in lines)
            counts[0] += ok
            counts[1] += len(lines) - ok
            progress.update(ok, len(lines) - ok)

        with (
            # The model runs on this thread; helpers run their tensor work inline (bayesnet/runtime.py).
            ThreadPoolExecutor(
                self.decode_workers, thread_name_prefix="batch-decode", initializer=single_threaded_torch
            ) as pool,
            ThreadPoolExecutor(1, thread_name_prefix="batch-write", initializer=single_threaded_torch) as writer,
        ):

            def refill() -> None:
                while len(pending) < window:
                    item = next(todo, None)
                    if item is None:
                        return
                    pending.append((item, time.perf_counter(), pool.submit(self._decode, item)))

            def hand_over(run_model: bool) -> None:
                nonlocal batch, errors, writing
                inferred = self._infer(batch) if run_model and batch else None
                if writing is not None:
                    writing.result()  # raises what the writer met (a full disk, say)
                writing = writer.submit(write, errors, inferred)
                errors = []
                if inferred is not None:
                    batch = []

            refill()
            while pending:
                item, submitted_at, future = pending.popleft()
                refill()
                try:
                    image, tensor = future.result()
                except Exception as err:  # one bad file is recorded and the run goes on
                    if not isinstance(err, OSError | ValueError):
                        log.exception("unexpected error decoding %s", item.key)
                    errors.append(error_line(item.key, err))
                else:
                    batch.append(_Decoded(item, image, tensor, submitted_at, time.perf_counter()))
                if len(batch) >= self.batch_size or len(errors) >= self.batch_size:
                    hand_over(run_model=len(batch) >= self.batch_size)
            hand_over(run_model=True)
            assert writing is not None
            writing.result()
        return ScoreSummary(counts[0], counts[1], time.perf_counter() - started)

    def _infer(self, batch: list[_Decoded]) -> _Inferred:
        """One batch through the model; a failure fails only this batch's files, as in the server."""
        requests = [InferenceRequest(d.tensor, self.n_samples, self.cams) for d in batch]
        started = time.perf_counter()
        try:
            results = self.predictor.run(requests)
        except Exception as err:
            log.exception("a batch of %d images failed inside the model", len(batch))
            return _Inferred(batch, None, err, started, time.perf_counter() - started)
        return _Inferred(batch, results, None, started, time.perf_counter() - started)

    def _lines(self, inferred: _Inferred) -> list[tuple[str, bool]]:
        """``(output line, succeeded)`` per file of a batch, in batch order (runs in the writer thread)."""
        if inferred.results is None:
            err = inferred.error
            assert err is not None
            detail = f"inference failed for the batch containing this file ({type(err).__name__}: {err})"
            return [(error_line(d.item.key, err, detail), False) for d in inferred.batch]
        lines = []
        for decoded, result in zip(inferred.batch, inferred.results, strict=True):
            verdict = ood_result(result, self.spec)
            if self.reject_ood and verdict is not None and not verdict.in_distribution:
                rejected = OutOfDistributionError(
                    f"not scored: out-of-distribution score {verdict.score:.3g} is above the model's threshold "
                    f"{verdict.threshold:.3g}; this does not look like a frontal chest radiograph"
                )
                lines.append((error_line(decoded.item.key, rejected), False))
                continue
            response = build_response(
                request_id=request_id_for(decoded.item.key),
                model_ref=self.model_ref,
                spec=self.spec,
                n_samples=self.n_samples,
                image=decoded.image,
                result=result,
                heatmaps=heatmaps(result, self.spec) if result.cams else {},
                queue_s=inferred.started - decoded.ready_at,
                inference_s=inferred.inference_s,
                total_s=time.perf_counter() - decoded.submitted_at,
            )
            record = {"path": decoded.item.key, "ok": True, "result": response.model_dump(mode="json")}
            lines.append((json.dumps(record, separators=(",", ":")) + "\n", True))
        return lines


# --- the command ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when started directly)."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DistInfo:
        """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun sets them."""
        values = os.environ if env is None else env
        try:
            info = cls(
                int(values.get("RANK", "0")), int(values.get("WORLD_SIZE", "1")), int(values.get("LOCAL_RANK", "0"))
            )
        except ValueError as err:
            raise BatchInputError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {err}") from err
        if info.world_size < 1 or not 0 <= info.rank < info.world_size:
            raise BatchInputError(f"RANK {info.rank} is not in [0, WORLD_SIZE={info.world_size})")
        return info


def pick_device(name: str, dist: DistInfo) -> torch.device:
    """``auto`` under torchrun with CUDA: ``cuda:LOCAL_RANK``; otherwise as the server resolves it."""
    if name == "auto" and dist.world_size > 1 and torch.cuda.is_available():
        return torch.device(f"cuda:{dist.local_rank}")
    return resolve_device(name)


def default_batch_size(device: torch.device, max_batch_images: int) -> int:
    """Images per model call when ``--batch-size`` is not given.

    On a CPU, the server's ``max_batch_images`` (CXR_MAX_BATCH_IMAGES, 4 by default): on the 2-core
    development CPU small batches are fastest per image (4 in bench/serve.py's raw sweep; 8 beat 16 and 32
    in ``bench/archive_scorer.py --sweep``; docs/benchmarks.md). On a GPU
    larger batches keep the card busy: 64, a conservative choice at 224 px, not yet measured (no GPU here).
    """
    return 64 if device.type == "cuda" else max_batch_images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.archive",
        description="Score a folder, CSV or list of radiographs with the service's model, no HTTP.",
        epilog="Defaults not given here come from the service's CXR_* settings. See the module docstring.",
    )
    parser.add_argument("--input", type=Path, required=True, help="directory, CSV with a Path column, or list file")
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines output (appended to; resumable)")
    parser.add_argument("--model", type=Path, help="checkpoint directory (default models/demo, CXR_MODEL_PATH)")
    parser.add_argument("--device", help="auto (cuda:LOCAL_RANK under torchrun), cpu, cuda, cuda:N")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="images per model call (default: CXR_MAX_BATCH_IMAGES=8 on a CPU, 64 on a GPU)",
    )
    parser.add_argument("--mc-samples", type=int, help="MC samples T (default the model's, CXR_MC_SAMPLES)")
    parser.add_argument(
        "--cams",
        default="none",
        help="auto | all | none (default; a 224 px map adds ~15-25 KB of base64 to its line) | names",
    )
    parser.add_argument("--decode-workers", type=int, help="decoding threads (default CXR_DECODE_WORKERS)")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default torch's)")
    parser.add_argument(
        "--ood-action", choices=["flag", "reject"], help="as the server: flag (default, CXR_OOD_ACTION) or reject"
    )
    parser.add_argument("--allow-untrained", action="store_true", help="score with the random placeholder model")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
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


@contextlib.contextmanager
def _process_group(dist: DistInfo) -> Iterator[None]:
    if dist.world_size == 1:
        yield
        return
    import torch.distributed as tdist

    tdist.init_process_group("gloo", rank=dist.rank, world_size=dist.world_size, timeout=DIST_TIMEOUT)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def _barrier(dist: DistInfo) -> None:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.barrier()


def run(args: argparse.Namespace, dist: DistInfo) -> ScoreSummary:
    """Score this rank's shard of ``args.input`` into its output file; rank 0 merges at the end."""
    if args.batch_size is not None and args.batch_size < 1:
        raise BatchInputError("--batch-size must be >= 1")
    items = list_inputs(args.input)[dist.rank :: dist.world_size]  # fail on a bad input before loading
    settings = _settings(args)
    if settings.tune_allocator:
        tune_allocator()
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    loaded: LoadedModel = load_model(settings)
    if not loaded.trained and not args.allow_untrained:
        raise CheckpointError(
            "no trained checkpoint found (--model, CXR_MODEL_PATH or models/demo); pass --allow-untrained "
            "to score with the random placeholder, whose outputs mean nothing"
        )
    try:
        cams = parse_cams(args.cams, loaded.spec)
    except CamSelectionError as err:
        raise BatchInputError(str(err)) from err
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    target = out if dist.world_size == 1 else shard_path(out, dist.rank)
    if dist.world_size == 1 and shard_files(out):
        log.info("merging %d rank files of an earlier torchrun into %s", len(shard_files(out)), out)
        repair_torn_tail(out)
        merge_shards(out, shard_files(out))
    repair_torn_tail(target)
    done = done_paths(out) if target == out else done_paths(out).union(*(done_paths(f) for f in shard_files(out)))
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
    with _process_group(dist):
        device = pick_device(settings.device, dist)
        batch_size = args.batch_size or default_batch_size(device, settings.max_batch_images)
        predictor = build_predictor(loaded, settings, device=device, max_batch=batch_size)
        if device.type == "cuda":  # each padded batch size's cuDNN set-up and CUDA graph before the first batch
            predictor.warmup()
        model_ref = ModelRef(name=loaded.spec.name, version=loaded.spec.version, sha256=loaded.sha256)
        scorer = ArchiveScorer(
            predictor,
            model_ref,
            n_samples=settings.mc_samples or loaded.spec.mc_samples,
            cams=cams,
            batch_size=batch_size,
            decode_workers=settings.decode_workers,
            max_pixels=settings.max_pixels,
            reject_ood=settings.ood_action == "reject",
        )
        progress = make_progress(len(todo))
        try:
            with target.open("a") as handle:
                summary = scorer.score(todo, handle, progress)
        finally:
            progress.close()
        log.info(
            "rank %d: %d scored, %d failed in %.1f s (%.2f images/s)",
            dist.rank,
            summary.scored,
            summary.failed,
            summary.seconds,
            (summary.scored + summary.failed) / max(summary.seconds, 1e-9),
        )
        _barrier(dist)  # every shard complete before rank 0 reads them
        if dist.world_size > 1 and dist.rank == 0:
            total = merge_shards(out, shard_files(out))
            log.info("merged %d rank files into %s (%d lines)", dist.world_size, out, total)
        _barrier(dist)  # nobody exits (and lets torchrun tear the group down) before the merge is on disk
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service.logs import configure_logging

    configure_logging(args.log_level, json_lines=False)
    try:
        run(args, DistInfo.from_env())
    except (BatchInputError, ResultsFileError, CheckpointError, ValidationError, InvalidSettingsError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
