"""``python -m service.archive --input DIR_OR_CSV_OR_LIST | --dicomweb URL --out results.jsonl``: score an archive
without HTTP.

An offline tool beside the server: the same model loading, decoding, batched inference and response shape
(``service.runtime``), one JSON line per film, resumable, sharded across ranks under ``torchrun``. Each
concern has its module, and each module's docstring gives its rules:

  * ``inputs``: which files ``--input`` names (a folder, a CSV with a Path column, a list), their keys and what a
    CSV declares about each film (patient age, view);
  * ``dicomweb``: ``--dicomweb URL``: a PACS's inventory by QIDO-RS, its films by WADO-RS within set limits;
  * ``results``: the JSON-lines output, torn-line repair and resume;
  * ``table``: the same results as Parquet, one row per film, written when the output is whole;
  * ``forward``: ``--forward-results``: each scored film's SR and images to a PACS through the outbox;
  * ``report``: ``python -m service.archive.report``: the run in Markdown and plots for a clinical lead (with
    the radiologists' labels, ``python -m train audit`` adds the retrospective audit);
  * ``progress``: a tqdm bar or periodic log lines;
  * ``scorer``: ``ArchiveScorer``, decode / infer / write overlapping in three stages;
  * ``sharding``: rank and world size, per-rank output files and their merge;
  * ``cli``: the arguments, the settings they override and one rank's run (``__main__`` only starts it).
"""

from service.archive.cli import build_parser, default_batch_size, main, run
from service.archive.inputs import IMAGE_SUFFIXES, BatchInputError, ScoreItem, list_inputs, request_id_for
from service.archive.progress import LogProgress, Progress, TqdmProgress, make_progress
from service.archive.results import ResultsFileError, done_paths, error_line, repair_torn_tail, result_line
from service.archive.scorer import ArchiveScorer, ScoreSummary
from service.archive.sharding import DistInfo, merge_shards, pick_device, shard_files, shard_path

__all__ = [
    "IMAGE_SUFFIXES",
    "ArchiveScorer",
    "BatchInputError",
    "DistInfo",
    "LogProgress",
    "Progress",
    "ResultsFileError",
    "ScoreItem",
    "ScoreSummary",
    "TqdmProgress",
    "build_parser",
    "default_batch_size",
    "done_paths",
    "error_line",
    "list_inputs",
    "main",
    "make_progress",
    "merge_shards",
    "pick_device",
    "repair_torn_tail",
    "request_id_for",
    "result_line",
    "run",
    "shard_files",
    "shard_path",
]
