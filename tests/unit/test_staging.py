"""An output folder is replaced whole or not at all: a failed build leaves the old one byte for byte."""

from __future__ import annotations

import os

import pytest

from data_pipeline.staging import RETIRED_PREFIX, OutputExists, replace_folder


def write(folder: str, **files: str) -> list[str]:
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as handle:
            handle.write(text)
    return sorted(files)


def snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_new_folder_is_written_and_a_non_empty_one_is_refused(tmp_path):
    out = tmp_path / "out"
    assert replace_folder(str(out), lambda d: write(d, a="1"), overwrite=False) == ["a"]
    with pytest.raises(OutputExists, match="is not empty \\(a\\); .* pass --overwrite"):
        replace_folder(str(out), lambda d: write(d, b="2"), overwrite=False)
    assert snapshot(out) == {"a": b"1"}


def test_overwrite_replaces_whole_and_a_failed_build_changes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write(str(out), stale="old weights", keep="x")
    before = snapshot(out)

    def failing(staging: str) -> None:
        write(staging, half="written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_folder(str(out), failing, overwrite=True)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    replace_folder(str(out), lambda d: write(d, new="1"), overwrite=True)
    assert snapshot(out) == {"new": b"1"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_crash_between_the_two_renames_gets_the_old_output_back(tmp_path):
    retired = tmp_path / f"{RETIRED_PREFIX}out-abc"
    retired.mkdir()
    write(str(retired), model="old")
    with pytest.raises(OutputExists):
        replace_folder(str(tmp_path / "out"), lambda d: write(d, model="new"), overwrite=False)
    assert snapshot(tmp_path / "out") == {"model": b"old"} and not retired.exists()
