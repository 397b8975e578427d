"""Raw inputs in every format become documents; a bad record is named by file and line, never fatal here."""

from __future__ import annotations

import json

import pytest

from data_pipeline.prepare import PrepareConfig, PrepareError, split_of
from data_pipeline.sources import SourceError, detect_format, expand, read_records


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_jsonl_bad_lines_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"text": "one"}, "{broken", {"body": "x"}, "[1, 2]", {"text": 3}, {"text": "six"}])
    records = list(read_records(str(path), "jsonl", "text"))
    assert [r.text for r in records if r.error is None] == ["one", "six"]
    errors = [r.error for r in records if r.error]
    assert errors[0].startswith(f"{path}:2: malformed JSON")
    assert errors[1] == f"{path}:3: field 'text' is missing; set text_field=NAME"
    assert errors[2] == f"{path}:4: expected a JSON object, got list"
    assert errors[3] == f"{path}:5: field 'text' is not a string (int); set text_field=NAME"


def test_custom_text_field(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"content": "hello"}])
    assert [r.text for r in read_records(str(path), "jsonl", "content")] == ["hello"]


def test_non_utf8_file_is_one_bad_record(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\ncaf\u00e9\n".encode("latin-1"))
    (record,) = read_records(str(path), "text", "text")
    assert record.error == f"{path}:2: not UTF-8 (byte 12); re-encode the file as UTF-8"


def test_parquet_and_datasets_folders(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"], "id": [1, 2]}), tmp_path / "d.parquet")
    assert [r.text for r in read_records(str(tmp_path / "d.parquet"), "parquet", "text")] == ["p1", "p2"]
    folder = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": ["h1", "h2", "h3"]}).save_to_disk(str(folder))
    assert expand(str(folder)) == [str(folder)]
    assert detect_format(str(folder), "auto") == "hf"
    assert [r.text for r in read_records(str(folder), "hf", "text")] == ["h1", "h2", "h3"]


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(SourceError, match=f"no input files at {tmp_path}/nothing-\\*.jsonl"):
        expand(str(tmp_path / "nothing-*.jsonl"))


def test_unknown_extension_asks_for_format(tmp_path):
    with pytest.raises(SourceError, match="set format=jsonl"):
        detect_format(str(tmp_path / "data.bin"), "auto")


def test_split_by_document_hash_is_stable_and_close_to_the_fraction():
    texts = [f"document number {i}" for i in range(4000)]
    splits = [split_of(t, 0.1) for t in texts]
    assert splits == [split_of(t, 0.1) for t in texts]
    assert 300 < splits.count("val") < 500


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"output": "x"}, "input= is required"),
        ({"input": "x", "output": "y", "on_bad_record": "ignore"}, "on_bad_record must be skip or fail"),
        ({"input": "x", "output": "y", "format": "xml"}, "format must be one of"),
        ({"input": "x", "output": "y", "vocab_size": 10}, "vocab_size must be in"),
    ],
)
def test_prepare_settings_are_validated(kwargs, message):
    with pytest.raises(PrepareError, match=message):
        PrepareConfig(**kwargs)
