"""``service.archive.inputs``: which files an archive run scores and under which key, without loading a model."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from PIL import Image

from service.archive import BatchInputError, list_inputs, request_id_for


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), color=128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_folder_scores_named_suffixless_and_sniffed_files_and_skips_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ward" / ".thumbs").mkdir(parents=True)
    (tmp_path / "A.PNG").write_bytes(png_bytes())  # suffixes in any case
    (tmp_path / "ward" / "IM0001").write_bytes(b"whatever: judged by the decoder, not here")
    (tmp_path / "ward" / "export.bin").write_bytes(png_bytes())  # an unknown suffix, sniffed as PNG
    (tmp_path / "ward" / ".thumbs" / "b.png").write_bytes(png_bytes())  # hidden folder
    (tmp_path / ".c.png").write_bytes(png_bytes())  # hidden file
    (tmp_path / "README.txt").write_text("not an image\n")
    (tmp_path / "labels.csv").write_text("Path\nA.PNG\n")
    with caplog.at_level(logging.INFO, logger="service.archive"):
        items = list_inputs(tmp_path)
    assert [item.key for item in items] == ["A.PNG", "ward/IM0001", "ward/export.bin"]
    assert [item.file for item in items] == [tmp_path / "A.PNG", tmp_path / "ward/IM0001", tmp_path / "ward/export.bin"]
    assert "skipped 2 files" in caplog.text


def test_csv_keys_are_the_values_as_written_and_blank_rows_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "CheXpert-small").mkdir()
    csv_path = tmp_path / "CheXpert-small" / "valid.csv"
    csv_path.write_text("Path,Sex\n CheXpert-small/valid/b.jpg ,F\n,M\nCheXpert-small/valid/a.jpg,F\n")
    items = list_inputs(csv_path)
    assert [item.key for item in items] == ["CheXpert-small/valid/a.jpg", "CheXpert-small/valid/b.jpg"]
    assert items[0].file == tmp_path / "CheXpert-small" / "valid" / "a.jpg"


def test_a_binary_file_is_not_taken_for_a_list_of_paths(tmp_path: Path) -> None:
    blob = tmp_path / "films.tar"
    blob.write_bytes(b"\xff\xfe\x00\x81" * 64)
    with pytest.raises(BatchInputError, match="is not a text list of paths"):
        list_inputs(blob)


def test_a_path_listed_twice_is_scored_once_from_its_first_mention(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    listing = tmp_path / "films.txt"
    listing.write_text("b.png\n  a.png  \n# a.png is a comment here\nb.png\n")
    with caplog.at_level(logging.WARNING, logger="service.archive"):
        items = list_inputs(listing)
    assert [item.key for item in items] == ["a.png", "b.png"]
    assert "1 paths are listed more than once" in caplog.text


def test_request_ids_are_stable_and_differ_by_path() -> None:
    first = request_id_for("ward/IM0001")
    assert first == request_id_for("ward/IM0001")
    assert first != request_id_for("ward/IM0002")
    assert first.startswith("batch-") and len(first) == len("batch-") + 24
