"""``service.archive.results`` and ``service.archive.sharding``: the output lines, resume and the merge of
rank files, on real files and without a model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from service.archive import (
    BatchInputError,
    DistInfo,
    ResultsFileError,
    done_paths,
    error_line,
    merge_shards,
    shard_files,
    shard_path,
)
from service.archive.sharding import prepare_output


def line(key: str, value: int = 0) -> str:
    return json.dumps({"path": key, "ok": True, "result": {"value": value}}) + "\n"


def test_an_error_line_names_the_exception_class_and_its_detail() -> None:
    text = error_line("a.png", FileNotFoundError("no such file"))
    assert text.endswith("\n") and text.count("\n") == 1
    assert json.loads(text) == {
        "path": "a.png",
        "ok": False,
        "error": {"type": "FileNotFoundError", "detail": "no such file"},
    }
    assert json.loads(error_line("a.png", RuntimeError("x"), "batch failed"))["error"]["detail"] == "batch failed"


def test_done_paths_ignores_a_torn_tail_and_refuses_a_damaged_line(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    assert done_paths(out) == set()
    out.write_text(line("a.png") + error_line("b.png", ValueError("bad")) + '{"path": "c.p')
    assert done_paths(out) == {"a.png", "b.png"}
    out.write_text(line("a.png") + "[1, 2]\n" + line("b.png"))
    with pytest.raises(ResultsFileError, match=r"results.jsonl:2 is not a batch result line"):
        done_paths(out)


def test_rank_files_sit_beside_the_output_and_only_they_are_found(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    assert shard_path(out, 3) == tmp_path / "results.rank3.jsonl"
    for name in ("results.rank1.jsonl", "results.rank0.jsonl", "other.rank0.jsonl", "results.rank0.csv"):
        (tmp_path / name).write_text("")
    assert shard_files(out) == [tmp_path / "results.rank0.jsonl", tmp_path / "results.rank1.jsonl"]


def test_merging_keeps_the_first_line_per_path_drops_torn_tails_and_deletes_the_shards(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text(line("a.png", 1))
    shard_path(out, 0).write_text(line("b.png", 2) + line("a.png", 9) + '{"path": "torn')
    shard_path(out, 1).write_text(line("c.png", 3) + line("b.png", 9))
    assert merge_shards(out, shard_files(out)) == 3
    assert out.read_text() == line("a.png", 1) + line("b.png", 2) + line("c.png", 3)
    assert shard_files(out) == []
    assert not (tmp_path / "results.jsonl.merging").exists()


def test_a_single_process_run_first_merges_an_earlier_torchruns_rank_files(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text(line("a.png") + '{"path": "to')  # the merged output was torn too
    shard_path(out, 0).write_text(line("b.png"))
    shard_path(out, 1).write_text(line("c.png"))
    target, done = prepare_output(out, DistInfo(0, 1, 0))
    assert target == out
    assert done == {"a.png", "b.png", "c.png"}
    assert out.read_text() == line("a.png") + line("b.png") + line("c.png")
    assert shard_files(out) == []


def test_a_rank_appends_to_its_own_file_and_skips_what_any_file_holds(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text(line("a.png"))
    shard_path(out, 0).write_text(line("b.png"))  # an earlier run with another world size
    shard_path(out, 2).write_text(line("c.png") + '{"pa')
    target, done = prepare_output(out, DistInfo(2, 3, 0))
    assert target == shard_path(out, 2)
    assert done == {"a.png", "b.png", "c.png"}
    assert target.read_text() == line("c.png")  # its torn tail cut, ready to append
    assert shard_path(out, 0).exists()  # only rank 0 merges, after every rank is done


def test_rank_variables_must_be_integers() -> None:
    with pytest.raises(BatchInputError, match="must be integers"):
        DistInfo.from_env({"RANK": "one"})
    with pytest.raises(BatchInputError, match="not in"):
        DistInfo.from_env({"WORLD_SIZE": "0"})


def test_log_progress_says_the_rate_and_the_time_left(caplog: pytest.LogCaptureFixture) -> None:
    from service.archive.progress import LogProgress, format_eta

    assert [format_eta(s) for s in (12.4, 250, 3900)] == ["12 s", "4 min 10 s", "1 h 05 min"]
    progress = LogProgress(total=100, every_s=0.0)
    progress.started -= 10.0  # 10 s ago
    with caplog.at_level("INFO", logger="service.archive"):
        progress.update(18, 2)
        progress.update(80, 0)
    first, last = (r.getMessage() for r in caplog.records)
    found = re.fullmatch(r"20/100 files \(2 failed\), ([\d.]+) images/s, (\d+) s left", first)
    assert found is not None and 35 <= int(found[2]) <= 40, first  # 80 films at about 2 a second
    assert last.startswith("100/100 files (2 failed)") and last.endswith(", - left")
