"""Several GPUs or nodes: ``torchrun --nproc_per_node N -m service.archive ...``, one shard per rank; or shards that
never meet: ``--shards N`` with ``JOB_COMPLETION_INDEX`` (a Kubernetes Indexed Job, k8s/components/archive-job).

Each rank takes the shard ``sorted(paths)[RANK::WORLD_SIZE]``, runs on ``cuda:LOCAL_RANK`` when CUDA is
present (``--device auto``) and writes ``<out stem>.rank<R><suffix>`` beside ``--out``; after a gloo barrier
rank 0 merges the shards into ``--out`` (atomically, de-duplicated by path) and deletes them. Every rank
skips the paths already in ``--out`` or in any shard file, so a run may resume with a different world size;
a single-process run first merges the rank files an earlier torchrun left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from service.archive.inputs import BatchInputError
from service.archive.results import complete_lines, done_paths, repair_torn_tail
from service.runtime.predictor import resolve_device

__all__ = [
    "DIST_TIMEOUT",
    "DistInfo",
    "merge_shards",
    "merge_when_all_done",
    "pick_device",
    "prepare_output",
    "process_group",
    "shard_files",
    "shard_path",
]

log = logging.getLogger("service.archive")  # the command's one logger name, whichever module writes the line

#: How long ranks wait for each other at the end (the slowest shard may take hours on a big archive).
DIST_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when started directly)."""

    rank: int
    world_size: int
    local_rank: int
    #: Shards that never meet (a Kubernetes Indexed Job's pods, ``--shards``): no process group, no barrier; each
    #: writes its own file, and ``--merge`` joins them once all are done.
    independent: bool = False

    @classmethod
    def indexed(cls, shards: int, env: Mapping[str, str] | None = None, index: int | None = None) -> DistInfo:
        """Shard ``index`` (default: ``JOB_COMPLETION_INDEX``, as Kubernetes sets it in an Indexed Job's pods) of
        ``shards`` independent shards."""
        values = os.environ if env is None else env
        if index is None:
            text = values.get("JOB_COMPLETION_INDEX")
            if text is None:
                raise BatchInputError("--shards needs --shard-index or JOB_COMPLETION_INDEX (an Indexed Job's pods)")
            try:
                index = int(text)
            except ValueError as err:
                raise BatchInputError(f"JOB_COMPLETION_INDEX must be an integer, got {text!r}") from err
        if shards < 1 or not 0 <= index < shards:
            raise BatchInputError(f"shard index {index} is not in [0, --shards={shards})")
        return cls(index, shards, 0, independent=True)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistInfo:
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


def prepare_output(out: Path, dist: DistInfo) -> tuple[Path, set[str]]:
    """This rank's output file, ready to append to, and the paths that any earlier run already wrote.

    A single process first merges rank files an interrupted torchrun left; every file this rank appends to
    loses its torn last line.
    """
    target = out if dist.world_size == 1 else shard_path(out, dist.rank)
    if dist.world_size == 1 and shard_files(out):
        log.info("merging %d rank files of an earlier torchrun into %s", len(shard_files(out)), out)
        repair_torn_tail(out)
        merge_shards(out, shard_files(out))
    repair_torn_tail(target)
    done = done_paths(out) if target == out else done_paths(out).union(*(done_paths(f) for f in shard_files(out)))
    return target, done


def merge_when_all_done(out: Path, dist: DistInfo) -> None:
    """Under torchrun: wait for every rank, let rank 0 merge the shards into ``out``, wait for the merge. Independent
    shards do not wait: ``--merge`` joins their files once all are done."""
    if dist.world_size == 1:
        return
    if dist.independent:
        log.info("shard %d of %d done; once all are, join them with --merge --out %s", dist.rank, dist.world_size, out)
        return
    import torch.distributed as tdist

    tdist.barrier()  # every shard complete before rank 0 reads them
    if dist.rank == 0:
        total = merge_shards(out, shard_files(out))
        log.info("merged %d rank files into %s (%d lines)", dist.world_size, out, total)
    tdist.barrier()  # nobody exits (and lets torchrun tear the group down) before the merge is on disk


@contextlib.contextmanager
def process_group(dist: DistInfo) -> Iterator[None]:
    """The gloo process group of a torchrun job for the ``with`` block (nothing for a single process or for
    independent shards)."""
    if dist.world_size == 1 or dist.independent:
        yield
        return
    import torch.distributed as tdist

    tdist.init_process_group("gloo", rank=dist.rank, world_size=dist.world_size, timeout=DIST_TIMEOUT)
    try:
        yield
    finally:
        tdist.destroy_process_group()
