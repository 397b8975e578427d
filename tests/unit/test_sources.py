"""Raw inputs in every format become documents; a bad record is named by file and line, never fatal here."""

from __future__ import annotations

import json

import pytest

from data_pipeline.prepare import PrepareConfig, PrepareError, split_of
from data_pipeline.records import LOCAL_MAX_BYTES, LocalRecords, engine_for, input_bytes
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
        ({"input": "x", "output": "y", "engine": "spark"}, "engine must be one of auto, ray, local; got 'spark'"),
    ],
)
def test_prepare_settings_are_validated(kwargs, message):
    with pytest.raises(PrepareError, match=message):
        PrepareConfig(**kwargs)


def test_a_small_input_is_prepared_in_this_process_and_a_large_one_by_ray_data_unless_told():
    assert engine_for("auto", 0) == engine_for("auto", LOCAL_MAX_BYTES) == "local"
    assert engine_for("auto", LOCAL_MAX_BYTES + 1) == "ray"
    assert engine_for("ray", 10) == "ray" and engine_for("local", 10 * LOCAL_MAX_BYTES) == "local"


def test_input_bytes_counts_files_and_the_files_of_a_datasets_folder(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 10)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "b.arrow").write_bytes(b"y" * 7)
    (tmp_path / "folder" / "state.json").write_text("{}")
    assert input_bytes([str(tmp_path / "a.txt"), str(tmp_path / "folder")]) == 19


def test_local_records_map_batches_of_columns_in_order_as_ray_data_does():
    rows = [{"text": str(i), "line": i} for i in range(5)]
    records = LocalRecords(rows)
    assert list(records.iter_rows()) == rows

    def lengths(batch, plus):
        return {"n": [len(batch["text"])], "first": [batch["line"][0] + plus]}

    mapped = records.map_batches(lengths, fn_kwargs={"plus": 100}, batch_size=2, batch_format="numpy")
    assert list(mapped.iter_batches(batch_size=2)) == [
        {"n": [2], "first": [100]},
        {"n": [2], "first": [102]},
        {"n": [1], "first": [104]},
    ]
